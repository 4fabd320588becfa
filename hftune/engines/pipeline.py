"""The `pipeline` engine: DeepSpeed pipeline parallelism. The task's pretrained model is cut into a
sequence of layers (embedding, each transformer block, final norm, head), DeepSpeed's
PipelineModule places consecutive layers on `pipeline_stages` processes, and `train_batch()` runs
`gradient_accumulation_steps` micro-batches of `per_device_train_batch_size` through them. With more
processes than stages the rest is data parallelism (4 processes, 2 stages: 2 replicas).

    accelerate launch --config_file accelerate_configs/deepspeed_pipeline.yaml hftune/run.py \\
        --config causal_lm --engine pipeline

Supported models: see hftune/engines/pipeline_layers.py's FAMILIES (Llama and GPT-2 causal LMs, BERT
sequence classifiers), which also says how each is cut. `save_model` writes a normal HF checkpoint.
The optimizer and schedule come from hftune's registries, as in the other engines.
Differences from Trainer: an optimizer step always takes `gradient_accumulation_steps` full
micro-batches, so an epoch's last partial micro-batch and partial accumulation are dropped; each
micro-batch's mean loss counts equally; every data-parallel replica evaluates the whole
evaluation set (exact, simple; training is what runs in parallel); checkpoints hold DeepSpeed's
per-stage state in `pipeline_state/` beside the HF weights.
"""

import copy
import logging
import math
import os
import socket
import time

import datasets
import numpy as np
import torch
import torch.distributed as torch_dist
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, SequentialSampler
from transformers import default_data_collator, set_seed

from hftune.engines.loop import LoopEngine
from hftune.engines.pipeline_layers import causal_lm_loss, family_of
from hftune.errors import HftuneError
from hftune.training.guards import CAUSES
from hftune.launch.checks import deepspeed_config, pipeline_stages
from hftune.training.optim import build_optimizer, build_scheduler, describe_strategy

logger = logging.getLogger("hftune")
STATE_DIR = "pipeline_state"  # DeepSpeed's checkpoint tag inside checkpoint-N


# ---- configuration: refusals, stages, the DeepSpeed JSON ----

def check_stages(stages, world_size, num_layers):
    if stages < 1:
        raise HftuneError(f"pipeline_stages must be >= 1, got {stages}.")
    if num_layers < stages:
        raise HftuneError(f"the model has {num_layers} pipeline layers (embedding, blocks, norm, head), fewer than "
                          f"pipeline_stages={stages}; use at most {num_layers} stages.")
    if world_size % stages:
        raise HftuneError(f"{world_size} processes cannot be split into pipelines of {stages} stages; launch a "
                          f"multiple of {stages} processes or set pipeline_stages to a divisor of {world_size}.")


def _leftover_auto(config, prefix=""):
    for key, value in config.items():
        if isinstance(value, dict):
            yield from _leftover_auto(value, f"{prefix}{key}.")
        elif value == "auto" and f"{prefix}{key}" != "pipeline.stages":
            yield f"{prefix}{key}"


def fill_deepspeed_config(config, args, data_parallel):
    """The values TrainingArguments own (batch sizes, accumulation, clipping, precision) replace
    "auto"; hftune.launch.checks has already refused explicit ones that disagree, and the optimizer blocks."""
    micro, accumulation = args.per_device_train_batch_size, args.gradient_accumulation_steps
    owned = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": accumulation,
             "train_batch_size": micro * accumulation * data_parallel, "gradient_clipping": args.max_grad_norm}
    for key, value in owned.items():
        if config.get(key, "auto") == "auto":
            config[key] = value
    for precision in ("fp16", "bf16"):
        block = config.setdefault(precision, {})
        if block.get("enabled", "auto") == "auto":
            block["enabled"] = bool(getattr(args, precision))
    leftover = list(_leftover_auto(config))
    if leftover:
        raise HftuneError(f"the DeepSpeed config leaves {leftover} as \"auto\", which engine: pipeline cannot "
                          "fill; give them values.")
    config.setdefault("steps_per_print", 10**9)  # hftune logs the loss itself
    config["zero_allow_untested_optimizer"] = True  # hftune's registry optimizers are plain torch ones
    return config


def init_distributed():
    """One process per stage; a run started without a launcher is a world of one."""
    import deepspeed

    if not torch_dist.is_initialized() and "RANK" not in os.environ:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        for key, value in (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1), ("MASTER_ADDR", "127.0.0.1"),
                           ("MASTER_PORT", port)):
            os.environ.setdefault(key, str(value))
    # On a machine without GPU gloo carries the activations; DeepSpeed's default backend needs one.
    deepspeed.init_distributed(dist_backend=None if torch.accelerator.is_available() else "gloo")


# ---- the engine ----


class PipelineEngine(LoopEngine):
    """Trains, evaluates and saves a TaskBundle through a DeepSpeed pipeline; offers the Trainer
    methods run.py uses."""

    def __init__(self, bundle, args):
        if isinstance(bundle.train_dataset, datasets.IterableDataset):
            raise HftuneError("engine: pipeline samples each replica's rows from a loaded data set; drop streaming.")
        self.bundle, self.args, self.model = bundle, args, bundle.model
        self.family = family_of(self.model)
        packed = any(data is not None and "position_ids" in data.column_names
                     for data in (bundle.train_dataset, bundle.eval_dataset))
        layers = self.family.layers(self.model, packed)
        config = copy.deepcopy(deepspeed_config(args) or {})  # hftune.launch.checks refused a launch without one
        stages = pipeline_stages(args, config)
        check_stages(stages, args.world_size, len(layers))
        set_seed(args.seed)
        init_distributed()
        from deepspeed.pipe import PipelineModule

        partition = config.get("pipeline", {}).get("partition", "parameters")
        self._items = None  # the token count a training step's loss is divided by (set per step)
        loss = self.family.loss(self.model, lambda: self._items)
        self.module = PipelineModule(layers, num_stages=stages, loss_fn=loss,
                                     partition_method=partition, dynamic_shape=True)
        parts = self.module.parts
        if any(start == stop for start, stop in zip(parts, parts[1:])):
            raise HftuneError(f"partition '{partition}' leaves a pipeline stage without layers ({parts}); "
                              "use fewer stages or pipeline.partition: uniform in the DeepSpeed JSON.")
        self.grid = self.module.mpu()
        self.stages, self.data_parallel = stages, self.grid.get_data_parallel_world_size()
        self.ds_config = fill_deepspeed_config(config, args, self.data_parallel)
        self.engine = self.optimizer = self.lr_scheduler = None
        self._start_callbacks()
        logger.info(f"pipeline: {stages} stages x {self.data_parallel} data-parallel replicas, layers per stage "
                    f"{np.diff(parts).tolist()}, {args.gradient_accumulation_steps} micro-batches of "
                    f"{args.per_device_train_batch_size} per step")

    def is_world_process_zero(self):
        return self.args.process_index == 0

    def is_local_process_zero(self):
        return self.args.local_process_index == 0

    def _barrier(self):
        torch_dist.barrier()

    def _initialize(self, optimizer=None, lr_scheduler=None):
        import deepspeed

        config = self.ds_config
        if optimizer is None:  # evaluation only: ZeRO partitions optimizer state, and there is none
            config = {**config, "zero_optimization": {"stage": 0}}
        self.engine, self.optimizer, _, self.lr_scheduler = deepspeed.initialize(
            model=self.module, optimizer=optimizer, lr_scheduler=lr_scheduler, config=config)
        self.callback_handler.optimizer, self.callback_handler.lr_scheduler = self.optimizer, self.lr_scheduler

    @property
    def reads_data(self):
        """Only the first stage (inputs) and the last (labels) read batches."""
        stage = self.grid.get_stage_id()
        return stage == 0 or stage == self.stages - 1

    # ---- data ----

    def _to_pipe(self, batch):
        """A collated batch as DeepSpeed's ((first stage's inputs), labels)."""
        ids = batch["input_ids"]
        defaults = {"attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids),
                    "position_ids": torch.arange(ids.shape[1]).expand_as(ids)}
        inputs = tuple(batch[k] if batch.get(k) is not None else defaults[k] for k in self.family.inputs)
        return inputs, batch["labels"]

    def _loader(self, dataset, batches):
        return DataLoader(dataset, batch_sampler=batches, collate_fn=self.bundle.data_collator or default_data_collator,
                          num_workers=self.args.dataloader_num_workers, pin_memory=self.args.dataloader_pin_memory)

    def _train_batches(self, epoch):
        """This replica's micro-batches of one epoch: a distinct share of the rows on each replica."""
        args = self.args
        sampler = DistributedSampler(
            self.bundle.train_dataset, num_replicas=self.data_parallel, rank=self.grid.get_data_parallel_rank(),
            shuffle=args.train_sampling_strategy == "random", drop_last=True,
            seed=args.data_seed if args.data_seed is not None else args.seed)
        sampler.set_epoch(epoch)
        return list(BatchSampler(sampler, args.per_device_train_batch_size, drop_last=True))

    def _micro_batches(self, epoch, skip):
        if not self.reads_data:
            return None  # middle stages receive activations only
        return map(self._to_pipe, iter(self._loader(self.bundle.train_dataset, self._train_batches(epoch)[skip:])))

    # ---- training ----

    def _setup_training(self):
        args = self.args
        per_epoch = len(self._train_batches(0)) // args.gradient_accumulation_steps
        if per_epoch == 0:
            raise HftuneError(f"one pipeline step takes {args.gradient_accumulation_steps} micro-batches of "
                              f"{args.per_device_train_batch_size} per replica, more than the training set holds; "
                              "lower per_device_train_batch_size or gradient_accumulation_steps.")
        max_steps, epochs = self._plan(per_epoch)
        optimizer = self._fill_empty_groups(build_optimizer(self.module, args))  # this stage's parameters only
        for line in describe_strategy(self.module, optimizer, args):
            logger.info(line)
        self._initialize(optimizer, build_scheduler(optimizer, args, max_steps, per_epoch))
        self._tr_loss, self._bad_in_a_row = 0.0, 0
        return per_epoch, max_steps, epochs

    def _fill_empty_groups(self, optimizer):
        """ZeRO all-reduces the gradient norm across stages once per parameter group, so every stage
        needs the same groups (DeepSpeed drops empty ones, and the stages then hang): a stage without
        norm weights or biases (an embedding alone) gets a one-element placeholder in its no-decay
        group. It takes no part in the forward pass: its gradient is zero and it stays zero."""
        device = next(self.module.parameters()).device
        for index, group in enumerate(optimizer.param_groups):
            if not group["params"]:
                placeholder = nn.Parameter(torch.zeros(1, device=device))
                self.module.register_parameter(f"group_{index}_placeholder", placeholder)
                group["params"].append(placeholder)
        return optimizer

    def _load_checkpoint(self, checkpoint):
        """Stage weights, optimizer and schedule from checkpoint-N."""
        path, _ = self.engine.load_checkpoint(checkpoint, tag=STATE_DIR)
        if path is None:
            raise HftuneError(f"{checkpoint} holds no {STATE_DIR}/ written by engine: pipeline; start fresh.")

    def _epoch_updates(self, epoch, steps_done, per_epoch):
        """This epoch's steps after the first `steps_done`, each the micro-batch iterator that
        train_batch() draws gradient_accumulation_steps from (None on middle stages)."""
        batches = self._micro_batches(epoch, steps_done * self.args.gradient_accumulation_steps)
        return self._steps(batches, steps_done, per_epoch)

    def _steps(self, batches, steps_done, per_epoch):
        for step in range(steps_done, per_epoch):
            if self.state.global_step >= self.state.max_steps:
                return
            yield batches, (step + 1) / per_epoch

    def _update(self, batches):
        self._learning_rate = self.engine.get_lr()[0]  # the rate this step uses (DeepSpeed steps the schedule)
        if batches is not None:  # the first and last stages: the step's micro-batches, counted first
            micro_batches = [next(batches) for _ in range(self.args.gradient_accumulation_steps)]
            self._items = self._step_items(micro_batches) if self.family.loss is causal_lm_loss else None
            batches = iter(micro_batches)
        try:
            self._tr_loss += self.engine.train_batch(batches).item()  # mean over micro-batches and replicas
        finally:
            self._items = None
        self._grad_norm = self.engine.get_global_grad_norm()
        self._guard(self._grad_norm)

    def _step_items(self, micro_batches):
        """As Trainer's num_items_in_batch: the labelled tokens (after the causal shift) of the step's
        micro-batches, summed over the data-parallel replicas; divided by the micro-batches and replicas
        DeepSpeed averages over. Blocks whose texts are kept apart, and chat rows, differ in labelled
        tokens from one micro-batch to the next: a per-micro-batch mean would weight their tokens unequally."""
        import torch.distributed as dist

        count = sum((labels[..., 1:] != -100).sum() for _, labels in micro_batches).to(torch.float64)
        if self.data_parallel > 1:
            dist.all_reduce(count, group=self.grid.get_data_parallel_group())
        return count / (self.args.gradient_accumulation_steps * self.data_parallel)
        self._grad_norm = self.engine.get_global_grad_norm()
        self._guard(self._grad_norm)

    def _pop_loss(self):
        loss, self._tr_loss = self._tr_loss, 0.0
        return loss

    def _guard(self, grad_norm):
        """ZeRO skips an update whose gradient holds NaN/inf (the norm then reads inf); as the other
        engines' guard does, the run stops after max_nonfinite_steps such steps in a row (at the first
        with skip_nonfinite_steps: false). fp16's loss scaler expects overflows: no guard there."""
        args = self.args
        if args.max_nonfinite_steps == 0 or args.fp16 or grad_norm is None or math.isfinite(grad_norm):
            self._bad_in_a_row = 0
            return
        self._bad_in_a_row += 1
        message = (f"non-finite gradient (NaN or inf) at step {self.state.global_step + 1}; likely causes: "
                   f"{'; '.join(CAUSES)}")
        if not args.skip_nonfinite_steps or self._bad_in_a_row >= args.max_nonfinite_steps:
            raise HftuneError(f"{message}. Stopped after {self._bad_in_a_row} such step(s) in a row; "
                              "the last checkpoint in output_dir predates them.")
        if self.is_world_process_zero():
            logger.warning(f"{message}; DeepSpeed skipped this update ({self._bad_in_a_row} in a row).")

    def _samples_trained(self, steps, max_steps, epochs):
        args = self.args
        return steps * args.per_device_train_batch_size * args.gradient_accumulation_steps * self.data_parallel

    # ---- evaluation, saving ----

    def evaluate(self, eval_dataset=None, metric_key_prefix="eval"):
        """Loss (and the task's metrics) over the whole set; computed on the last stage, sent to every rank."""
        dataset = self.bundle.eval_dataset if eval_dataset is None else eval_dataset
        if self.engine is None:  # evaluation without training
            self._initialize()
        batches = list(BatchSampler(SequentialSampler(dataset), self.args.per_device_eval_batch_size, False))
        loader = iter(self._loader(dataset, batches)) if self.reads_data else None
        start, losses, sizes, logits, labels = time.time(), [], [], [], []
        for _ in batches:
            batch = self._to_pipe(next(loader)) if loader is not None else None
            loss, outputs = self.engine.eval_batch(iter([batch]), return_logits=True, reduce_output=None,
                                                   bcast_loss=False, num_micro_batches=1)
            if self.grid.get_stage_id() == self.stages - 1:
                losses.append(loss[0].float().item())
                sizes.append(len(batch[1]))
                if self.bundle.compute_metrics is not None:
                    logits.append(outputs.float().cpu())
                    labels.append(batch[1].cpu())
        metrics = self._eval_metrics(losses, sizes, logits, labels, metric_key_prefix)
        return self._report_evaluation(metrics, metric_key_prefix, start, len(dataset), len(batches))

    def _eval_metrics(self, losses, sizes, logits, labels, prefix):
        """Example-weighted mean loss, as Trainer's, from the last stage of replica 0 to all ranks."""
        metrics = {}
        if losses:
            metrics = self._task_metrics(logits, labels, prefix)
            metrics[f"{prefix}_loss"] = float(np.average(losses, weights=sizes))
        shared = [metrics]
        torch_dist.broadcast_object_list(shared, src=self.grid.stage_to_global(stage_id=self.stages - 1, data=0))
        return shared[0]

    def _gather_weights(self):
        """On rank 0, the HF model's parameters as the stages hold them now (the first stage's copy
        of a tied embedding wins; the copies are equal)."""
        local = {id(p) for p in self.module.parameters()}
        mine = {}
        if self.grid.get_data_parallel_rank() == 0:  # replicas hold equal weights
            mine = {n: p.detach().cpu() for n, p in self.model.named_parameters() if id(p) in local}
        gathered = [None] * torch_dist.get_world_size() if self.is_world_process_zero() else None
        torch_dist.gather_object(mine, gathered, dst=0)
        if not self.is_world_process_zero():
            return None
        merged = {}
        for part in gathered:
            for name, tensor in part.items():
                merged.setdefault(name, tensor)
        return merged

    def save_model(self, output_dir=None):
        """A plain HF checkpoint (safetensors + config + processor) that from_pretrained loads."""
        output_dir = output_dir or self.args.output_dir
        weights = self._gather_weights()
        if weights is None:
            return
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, tensor in weights.items():
                params[name].copy_(tensor)  # only other stages' layers change on rank 0
        self.model.save_pretrained(output_dir)
        if self.bundle.processor is not None:
            self.bundle.processor.save_pretrained(output_dir)

    def _save_checkpoint_files(self, path):
        self.engine.save_checkpoint(path, tag=STATE_DIR)  # every rank writes its stage and optimizer shard
        self.save_model(path)
