"""Launch resolution for `hftune plan`: what `accelerate launch --config_file ... hftune/run.py` would run.

Reads the accelerate config (accelerate's own loader) and the DeepSpeed JSON it or the recipe names, and
resolves them, with the recipe's TrainingArguments, into a `Launch`: distributed type, world size, batch
sizes, ZeRO stage and offload, FSDP, pipeline stages, precision. `launch_environment` exports what
hftune's own launch checks read, so the recipe is judged against this launch. Nothing is launched.
"""

import importlib.util
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field

from hftune.errors import HftuneError
from hftune.launch.checks import PLANNED_WORLD_SIZE

MULTI_PROCESS_TYPES = ("MULTI_GPU", "MULTI_NPU", "MULTI_MLU", "MULTI_SDAA", "MULTI_MUSA", "MULTI_XPU",
                       "MULTI_HPU", "MULTI_NEURON", "DEEPSPEED", "FSDP", "MEGATRON_LM", "XLA")


@dataclass
class Launch:
    config_file: str  # None: no accelerate config (one process)
    distributed_type: str
    num_processes: int
    num_machines: int
    world_size: int
    mixed_precision: str  # "no", "fp16", "bf16", "fp8"
    per_device_batch: int
    gradient_accumulation: int
    engine: str
    deepspeed_source: str = None  # where the DeepSpeed settings come from
    zero_stage: int = None
    offload_optimizer: str = "none"
    offload_param: str = "none"
    fsdp: str = None  # "FSDP2, full shard"
    pipeline_stages: int = None
    notes: list = field(default_factory=list)

    @property
    def data_parallel(self):
        return self.world_size // (self.pipeline_stages or 1)

    @property
    def global_batch(self):
        return self.per_device_batch * self.gradient_accumulation * self.data_parallel


def load_accelerate_config(path):
    """accelerate's own loader; with no --config_file, its default config if there is one (as launch does)."""
    from accelerate.commands.config.config_args import ClusterConfig, default_config_file, load_config_from_file

    if path is None and not os.path.isfile(default_config_file):
        return None, None
    shown = path or default_config_file
    if path is not None and not os.path.isfile(path):
        raise HftuneError(f"accelerate config '{path}' does not exist; pass a file such as "
                          "accelerate_configs/ddp.yaml.")
    try:
        config = load_config_from_file(path)
    except AttributeError:  # accelerate calls .get() on whatever the YAML holds
        raise HftuneError(f"accelerate config '{shown}' must be a mapping of key: value.") from None
    except Exception as err:  # yaml, unknown keys, bad enum values: accelerate raises several kinds
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise HftuneError(f"accelerate config '{shown}' is invalid: {first}") from None
    if not isinstance(config, ClusterConfig):
        raise HftuneError(f"accelerate config '{shown}' is a SageMaker config; plan a local or cluster config.")
    return config, shown


def read_deepspeed_json(path, named_by):
    """A DeepSpeed JSON, relative to the working directory (as accelerate and Trainer open it)."""
    if not os.path.isfile(path):
        raise HftuneError(f"DeepSpeed config '{path}' named by {named_by} does not exist (relative paths start "
                          f"at the directory you launch from, here {os.getcwd()}).")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise HftuneError(f"DeepSpeed config '{path}' is not valid JSON: {err}.") from None


def deepspeed_settings(args, config, config_path):
    """(source, DeepSpeed JSON dict or None, accelerate's inline deepspeed_config) for this launch, or
    (None, None, None). The recipe's `deepspeed` wins: Trainer builds its own plugin from it."""
    if args.deepspeed:
        if isinstance(args.deepspeed, dict):
            return "the recipe's deepspeed mapping", args.deepspeed, None
        return args.deepspeed, read_deepspeed_json(args.deepspeed, "the recipe's deepspeed field"), None
    if config is None or str(config.distributed_type.value) != "DEEPSPEED":
        return None, None, None
    inline = config.deepspeed_config or {}
    if inline.get("deepspeed_config_file"):
        path = inline["deepspeed_config_file"]
        return path, read_deepspeed_json(path, f"accelerate config '{config_path}'"), None
    return f"accelerate config '{config_path}' (inline)", None, inline


def apply_deepspeed(launch, ds_json, inline):
    if ds_json is not None:
        zero = ds_json.get("zero_optimization", {})
        launch.zero_stage = int(zero.get("stage", 0))
        launch.offload_optimizer = (zero.get("offload_optimizer") or {}).get("device", "none")
        launch.offload_param = (zero.get("offload_param") or {}).get("device", "none")
    else:  # accelerate's inline keys; DeepSpeedPlugin defaults to ZeRO-2
        launch.zero_stage = int(inline.get("zero_stage", 2))
        launch.offload_optimizer = inline.get("offload_optimizer_device") or "none"
        launch.offload_param = inline.get("offload_param_device") or "none"


def fsdp_description(args, config):
    if args.fsdp:
        options = " ".join(str(getattr(o, "value", o)) for o in args.fsdp)
        return f"FSDP (recipe fsdp: {options})"
    if config is None or str(config.distributed_type.value) != "FSDP":
        return None
    fsdp = config.fsdp_config or {}
    version = int(fsdp.get("fsdp_version", 1))
    if version >= 2:
        full = str(fsdp.get("fsdp_reshard_after_forward", True)).lower() == "true"
        sharding = "full shard" if full else "shard gradients+optimizer (reshard_after_forward false)"
    else:
        sharding = str(fsdp.get("fsdp_sharding_strategy", "FULL_SHARD")).lower().replace("_", " ")
    offload = ", parameters offloaded to cpu" if str(fsdp.get("fsdp_offload_params", False)).lower() == "true" else ""
    return f"FSDP{version}, {sharding}{offload}"


def world_size(config, num_processes, notes):
    """Processes `accelerate launch` starts: num_processes is the total over all machines."""
    kind = str(config.distributed_type.value) if config is not None else "NO"
    if kind in MULTI_PROCESS_TYPES:
        return num_processes
    if kind == "MULTI_CPU" and (config.mpirun_config or {}).get("mpirun_hostfile"):
        return num_processes
    if num_processes > 1:
        notes.append(f"distributed_type {kind} starts ONE process whatever num_processes says; "
                     "use accelerate_configs/ddp.yaml for several.")
    return 1


def precision(args, config, ds_json):
    """TrainingArguments' fp16/bf16 win; else an explicit DeepSpeed JSON value; else the accelerate config."""
    if args.fp16 or args.bf16:
        return "fp16" if args.fp16 else "bf16"
    for name in ("fp16", "bf16"):
        if ds_json is not None and (ds_json.get(name) or {}).get("enabled") is True:
            return name
    return str(getattr(config, "mixed_precision", None) or "no")


def pipeline_stages(args, ds_json, world, notes):
    if args.engine != "pipeline":
        return None
    stages = args.pipeline_stages
    if stages is None:
        configured = (ds_json or {}).get("pipeline", {}).get("stages")
        stages = configured if isinstance(configured, int) else world
    if stages < 1 or world % stages:
        raise HftuneError(f"pipeline_stages {stages} must divide the world size {world}; "
                          "the rest of the processes are data-parallel replicas.")
    if ds_json is None:
        notes.append("engine: pipeline runs on DeepSpeed: launch it with accelerate_configs/deepspeed_pipeline.yaml.")
    return stages


@contextmanager
def launch_environment(config, notes, world):
    """The variables `accelerate launch` exports that hftune's own launch checks read (hftune.launch.checks,
    hftune.engines), so parse_config judges the recipe against this launch: the DeepSpeed JSON (its
    blocks, ZeRO stage vs engine, batch numbers against the planned world size) and FSDP. Not ACCELERATE_USE_DEEPSPEED or
    WORLD_SIZE: with those, TrainingArguments would set up DeepSpeed or a process group in this process."""
    kind = str(config.distributed_type.value) if config is not None else "NO"
    env = {PLANNED_WORLD_SIZE: str(world), **({"ACCELERATE_USE_FSDP": "true"} if kind == "FSDP" else {})}
    ds_file = (config.deepspeed_config or {}).get("deepspeed_config_file") if kind == "DEEPSPEED" else None
    if ds_file and importlib.util.find_spec("deepspeed") is None:
        notes.append("DeepSpeed is not installed here, so the launch's DeepSpeed checks were skipped "
                      "(pip install 'hftune[deepspeed]' where it runs).")
    elif ds_file:
        env["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = ds_file
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for name, before in saved.items():
            if before is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = before


def resolve_launch(args, options, config, shown, notes):
    for flag in ("num_processes", "num_machines"):
        if getattr(options, flag) is not None and getattr(options, flag) < 1:
            raise HftuneError(f"--{flag} must be at least 1, got {getattr(options, flag)}.")
    processes = options.num_processes or (config.num_processes if config is not None else 1)
    if processes < 1:
        raise HftuneError(f"{shown} leaves num_processes unset; pass --num_processes.")
    machines = options.num_machines or (config.num_machines if config is not None else 1)
    world = world_size(config, processes, notes)
    source, ds_json, inline = deepspeed_settings(args, config, shown)
    launch = Launch(
        config_file=shown, distributed_type=str(config.distributed_type.value) if config is not None else "NO",
        num_processes=processes, num_machines=machines, world_size=world,
        mixed_precision=precision(args, config, ds_json), per_device_batch=args.per_device_train_batch_size,
        gradient_accumulation=args.gradient_accumulation_steps, engine=args.engine, notes=notes,
    )
    if source is not None:
        launch.deepspeed_source = source
        apply_deepspeed(launch, ds_json, inline)
    launch.fsdp = fsdp_description(args, config)
    launch.pipeline_stages = pipeline_stages(args, ds_json, world, notes)
    return launch
