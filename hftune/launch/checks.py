"""Check the launch before anything trains: the DeepSpeed JSON against the recipe, gradient
compression against the backend, and the world size the run really got against the one launched.

Every check here guards against a run that would silently do something other than its config says
(on a machine without GPUs, the obvious multi-process launch runs N independent jobs)."""

import json
import os
from pathlib import Path

import torch

from hftune.errors import HftuneError

COMM_HOOKS = {"fp16": "fp16", "bf16": "bf16", "powersgd": "power_sgd"}  # hftune name -> accelerate's
REMOVED_DEEPSPEED_OPTIMIZERS = ("onebitadam", "onebitlamb", "zerooneadam")  # gone from DeepSpeed 0.19
PLANNED_WORLD_SIZE = "HFTUNE_PLANNED_WORLD_SIZE"  # set by `hftune plan`, which judges a launch it does not start


def launched_world_size():
    """The number of processes the launcher (accelerate launch / torchrun / deepspeed) started."""
    return int(os.environ.get("WORLD_SIZE") or os.environ.get(PLANNED_WORLD_SIZE, "1"))


def fsdp_launch():
    """The accelerate config asks for FSDP (`distributed_type: FSDP`)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def uses_fsdp(args):
    return bool(args.fsdp) or fsdp_launch()


def deepspeed_config(args):
    """The DeepSpeed JSON this run uses (from the recipe's `deepspeed` or the accelerate config), or None."""
    source = args.deepspeed or os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if not source:
        return {} if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" else None
    if isinstance(source, dict):
        return source
    if not Path(source).is_file():
        raise HftuneError(f"DeepSpeed config '{source}' does not exist (relative paths are read from the directory "
                          "you launch in: run from the repository root or give an absolute path).")
    try:
        return json.loads(Path(source).read_text())
    except json.JSONDecodeError as err:
        raise HftuneError(f"DeepSpeed config '{source}' is not valid JSON: {err}.") from None


def zero_stage(config):
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    return int(stage) if stage is not None else int((config.get("zero_optimization") or {}).get("stage", 0))


def uses_deepspeed(args):
    return deepspeed_config(args) is not None


def shards_parameters(args):
    """FSDP or ZeRO-3: each process holds only a shard of every parameter."""
    if uses_fsdp(args):
        return True
    config = deepspeed_config(args)
    return config is not None and zero_stage(config) == 3


def pipeline_stages(args, config):
    """engine: pipeline's stage count: pipeline_stages, else the JSON's pipeline.stages, else every process."""
    if args.engine != "pipeline":
        return 1
    if args.pipeline_stages is not None:
        return args.pipeline_stages
    stages = (config.get("pipeline") or {}).get("stages", "auto")
    return stages if isinstance(stages, int) else launched_world_size()


def _check_one_owner(config):
    """The recipe owns optimizer and schedule; a second copy in the JSON would silently win or clash."""
    optimizer = (config.get("optimizer") or {}).get("type", "")
    if optimizer.lower() in REMOVED_DEEPSPEED_OPTIMIZERS:
        raise HftuneError(f"DeepSpeed optimizer {optimizer} was removed in DeepSpeed 0.19 (hftune needs >= 0.19); drop "
                          "the optimizer block (the recipe's optim applies) and compress with "
                          "communication_data_type: fp16 in the JSON.")
    for block, key in (("optimizer", "optim"), ("scheduler", "lr_scheduler_type")):
        if config.get(block) is not None:
            raise HftuneError(f"the DeepSpeed config has a '{block}' block; hftune takes it from the recipe's {key}: "
                              f"remove the block (see deepspeed_configs/).")


def _check_removed_keys(config):
    """Blocks the installed DeepSpeed removed would be ignored (or fail late): refuse them now."""
    from deepspeed.runtime import config as deepspeed_config_module

    reject = getattr(deepspeed_config_module, "_reject_removed_config_keys", None)  # DeepSpeed's own list
    try:
        if reject is not None:
            reject(config)
    except Exception as err:  # DeepSpeedConfigError
        raise HftuneError(f"the DeepSpeed config uses a removed option: {str(err).splitlines()[0]}") from None


def _check_batch_arithmetic(config, args, data_parallel):
    """Numbers in the JSON must be the ones TrainingArguments gives ("auto" always is)."""
    expected = {
        "train_micro_batch_size_per_gpu": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "train_batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps * data_parallel,
    }
    for key, value in expected.items():
        given = config.get(key, "auto")
        if given != "auto" and given != value:
            raise HftuneError(
                f"DeepSpeed {key} is {given} but the recipe gives {value} (per_device_train_batch_size "
                f"{args.per_device_train_batch_size} x gradient_accumulation_steps {args.gradient_accumulation_steps}"
                f" x {data_parallel} data-parallel processes); set {key} to \"auto\" in the JSON.")


def check_deepspeed(args):
    config = deepspeed_config(args)
    if config is None:
        if args.engine == "pipeline":
            raise HftuneError("engine: pipeline runs on DeepSpeed; launch with "
                              "--config_file accelerate_configs/deepspeed_pipeline.yaml.")
        return
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        raise HftuneError("this launch uses DeepSpeed, which is not installed: pip install 'hftune[deepspeed]'.") from None
    _check_one_owner(config)
    _check_removed_keys(config)
    pipelined, stage = "pipeline" in config, zero_stage(config)
    if pipelined and args.engine != "pipeline":
        raise HftuneError(f"the DeepSpeed config has a 'pipeline' block, which engine: {args.engine} would ignore; "
                          "set engine: pipeline (or drop the block).")
    if args.engine == "pipeline" and stage != 1 and args.do_train:
        # ZeRO-2/3 are rejected by DeepSpeed; without ZeRO, measured: gradient clipping drifts across stages.
        raise HftuneError(f"DeepSpeed pipeline parallelism needs ZeRO-1, the config asks for ZeRO-{stage}; "
                          "use deepspeed_configs/pipeline.json.")
    zero = config.get("zero_optimization") or {}
    offload = [(zero.get(k) or {}).get("device") for k in ("offload_optimizer", "offload_param")]
    if "nvme" in offload and not torch.cuda.is_available():
        raise HftuneError("NVMe offload (ZeRO-Infinity) needs GPUs; on this machine use "
                          "deepspeed_configs/zero3_offload.json (CPU offload).")
    _check_batch_arithmetic(config, args, max(1, launched_world_size() // max(1, pipeline_stages(args, config))))


def check_comm_hook(args):
    hook = args.ddp_comm_hook
    if hook is None:
        return
    if hook not in COMM_HOOKS:
        raise HftuneError(f"unknown ddp_comm_hook '{hook}'; choose one of {list(COMM_HOOKS)}.")
    if deepspeed_config(args) is not None or uses_fsdp(args):
        raise HftuneError("ddp_comm_hook applies to DDP only; under DeepSpeed set communication_data_type "
                          "in the JSON (see deepspeed_configs/zero2_comm_fp16.json).")
    if hook == "bf16" and not torch.cuda.is_available():
        raise HftuneError("ddp_comm_hook bf16 needs NCCL (GPUs); the gloo backend used on CPU cannot reduce bf16: "
                          "use fp16 or powersgd.")
    if hook == "powersgd" and (args.powersgd_rank < 1 or args.powersgd_start_iter < 2):
        raise HftuneError("powersgd needs powersgd_rank >= 1 and powersgd_start_iter >= 2 "
                          "(DDP's first iterations must be plain all-reduce).")
    if hook == "powersgd" and args.ddp_find_unused_parameters:
        raise HftuneError("powersgd deadlocks with ddp_find_unused_parameters: true; drop it.")


def check_launch_config(args):
    """What the config and the launcher's environment can tell before TrainingArguments sets up."""
    check_deepspeed(args)
    check_comm_hook(args)


def check_world_size(args):
    """After setup: the processes launched must be one job, not N unsynchronised copies."""
    launched = launched_world_size()
    if launched > 1 and args.world_size != launched:
        raise HftuneError(
            f"{launched} processes were launched but this run sees world size {args.world_size}: each would train "
            "alone on all the data. Drop use_cpu: false on a machine without GPUs (hftune then runs them over "
            "gloo), or launch 1 process.")
    if args.ddp_comm_hook and args.world_size == 1:
        raise HftuneError("ddp_comm_hook compresses DDP communication, which a 1-process run does not have; "
                          "launch with accelerate_configs/ddp.yaml or drop it.")


# may differ between processes: the process's own rank, a node's own disk and cache (save_on_each_node)
PER_PROCESS = ("local_rank", "output_dir", "logging_dir", "cache_dir")


def check_same_config(config, world_size):
    """Every process runs the same resolved config: a node started with other flags would train something
    else, or wait forever for a collective the others never reach."""
    if world_size == 1:
        return
    import torch.distributed as dist

    everyone = [None] * world_size
    dist.all_gather_object(everyone, config)
    for rank, theirs in enumerate(everyone):
        differ = sorted(k for k in everyone[0].keys() | theirs.keys()
                        if k not in PER_PROCESS and theirs.get(k) != everyone[0].get(k))
        if differ:
            raise HftuneError(f"process {rank} runs with {differ[0]}={theirs.get(differ[0])!r}, process 0 with "
                              f"{everyone[0].get(differ[0])!r}: every node's command must give the same config; fix "
                              "that node's command.")


def ddp_comm_kwargs(args):
    """DistributedDataParallelKwargs fields for the configured gradient compression (accelerate registers it)."""
    if args.ddp_comm_hook is None:
        return {}
    from accelerate.utils import DDPCommunicationHookType

    kwargs = {"comm_hook": DDPCommunicationHookType(COMM_HOOKS[args.ddp_comm_hook])}
    if args.ddp_comm_hook == "powersgd":
        kwargs["comm_state_option"] = {"matrix_approximation_rank": args.powersgd_rank,
                                       "start_powerSGD_iter": args.powersgd_start_iter}
        # Measured: with unused-parameter search on (Trainer's default for HF models) powerSGD hangs at its start.
        kwargs["find_unused_parameters"] = False
    return kwargs
