"""`hftune plan`: the resolved launch and a per-device memory estimate, without training.

    hftune plan --config text_classification --config_file accelerate_configs/deepspeed_zero3.yaml \\
        --num_processes 4 --device_memory 24GB --per_device_train_batch_size 64

prints what `accelerate launch --config_file ... hftune/run.py --config ...` would run (distributed
type, world size, batch sizes, ZeRO/FSDP/pipeline settings, precision), the estimated memory per
device of this model under each strategy, and, given --device_memory, the simplest strategy that fits.
Nothing is trained, no process is launched, no weights are loaded (the model is built on the meta device).

Memory model, in bytes per parameter (P parameters, T of them trainable; N data-parallel processes;
S = optimizer state bytes per parameter, measured by one step of the configured optimizer on a
probe layer; p = 2 under fp16/bf16 mixed precision, else 4; L = the largest module's own parameters):
  DDP       parameters 4P (+2P autocast copies under mixed precision), gradients 4T, optimizer S*T
  ZeRO-s    parameters pP (/N at s=3), gradients pT (/N at s>=2) + 4T/N fp32 partition under mixed precision,
            optimizer (4T fp32 master copy + S*T)/N (no master copy at s=3 in fp32); ZeRO-3 also holds the
            gathered largest layer (p*L parameters + p*L gradients). Offload moves the optimizer (and the
            sharded gradients) or the parameter partition to host memory.
            These are the multipliers of DeepSpeed's own estimators (estimate_zero2/3_model_states_mem_needs).
  FSDP      full shard (FSDP2): parameters 4P/N plus the gathered root unit and two blocks (current +
            prefetched), gradients 4T/N plus one unsharded block, optimizer S*T/N.
  pipeline  K stages x D replicas: ZeRO-1 over D on P/K parameters (the shipped pipeline config).
Table columns "ZeRO-2 off" / "ZeRO-3 off": ZeRO-2 with the optimizer, ZeRO-3 with optimizer and parameters
offloaded to CPU; "pipe KxD": K pipeline stages x D data-parallel replicas.
Activations are approximate: transformers follow Korthikanti et al. 2022 (per layer
s*b*h*(34 + 5*a*s/h) bytes at 16 bits; the attention-score term only for eager attention; x2 in fp32);
CNNs sum the feature maps their layers return, traced on the meta device.
"""

import argparse
import importlib.util
import json
import os
import re
import shlex
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field

from hftune.errors import HftuneError
from hftune.launch.checks import PLANNED_WORLD_SIZE

GiB = 2**30
HEADROOM = 0.85  # fits when the estimate uses <= 85% of the device: CUDA context, fragmentation, temporaries
PROBE_FEATURES = 256  # the probe layer the optimizer takes one step on (256 x 256 weights)
UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
# Strategies in the order a recommendation tries them (simplest first), with the shipped config that runs each.
RECOMMENDATION_ORDER = (
    ("DDP", "DDP", "ddp.yaml"), ("ZeRO-1", "ZeRO-1", "deepspeed_zero1.yaml"),
    ("ZeRO-2", "ZeRO-2", "deepspeed_zero2.yaml"), ("ZeRO-3", "ZeRO-3", "deepspeed_zero3.yaml"),
    ("ZeRO-3 off", "ZeRO-3 with CPU offload", "deepspeed_zero3_offload.yaml"),
)
MULTI_PROCESS_TYPES = ("MULTI_GPU", "MULTI_NPU", "MULTI_MLU", "MULTI_SDAA", "MULTI_MUSA", "MULTI_XPU",
                       "MULTI_HPU", "MULTI_NEURON", "DEEPSPEED", "FSDP", "MEGATRON_LM", "XLA")


# ---- the launch, as `accelerate launch` would resolve it ----


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


# ---- the model, counted on the meta device ----


@dataclass
class ModelFacts:
    name: str
    architecture: str
    params: int
    trainable: int
    largest_layer: int  # the biggest module's own parameters: what ZeRO-3 gathers at once
    fsdp_root: int  # parameters outside the blocks FSDP wraps (embeddings, head): gathered all step long
    fsdp_blocks: int  # the two biggest wrapped blocks (the one computing and the one prefetched)
    layer_activations: float  # bytes per device per micro-batch in the layers (split by pipeline stages)
    head_activations: float  # bytes outside them (LM logits)
    activation_formula: str


def model_class(task_name):
    """The Auto class the task adapter loads its model with (each imports exactly one)."""
    from hftune.tasks import get_task

    module = get_task(task_name)
    classes = [value for name, value in vars(module).items() if name.startswith("AutoModelFor")]
    if len(classes) != 1:
        raise HftuneError(f"cannot tell which model class task {task_name} builds; plan does not cover it.")
    return classes[0]


def empty_model(model_args, data_args):
    """The task's model with its parameters on the meta device: sizes without weights or memory."""
    from accelerate import init_empty_weights

    from hftune.tasks import load_config, pretrained_source

    path, common = pretrained_source(model_args)
    try:
        config = load_config(model_args, path, common)
    except OSError as err:  # what from_pretrained raises for a missing folder or Hub id
        raise HftuneError(f"could not load the config of model_name_or_path '{model_args.model_name_or_path}': "
                          f"{str(err).strip().splitlines()[0]}") from None
    with init_empty_weights(include_buffers=True):  # buffers too, so a meta forward pass can run
        model = model_class(data_args.task).from_config(config, trust_remote_code=model_args.trust_remote_code)
    return model, path, common


def fsdp_units(model):
    """(root, two biggest blocks): FSDP's transformer-based wrap shards each `_no_split_modules` block;
    the root unit (the rest) stays gathered all step, plus the current block and the prefetched next one."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    block_sizes = sorted((sum(p.numel() for p in b.parameters()) for b in blocks), reverse=True)
    total = sum(p.numel() for p in model.parameters())
    return total - sum(block_sizes), sum(block_sizes[:2])


def sequence_length(config, data_args):
    wanted = data_args.block_size or data_args.max_seq_length
    limit = getattr(config, "max_position_embeddings", None)
    return min(wanted, limit) if limit else wanted


def transformer_activations(config, batch, seq, act_bytes, checkpointing, lm_head):
    """(layers, head) bytes: Korthikanti et al. 2022, eq. 2, per layer s*b*h*(34 + 5*a*s/h) bytes at 16 bits.
    The a*s^2 attention scores are stored only by eager attention (SDPA/flash keep none)."""
    layers, hidden, heads = config.num_hidden_layers, config.hidden_size, config.num_attention_heads
    eager = getattr(config, "_attn_implementation", "eager") in (None, "eager")
    per_value = 34 + (5 * heads * seq / hidden if eager else 0)
    one_layer = seq * batch * hidden * per_value * act_bytes / 2
    # Gradient checkpointing keeps each layer's input and recomputes one layer at a time.
    stored = layers * seq * batch * hidden * act_bytes + one_layer if checkpointing else layers * one_layer
    # LM logits in the model dtype plus the fp32 copy the loss works on.
    head = batch * seq * config.vocab_size * (act_bytes + 4) if lm_head else 0.0
    formula = (f"transformer: {layers} layers x s*b*h*(34{' + 5*a*s/h' if eager else ''}) bytes "
               f"(s={seq}, b={batch}, h={hidden}, a={heads}; Korthikanti et al. 2022"
               f"{'; gradient checkpointing' if checkpointing else ''}{'; + LM logits' if lm_head else ''})")
    return stored, head, formula


def image_size(path, common, config):
    """(height, width) the image processor produces, else the config's image_size, else 224."""
    from transformers import AutoImageProcessor

    try:
        processor = AutoImageProcessor.from_pretrained(path, **common)
    except (OSError, ValueError):
        processor = None
    for size in (getattr(processor, "crop_size", None), getattr(processor, "size", None)):
        get = size.get if isinstance(size, dict) else lambda key, s=size: getattr(s, key, None)
        if size is not None and get("height") and get("width"):
            return get("height"), get("width")
        if size is not None and get("shortest_edge"):
            return get("shortest_edge"), get("shortest_edge")
    side = getattr(config, "image_size", None) or 224
    return (side, side) if isinstance(side, int) else tuple(side)


def traced_activations(model, channels, height, width, batch, act_bytes):
    """The input plus every leaf module's output on one meta-device forward pass (a module that returns
    its input, like Identity, adds nothing): the feature maps autograd keeps for the backward pass."""
    import torch

    outputs = [channels * height * width]  # the first convolution keeps its input

    def record(module, inputs, output):
        if torch.is_tensor(output) and not any(output is i for i in inputs):
            outputs.append(output.numel())

    hooks = [m.register_forward_hook(record) for m in model.modules() if next(m.children(), None) is None]
    try:
        model.train()
        model(pixel_values=torch.empty(1, channels, height, width, device="meta"))
    finally:
        for hook in hooks:
            hook.remove()
    formula = (f"CNN: sum of the input and the {len(outputs) - 1} feature maps its layers return, traced at "
               f"{channels}x{height}x{width}, x batch {batch}")
    return sum(outputs) * batch * act_bytes, formula


def activations(model, path, common, data_args, args, act_bytes):
    """(layers, head, formula) bytes per device per micro-batch; zeros, said so, for an architecture
    neither formula fits (a config without layer sizes, a forward that cannot run on the meta device)."""
    config, batch = model.config, args.per_device_train_batch_size
    try:
        if data_args.task == "image-classification":
            height, width = image_size(path, common, config)
            channels = getattr(config, "num_channels", 3)
            traced, formula = traced_activations(model, channels, height, width, batch, act_bytes)
            return traced, 0.0, formula
        return transformer_activations(config, batch, sequence_length(config, data_args), act_bytes,
                                       args.gradient_checkpointing, lm_head=data_args.task == "causal-lm")
    except (AttributeError, TypeError, RuntimeError, NotImplementedError) as err:
        return 0.0, 0.0, f"NOT estimated for {type(model).__name__} ({type(err).__name__}: {err}); add them yourself"


def model_facts(model_args, data_args, args, launch):
    model, path, common = empty_model(model_args, data_args)
    act_bytes = 2 if launch.mixed_precision != "no" else 4
    layers, head, formula = activations(model, path, common, data_args, args, act_bytes)
    root, blocks = fsdp_units(model)
    return ModelFacts(
        name=model_args.model_name_or_path, architecture=type(model).__name__,
        params=sum(p.numel() for p in model.parameters()),
        trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
        largest_layer=max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()),
        fsdp_root=root, fsdp_blocks=blocks, layer_activations=layers, head_activations=head,
        activation_formula=formula,
    )


# ---- optimizer state bytes ----

# Optimizers the probe cannot build here (bitsandbytes' need a GPU, others a package): states per parameter.
KNOWN_STATE_BYTES = (("lion_8bit", 1.0), ("8bit", 2.0), ("lion", 4.0), ("adafactor", 0.0), ("lomo", 0.0),
                     ("sgd", 0.0))


def optimizer_state_bytes(args):
    """(bytes of optimizer state per trainable parameter, how it was found)."""
    import torch

    from hftune.training.optim import build_optimizer, name_of, optimizer_spec, parse_optim_args

    name, spec = name_of(args.optim), optimizer_spec(args)
    if spec is not None and spec.needs_closure:  # L-BFGS keeps `history_size` pairs of full-size vectors
        history = parse_optim_args(args.optim_args).get("history_size", spec.defaults["history_size"])
        return 4.0 * (2 * history + 2), f"{name}: {history} (step, gradient change) pairs + 2 buffers"
    probe = torch.nn.Linear(PROBE_FEATURES, PROBE_FEATURES, bias=False)
    try:
        optimizer = build_optimizer(probe, args)
        probe.weight.grad = torch.zeros_like(probe.weight)
        optimizer.step()
    except Exception:  # any failure to build here (no GPU, missing package): fall back to the known table
        guess = next((b for key, b in KNOWN_STATE_BYTES if key in name), None)
        if guess is None:
            return 8.0, f"{name}: 8 bytes/parameter assumed (AdamW-like; it cannot be built here to measure)"
        return guess, f"{name}: {guess:g} bytes/parameter (known; it cannot be built here to measure)"
    tensors = [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    state = sum(t.numel() * t.element_size() for t in tensors)
    per_param = state / probe.weight.numel()
    return per_param, f"{name} ({type(optimizer).__name__}): {per_param:.2f} bytes/parameter, measured on a probe layer"


# ---- per-device memory under each strategy ----


@dataclass
class Estimate:
    parameters: float
    gradients: float
    optimizer: float
    activations: float
    host: float = 0.0  # offloaded to host memory, per process

    @property
    def total(self):
        return self.parameters + self.gradients + self.optimizer + self.activations


@dataclass
class Sizing:
    """What the formulas need: the model, the optimizer's state bytes and the precision."""

    facts: ModelFacts
    state_bytes: float
    mixed: bool
    gradient_accumulation: int

    @property
    def compute_bytes(self):
        """Bytes of a parameter or gradient in the dtype DeepSpeed/FSDP compute in (p in the docstring)."""
        return 2 if self.mixed else 4

    @property
    def activations(self):
        return self.facts.layer_activations + self.facts.head_activations


def ddp(s):
    f = s.facts
    return Estimate(parameters=4 * f.params + (2 * f.params if s.mixed else 0), gradients=4 * f.trainable,
                    optimizer=s.state_bytes * f.trainable, activations=s.activations)


def zero(s, stage, n, offload_optimizer=False, offload_param=False, params=None, trainable=None, activations=None):
    """DeepSpeed ZeRO with the multipliers of its own estimators (see the module docstring)."""
    p = s.compute_bytes
    params = s.facts.params if params is None else params
    trainable = s.facts.trainable if trainable is None else trainable
    gathered = s.facts.largest_layer * p if stage == 3 else 0.0
    param_part = p * params / (n if stage == 3 else 1)
    grad_full = p * trainable if stage < 2 else 0.0
    grad_part = (p * trainable / n if stage >= 2 else 0.0) + (4 * trainable / n if s.mixed else 0.0)
    master = 4 * trainable if (s.mixed or stage < 3) else 0.0
    optimizer = (master + s.state_bytes * trainable) / (n if stage >= 1 else 1)
    host = (optimizer + grad_part if offload_optimizer else 0.0) + (param_part if offload_param else 0.0)
    return Estimate(
        parameters=gathered + (0.0 if offload_param else param_part),
        gradients=gathered + grad_full + (0.0 if offload_optimizer else grad_part),
        optimizer=0.0 if offload_optimizer else optimizer,
        activations=s.activations if activations is None else activations, host=host,
    )


def fsdp(s, n):
    f = s.facts
    gathered = s.compute_bytes * (f.fsdp_root + f.fsdp_blocks)
    unsharded_grads = s.compute_bytes * f.fsdp_blocks / 2  # about one block's, before its reduce-scatter
    return Estimate(parameters=4 * f.params / n + gathered, gradients=4 * f.trainable / n + unsharded_grads,
                    optimizer=s.state_bytes * f.trainable / n, activations=s.activations)


def pipeline(s, stages, replicas):
    """Each stage holds 1/stages of the layers and, in the 1F1B schedule, up to `stages` micro-batches."""
    f = s.facts
    in_flight = min(stages, s.gradient_accumulation)
    activations = f.layer_activations / stages * in_flight + f.head_activations
    return zero(s, 1, replicas, params=f.params / stages, trainable=f.trainable / stages, activations=activations)


def estimates(sizing, launch):
    """{column label: Estimate} for the launch's world size."""
    n = launch.world_size
    stages = launch.pipeline_stages or n
    return {
        "DDP": ddp(sizing),
        "ZeRO-1": zero(sizing, 1, n),
        "ZeRO-2": zero(sizing, 2, n),
        "ZeRO-3": zero(sizing, 3, n),
        "ZeRO-2 off": zero(sizing, 2, n, offload_optimizer=True),
        "ZeRO-3 off": zero(sizing, 3, n, offload_optimizer=True, offload_param=True),
        "FSDP": fsdp(sizing, n),
        f"pipe {stages}x{n // stages}": pipeline(sizing, stages, n // stages),
    }


def launch_estimate(sizing, launch):
    """(description, Estimate) of exactly this launch's strategy."""
    n = launch.world_size
    if launch.pipeline_stages:
        stages = launch.pipeline_stages
        return f"pipeline, {stages} stages x {n // stages} replicas", pipeline(sizing, stages, n // stages)
    if launch.zero_stage is not None:
        offload = [f"{what} -> {device}" for what, device in
                   (("optimizer", launch.offload_optimizer), ("parameters", launch.offload_param)) if device != "none"]
        text = f"ZeRO-{launch.zero_stage}" + (f", offload {', '.join(offload)}" if offload else "")
        return text, zero(sizing, launch.zero_stage, n, launch.offload_optimizer != "none",
                          launch.zero_stage == 3 and launch.offload_param != "none")
    if launch.fsdp:
        return f"{launch.fsdp} (estimated as full shard)", fsdp(sizing, n)
    return ("DDP" if n > 1 else "one device"), ddp(sizing)


# ---- recommendation ----


def parse_memory(text):
    """'24GB' -> 24e9 bytes, '80GiB' -> 80 * 2**30 (GB/MB are decimal, GiB/MiB binary)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]+)\s*", str(text))
    unit = match and UNITS.get(match.group(2).lower())
    if not unit or float(match.group(1)) <= 0:
        raise HftuneError(f"--device_memory '{text}' is not a size; write it like 24GB, 80GiB or 512MiB.")
    return float(match.group(1)) * unit


@dataclass
class Recommendation:
    fits: bool
    strategy: str  # the first that fits; when none does, the one needing least
    config: str  # the shipped accelerate config to launch it with (None when nothing fits)
    need: float  # its estimated bytes per device
    device: float


def recommend(table, device_bytes, world):
    """The first strategy of RECOMMENDATION_ORDER whose estimate fits in HEADROOM of the device."""
    for column, strategy, config in RECOMMENDATION_ORDER:
        need = table[column].total
        if need <= HEADROOM * device_bytes:
            config = "single_device.yaml" if strategy == "DDP" and world == 1 else config
            return Recommendation(True, strategy, f"accelerate_configs/{config}", need, device_bytes)
    column, strategy, _ = min(RECOMMENDATION_ORDER, key=lambda entry: table[entry[0]].total)
    return Recommendation(False, strategy, None, table[column].total, device_bytes)


# ---- the plan, assembled and printed ----


@dataclass
class Plan:
    launch: Launch
    facts: ModelFacts
    optimizer: str
    table: dict
    this_launch: tuple
    recommendation: Recommendation
    hftune_argv: list


def build_plan(argv):
    """Parse plan's own flags, then the recipe plus hftune overrides, and work out the plan."""
    from hftune.config import parse_config

    options, hftune_argv = plan_parser().parse_known_args(argv)
    device = parse_memory(options.device_memory) if options.device_memory is not None else None
    config, shown = load_accelerate_config(options.config_file)
    notes = []
    world = world_size(config, options.num_processes or (config.num_processes if config is not None else 1), [])
    with launch_environment(config, notes, world):
        model_args, data_args, args = parse_config(hftune_argv)
    launch = resolve_launch(args, options, config, shown, notes)
    facts = model_facts(model_args, data_args, args, launch)
    state_bytes, optimizer = optimizer_state_bytes(args)
    sizing = Sizing(facts, state_bytes, launch.mixed_precision != "no", launch.gradient_accumulation)
    table = estimates(sizing, launch)
    recommendation = recommend(table, device, launch.world_size) if device is not None else None
    return Plan(launch, facts, optimizer, table, launch_estimate(sizing, launch), recommendation, hftune_argv)


def gib(value):
    value /= GiB
    digits = 0 if value >= 100 else 1 if value >= 10 else 2 if value >= 1 else 3
    return f"{value:.{digits}f}"


def launch_lines(launch):
    rows = [
        ("accelerate config", launch.config_file or "none (one process; pass --config_file to plan a launch)"),
        ("distributed type", launch.distributed_type),
        ("world size", f"{launch.world_size} ({launch.num_processes} processes on {launch.num_machines} "
                       f"machine{'s' if launch.num_machines > 1 else ''})"),
        ("ZeRO stage", f"{launch.zero_stage} (DeepSpeed config: {launch.deepspeed_source})"
         if launch.zero_stage is not None else "none (no DeepSpeed)"),
        ("offload", f"optimizer: {launch.offload_optimizer}, parameters: {launch.offload_param}"),
        ("FSDP", launch.fsdp or "none"),
        ("pipeline stages", f"{launch.pipeline_stages} (engine: pipeline)" if launch.pipeline_stages else
         f"none (engine: {launch.engine})"),
        ("data-parallel size", str(launch.data_parallel)),
        ("per-device batch", str(launch.per_device_batch)),
        ("gradient accumulation", str(launch.gradient_accumulation)),
        ("global batch", f"{launch.global_batch} (= {launch.per_device_batch} per device x "
                         f"{launch.gradient_accumulation} accumulation x {launch.data_parallel} data-parallel)"),
        ("mixed precision", launch.mixed_precision),
    ]
    return ["Launch"] + [f"  {name:<22} {value}" for name, value in rows] + [f"  note: {n}" for n in launch.notes]


def table_lines(plan):
    labels = list(plan.table)
    width = max(len(label) for label in labels) + 2
    rows = [("parameters", "parameters"), ("gradients", "gradients"), ("optimizer states", "optimizer"),
            ("activations", "activations"), ("total", "total")]
    lines = [f"  {'GiB per device':<18}" + "".join(f"{label:>{width}}" for label in labels)]
    for title, attribute in rows:
        lines.append(f"  {title:<18}" + "".join(f"{gib(getattr(plan.table[l], attribute)):>{width}}" for l in labels))
    lines.append(f"  {'host (offloaded)':<18}" + "".join(f"{gib(plan.table[l].host):>{width}}" for l in labels))
    return lines


def model_lines(plan):
    f = plan.facts
    return [
        "Model",
        f"  {f.name}: {f.architecture}, {f.params / 1e6:.1f}M parameters ({f.trainable / 1e6:.1f}M trainable), "
        f"largest layer {f.largest_layer / 1e6:.1f}M",
        f"  optimizer: {plan.optimizer}",
        f"  activations (approximate): {f.activation_formula}",
    ]


def recommendation_lines(plan):
    r = plan.recommendation
    if r is None:
        return ["Pass --device_memory (e.g. 24GB, 80GiB) for a recommendation."]
    head = f"Recommendation for {gib(r.device)} GiB per device (an estimate must fit in {HEADROOM:.0%} of it):"
    if not r.fits:
        return [head, f"  none fits: the smallest need is {gib(r.need)} GiB ({r.strategy}). Lower "
                      "per_device_train_batch_size (raise gradient_accumulation_steps), set gradient_checkpointing: "
                      "true, use mixed precision, or add processes."]
    world, machines = plan.launch.world_size, plan.launch.num_machines
    processes = f" --num_processes {world}" if world > 1 else ""
    processes += f" --num_machines {machines}" if machines > 1 else ""
    command = (f"accelerate launch --config_file {r.config}{processes} hftune/run.py "
               f"{shlex.join(plan.hftune_argv)}").rstrip()
    return [head, f"  {r.strategy} ({gib(r.need)} GiB): {command}"]


def format_plan(plan):
    description, estimate = plan.this_launch
    host = f" (+{gib(estimate.host)} GiB host per process)" if estimate.host else ""
    lines = [
        "hftune plan: nothing is trained or launched; memory figures are estimates.", "",
        *launch_lines(plan.launch), "", *model_lines(plan), "",
        f"Estimated memory per device, world size {plan.launch.world_size} (activations approximate)",
        *table_lines(plan),
        f"  this launch: {description}: {gib(estimate.total)} GiB per device{host}", "",
        *recommendation_lines(plan),
    ]
    return "\n".join(lines)


class _OneLineErrorParser(argparse.ArgumentParser):
    def error(self, message):
        raise HftuneError(f"hftune plan: {message}. Run `hftune plan --help`.")


def plan_parser():
    parser = _OneLineErrorParser(
        prog="hftune plan", allow_abbrev=False,
        description="Show the resolved launch and a per-device memory estimate without training. "
                    "Every other flag (--config recipe.yaml, --per_device_train_batch_size 8, ...) is hftune's.",
    )
    parser.add_argument("--config_file", default=None, help="accelerate config, as for `accelerate launch`.")
    parser.add_argument("--num_processes", type=int, default=None, help="Total processes (overrides the config).")
    parser.add_argument("--num_machines", type=int, default=None, help="Machines (overrides the config).")
    parser.add_argument("--device_memory", default=None, help="Memory per device, e.g. 24GB or 80GiB.")
    return parser


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        print(format_plan(build_plan(argv)))
    except HftuneError as err:
        print(f"hftune: error: {err}", file=sys.stderr)
        sys.exit(2)
