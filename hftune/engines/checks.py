"""The engine fields (engine, pipeline stages, DDP communication hooks) and every check of the
training strategy against the engine and launch that can run on the config alone, while
TrainingArguments parses (before its own checks, which need DeepSpeed installed)."""

import logging
import os
from dataclasses import dataclass, field

from hftune.compression.pruning import check_pruning
from hftune.errors import HftuneError
from hftune.launch.checks import check_launch_config, fsdp_launch, shards_parameters, uses_deepspeed
from hftune.training.optim import SCHEDULES, check_strategy, name_of, optimizer_spec

logger = logging.getLogger("hftune")


@dataclass
class TrainingFields:
    """Which engine runs the training, and how its processes talk."""

    engine: str = field(
        default="trainer",
        metadata={"help": "trainer (HF Trainer), accelerate (a plain Accelerate loop; needed for lbfgs) or "
                          "pipeline (DeepSpeed pipeline parallelism; launch with accelerate_configs/deepspeed_pipeline.yaml)."},
    )
    pipeline_stages: int = field(
        default=None,
        metadata={"help": "engine: pipeline: number of pipeline stages (default: the DeepSpeed config's, else all "
                          "processes); the remaining factor of the world size is data parallelism."},
    )
    ddp_comm_hook: str = field(
        default=None,
        metadata={"help": "Compress DDP gradient communication: fp16, bf16 (NCCL only) or powersgd."},
    )
    powersgd_rank: int = field(default=1, metadata={"help": "ddp_comm_hook powersgd: rank of the low-rank approximation."})
    powersgd_start_iter: int = field(
        default=1000, metadata={"help": "ddp_comm_hook powersgd: plain all-reduce until this iteration (warm start)."}
    )


ENGINES = ("trainer", "accelerate", "pipeline")


def _check_closure_optimizer(args, name):
    """A line search re-evaluates the loss on one batch with the true gradient."""
    if args.engine != "accelerate":
        raise HftuneError(f"optim {name} needs engine: accelerate "
                          "(Trainer's loop cannot pass a closure to optimizer.step).")
    problems = {
        "gradient_accumulation_steps > 1": args.gradient_accumulation_steps > 1,
        "max_grad_norm > 0 (TrainingArguments' default is 1.0; set max_grad_norm: 0)": args.max_grad_norm > 0,
        "max_grad_value": bool(args.max_grad_value),
        "fp16 (the loss scaler cannot wrap a closure)": args.fp16,
        "DeepSpeed": uses_deepspeed(args),
    }
    for problem, present in problems.items():
        if present:
            raise HftuneError(f"optim {name} cannot run with {problem}; "
                              "its line search needs the true gradient of one batch.")


# TrainingArguments features only Trainer's loop implements: set under engine: accelerate, they are refused.
# (push_to_hub works with every engine: hftune pushes at the end, hftune/results/hub.py; pushes at each save are Trainer's.)
TRAINER_ONLY = ("load_best_model_at_end", "torch_compile", "eval_on_start", "auto_find_batch_size",
                "neftune_noise_alpha", "deepspeed", "fsdp", "save_only_model", "include_for_metrics",
                "include_num_input_tokens_seen", "fp16_full_eval", "bf16_full_eval", "torch_empty_cache_steps")
UNSET = (None, False, "", "no", [], {})
ACCELERATE_SAMPLING = ("random", "sequential", "group_by_length")


def _check_accelerate_engine(args):
    from hftune.engines.fsdp import check_fsdp

    # An FSDP launch runs on this engine only (choose_engine_for_fsdp): Trainer is no remedy there.
    trainer_only = "is implemented by Trainer's loop only"
    use_trainer, needs_trainer = "use engine: trainer or ", "needs engine: trainer"
    if fsdp_launch():
        trainer_only += ", which does not run FSDP launches (hftune shards them itself)"
        use_trainer, needs_trainer = "", trainer_only
    for name in TRAINER_ONLY:
        if getattr(args, name, None) not in UNSET:
            raise HftuneError(f"{name} {trainer_only}; {use_trainer}drop {name}.")
    if args.train_sampling_strategy not in ACCELERATE_SAMPLING:
        raise HftuneError(f"engine: accelerate supports train_sampling_strategy {list(ACCELERATE_SAMPLING)}.")
    if args.save_strategy == "best":
        raise HftuneError(f"save_strategy: best {needs_trainer}; use steps or epoch.")
    if uses_deepspeed(args):
        raise HftuneError("engine: accelerate runs single-device, DDP and FSDP launches; "
                          "use engine: trainer for DeepSpeed.")
    if name_of(args.lr_scheduler_type) == "greedy":
        raise HftuneError(f"lr_scheduler_type greedy {needs_trainer}; reduce_on_plateau works in both engines.")
    if fsdp_launch() and getattr(optimizer_spec(args), "needs_closure", False):
        raise HftuneError(f"optim {name_of(args.optim)} cannot run under FSDP: its line search works on whole "
                          "gradients, FSDP shards them; launch with accelerate_configs/ddp.yaml.")
    if fsdp_launch():
        check_fsdp(args)


NOT_IN_PIPELINE = {
    "label_smoothing_factor": "label smoothing", "l1_lambda": "L1 penalties", "l2_lambda": "L2 penalties",
    "early_stopping_patience": "early stopping", "max_grad_value": "clipping by value",
    "activation_checkpointing": "activation checkpointing (set pipeline.activation_checkpoint_interval "
                                "in the DeepSpeed JSON instead)",
}


def check_pipeline_args(args):
    """What this engine cannot honour, refused while the config is parsed (check_training_strategy)."""
    for name in TRAINER_ONLY:
        if name != "deepspeed" and getattr(args, name, None) not in UNSET:
            raise HftuneError(f"{name} is implemented by Trainer's loop only; use engine: trainer or drop {name}.")
    for name, what in NOT_IN_PIPELINE.items():
        if getattr(args, name, None) not in (*UNSET, 0, 0.0):
            raise HftuneError(f"engine: pipeline does not support {what}; drop {name} or use engine: trainer.")
    if args.max_grad_norm_type != 2:
        raise HftuneError("engine: pipeline clips with DeepSpeed's 2-norm; drop max_grad_norm_type.")
    if args.train_sampling_strategy not in ("random", "sequential"):
        raise HftuneError("engine: pipeline supports train_sampling_strategy random or sequential.")
    schedule = name_of(args.lr_scheduler_type)
    if (schedule in SCHEDULES and SCHEDULES[schedule].on_metric) or schedule in ("reduce_lr_on_plateau", "greedy"):
        raise HftuneError(f"lr_scheduler_type {schedule} steps on evaluations, which DeepSpeed's pipeline "
                          "cannot do; use a per-step schedule (linear, cosine, ...).")
    if args.save_strategy == "best":
        raise HftuneError("save_strategy: best needs engine: trainer; use steps or epoch.")


def choose_engine_for_fsdp(args):
    """Every FSDP launch runs on engine: accelerate, which applies FSDP2 itself (hftune/engines/fsdp.py),
    on GPUs and without them alike. Trainer would go through accelerate's FSDP path, which without
    GPUs silently trains plain DDP (every process holding the whole model) and with GPUs fails on
    BERT-style encoders."""
    if args.fsdp not in UNSET:
        raise HftuneError("the recipe's fsdp is Trainer's FSDP, which hftune does not run (without GPUs it trains "
                          "plain DDP); drop it and launch with --config_file accelerate_configs/fsdp.yaml.")
    if fsdp_launch() and args.engine == "trainer":
        args.engine = "accelerate"
        if os.environ.get("RANK", "0") == "0":  # one line per launch, not per process
            logger.warning("FSDP launch: using engine: accelerate, which shards the model with FSDP2 itself "
                           "(the same code with GPUs and without; Trainer's FSDP path is not used).")


def check_training_strategy(args):
    """Everything about the strategy that can be checked from the config alone."""
    if args.engine not in ENGINES:
        raise HftuneError(f"unknown engine '{args.engine}'; choose one of {list(ENGINES)}.")
    choose_engine_for_fsdp(args)
    check_pruning(args)  # before the launch checks: it refuses DeepSpeed, FSDP and pipeline outright
    check_strategy(args)
    check_launch_config(args)
    if args.engine == "accelerate":
        _check_accelerate_engine(args)
    if args.engine == "pipeline":
        check_pipeline_args(args)
    for name in ("l1_lambda", "l2_lambda", "early_stopping_threshold", "max_nonfinite_steps"):
        if getattr(args, name) < 0:
            raise HftuneError(f"{name} must be >= 0, got {getattr(args, name)}.")
    if args.max_grad_value is not None and args.max_grad_value <= 0:
        raise HftuneError(f"max_grad_value must be > 0, got {args.max_grad_value}; "
                          "drop it to turn clipping by value off.")
    if args.max_grad_norm_type <= 0:
        raise HftuneError(f"max_grad_norm_type must be > 0 (2 for the Euclidean norm, inf for the max), "
                          f"got {args.max_grad_norm_type}.")
    if args.early_stopping_patience is not None and (args.early_stopping_patience < 1 or args.eval_strategy == "no"):
        raise HftuneError("early_stopping_patience needs a value >= 1 and an eval_strategy (steps or epoch).")
    if name_of(args.lr_scheduler_type) == "reduce_on_plateau" and args.eval_strategy == "no":
        raise HftuneError("lr_scheduler_type reduce_on_plateau steps on evaluations; "
                          "set eval_strategy: steps or epoch.")
    if args.regularize != "weights" and not (args.l1_lambda or args.l2_lambda):
        raise HftuneError(f"regularize '{args.regularize}' chooses what l1_lambda/l2_lambda penalise, and both are 0; "
                          "set one of them, or drop regularize.")
    if (args.l1_lambda or args.l2_lambda) and shards_parameters(args):
        raise HftuneError("l1_lambda/l2_lambda need whole parameters on every process; FSDP and ZeRO-3 shard them "
                          "(use ZeRO-1/2 or DDP, or weight_decay).")
    spec, name = optimizer_spec(args), name_of(args.optim)
    if spec is not None and spec.needs_closure:
        _check_closure_optimizer(args, name)
    if spec is not None and spec.full_batch and args.gradient_accumulation_steps != 1:
        raise HftuneError(f"optim {name} accumulates over the whole training set itself; "
                          "drop gradient_accumulation_steps.")
    if uses_deepspeed(args):
        if args.max_grad_value:
            raise HftuneError("max_grad_value cannot be honoured under DeepSpeed (it owns the gradients); "
                              "use max_grad_norm.")
        if args.max_grad_norm_type != 2:
            raise HftuneError("DeepSpeed's gradient_clipping is a 2-norm; drop max_grad_norm_type or use DDP/FSDP.")


check_training = check_training_strategy  # runs while TrainingArguments parses (hftune.features)
