"""Engines run a TaskBundle: `trainer` (HF Trainer, the default), `accelerate` (a plain Accelerate
loop; FSDP2 on CPU) or `pipeline` (DeepSpeed pipeline parallelism). All take the same optimizer,
schedule, clipping and penalties from the config. Their fields and the checks that refuse, before
training, what an engine or launch cannot honour are in hftune.engines.checks; this module builds one.
Only the engines touch Accelerator, DeepSpeed and FSDP."""

import logging
import os

from hftune.data import is_stream, shuffle_stream
from hftune.errors import HftuneError
from hftune.training.optim import name_of, optimizer_spec, updates_per_epoch
from hftune.training.regularization import apply_batchnorm_policy

logger = logging.getLogger("hftune")


def resolve_full_batch(args, num_examples):
    """`gd`: accumulate over every batch of the epoch, so each optimizer step sees the whole set."""
    spec = optimizer_spec(args)
    if spec is not None and spec.full_batch:
        args.gradient_accumulation_steps = updates_per_epoch(num_examples, args)  # GA is 1 here: batches/epoch
        logger.info(f"optim {name_of(args.optim)}: one update per epoch, "
                    f"over {args.gradient_accumulation_steps} batches")


def check_resume(args, checkpoint):
    """Each engine resumes only its own checkpoints (their optimizer and RNG states differ in layout)."""
    if checkpoint is None:
        return
    written_by = "trainer"
    for engine, folder in (("accelerate", "engine_state"), ("pipeline", "pipeline_state")):
        if os.path.isdir(os.path.join(checkpoint, folder)):
            written_by = engine
    if written_by != args.engine:
        raise HftuneError(f"{checkpoint} was written by engine: {written_by}; resume it with engine: {written_by}, "
                          "or start fresh in another output_dir.")


def build_engine(bundle, args, checkpoint=None, teacher=None):
    """The engine `args.engine` names, ready to train/evaluate/save like a Trainer (distilling from
    `teacher`, a frozen model, when given)."""
    check_resume(args, checkpoint)
    if args.eval_strategy != "no" and bundle.eval_dataset is None:
        raise HftuneError(f"eval_strategy {name_of(args.eval_strategy)} needs a validation split; set "
                          "validation_file or validation_split_percentage > 0, or eval_strategy: no.")
    frozen = apply_batchnorm_policy(bundle.model, args.freeze_bn_stats, args.freeze_bn_affine)
    if frozen:
        logger.info(f"BatchNorm: {frozen} layers, running stats frozen={args.freeze_bn_stats}, "
                    f"affine frozen={args.freeze_bn_affine}")
    if is_stream(bundle.train_dataset):
        # Each process then reads its own rows of the stream (accelerate gives it its own shards, or its
        # slice of every global batch); left at None, accelerate's default for iterable data has rank 0
        # read every batch and send each process its slice.
        if args.accelerator_config.dispatch_batches is None:
            args.accelerator_config.dispatch_batches = False
        bundle.train_dataset = shuffle_stream(bundle.train_dataset, args)
    elif args.do_train and bundle.train_dataset is not None:
        resolve_full_batch(args, len(bundle.train_dataset))
    if args.engine == "accelerate":
        from hftune.engines.accelerate_loop import AccelerateEngine

        return AccelerateEngine(bundle, args, teacher)
    if args.engine == "pipeline":
        from hftune.engines.pipeline import PipelineEngine

        return PipelineEngine(bundle, args)
    from hftune.engines.trainer import build_trainer

    return build_trainer(bundle, args, teacher)
