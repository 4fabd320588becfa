"""The `accelerate` engine: a plain Accelerate loop (prepare, accumulate, backward, clip, step,
schedule, evaluate, save) for what Trainer's loop cannot do, such as closure-based optimizers.

It takes its optimizer, schedule, clipping and penalties from the same registries as the Trainer
engine, and drives Trainer's own callbacks (flow, progress bar, trackers, early stopping), so a
run logs the same lines and writes the same trainer_state.json. Same recipe and seed on one
process: the same losses and learning rates as `engine: trainer`.
A causal LM's loss weighs every labelled token of an update alike across micro-batches and processes,
as Trainer does (average_tokens_across_devices); other tasks' micro-batch means count equally.
Differences from Trainer: checkpoints hold the model plus `engine_state/` from `Accelerator.save_state`.
FSDP (every fsdp.yaml launch, with GPUs or without): the engine shards the model itself with FSDP2
(hftune/engines/fsdp.py) before building the optimizer; model and optimizer stay out of `prepare`.
"""

import inspect
import logging
import math
import os
import time
from contextlib import nullcontext
from functools import partial
from itertools import islice

import numpy as np
import torch
from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler
from transformers import PreTrainedModel, default_data_collator, enable_full_determinism, set_seed
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.trainer_pt_utils import LabelSmoother, LengthGroupedSampler
from transformers.trainer_utils import seed_worker, unwrap_peft_model
from transformers.utils import find_labels

from hftune.compression.distillation import distiller_for, task_logits
from hftune.engines.fsdp import fsdp_for
from hftune.engines.loop import LoopEngine
from hftune.training.guards import guard_for
from hftune.training.optim import (
    WarmupReduceLROnPlateau, build_optimizer, build_scheduler, describe_strategy, optimizer_spec,
)
from hftune.launch.checks import ddp_comm_kwargs
from hftune.compression.pruning import pruning_callback
from hftune.training.regularization import clip_grad_value_, early_stopping_callback, penalties_for
from hftune.training.sampling import shuffle_batches
from hftune.results.throughput import ThroughputCallback

logger = logging.getLogger("hftune")
ENGINE_STATE = "engine_state"  # Accelerator.save_state's folder inside checkpoint-N
SCHEDULER_STATE = "hftune_scheduler.pt"  # the lr schedule's state_dict, in ENGINE_STATE (read with weights_only)


def accepts_loss_kwargs(model):
    """Whether the model's forward takes num_items_in_batch, decided as Trainer decides it."""
    if hasattr(model, "accepts_loss_kwargs"):
        return model.accepts_loss_kwargs
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(model.forward).parameters.values())


def make_accelerator(args, is_hf_model=True):
    """An Accelerator configured from TrainingArguments the way Trainer configures its own."""
    config = args.accelerator_config.to_dict()
    dataloader_config = DataLoaderConfiguration(
        split_batches=config["split_batches"], dispatch_batches=config["dispatch_batches"],
        even_batches=config["even_batches"], use_seedable_sampler=config["use_seedable_sampler"],
        data_seed=args.data_seed,
    )
    dataloader_config.non_blocking = config["non_blocking"]
    find_unused = not args.activation_checkpointing if is_hf_model else True  # Trainer's default
    ddp = {"find_unused_parameters": find_unused if args.ddp_find_unused_parameters is None
           else args.ddp_find_unused_parameters}
    for name in ("bucket_cap_mb", "broadcast_buffers", "static_graph"):
        if getattr(args, f"ddp_{name}") is not None:
            ddp[name] = getattr(args, f"ddp_{name}")
    ddp.update(ddp_comm_kwargs(args))
    return Accelerator(cpu=args.use_cpu, mixed_precision=args.mixed_precision, dataloader_config=dataloader_config,
                       kwargs_handlers=[DistributedDataParallelKwargs(**ddp)])


PREDICTED = ("logits", "start_logits", "end_logits")  # the outputs evaluation gathers (a span model has two)


class AccelerateEngine(LoopEngine):
    """Trains, evaluates and saves a TaskBundle; offers the Trainer methods run.py uses."""

    def __init__(self, bundle, args, teacher=None):
        self.bundle, self.args = bundle, args
        # Trainer reseeds here too, so both engines draw the same data order and dropout masks.
        enable_full_determinism(args.seed) if args.full_determinism else set_seed(args.seed)
        self.accelerator = make_accelerator(args, isinstance(bundle.model, PreTrainedModel))
        self.fsdp = fsdp_for(self.accelerator)  # None unless an FSDP launch: then the model stays out of prepare
        self.model = bundle.model
        # what evaluation scores against, as Trainer finds it: `labels`, or a span model's start/end positions
        self.label_names = args.label_names or find_labels(type(unwrap_peft_model(self.model))) or ["labels"]
        # the class under a peft wrapper (PeftModelForCausalLM is no causal-LM class name)
        self.is_causal = type(unwrap_peft_model(self.model)).__name__ in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
        self.weigh_tokens = self.is_causal and accepts_loss_kwargs(unwrap_peft_model(self.model))
        self.label_smoother = LabelSmoother(args.label_smoothing_factor) if args.label_smoothing_factor else None
        self.penalties = penalties_for(self.model, args)
        self.distiller = distiller_for(teacher, args, self.accelerator)
        self.guard = guard_for(args, self.accelerator)
        self.needs_closure = getattr(optimizer_spec(args), "needs_closure", False)
        self.optimizer = self.lr_scheduler = None
        self._start_callbacks(early_stopping_callback(args),
                              pruning_callback(self.model, args, bundle.train_dataset if args.do_train else None),
                              ThroughputCallback(self.model, self.accelerator, bundle.data_collator))

    def is_world_process_zero(self):
        return self.accelerator.is_main_process

    def is_local_process_zero(self):
        return self.accelerator.is_local_main_process

    def _barrier(self):
        self.accelerator.wait_for_everyone()

    # ---- data ----

    def _train_sampler(self, dataset):
        strategy = self.args.train_sampling_strategy
        if strategy == "group_by_length":
            return shuffle_batches(LengthGroupedSampler(
                self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps, dataset=dataset,
                model_input_name=self.bundle.processor.model_input_names[0]))
        return SequentialSampler(dataset) if strategy == "sequential" else RandomSampler(dataset)

    def _eval_sampler(self, dataset):
        if self.args.train_sampling_strategy == "group_by_length":  # as Trainer: batches of similar length
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            return LengthGroupedSampler(self.args.per_device_eval_batch_size, dataset=dataset,
                                        model_input_name=self.bundle.processor.model_input_names[0],
                                        generator=torch.Generator().manual_seed(seed))
        return SequentialSampler(dataset)

    def _dataloader(self, dataset, training):
        args = self.args
        loader = DataLoader(
            dataset, batch_size=args.per_device_train_batch_size if training else args.per_device_eval_batch_size,
            sampler=self._train_sampler(dataset) if training else self._eval_sampler(dataset),
            collate_fn=self.bundle.data_collator or default_data_collator, num_workers=args.dataloader_num_workers,
            # evaluation sees every example (Trainer drops an eval set's last partial batch too)
            pin_memory=args.dataloader_pin_memory, drop_last=args.dataloader_drop_last and training,
            persistent_workers=args.dataloader_persistent_workers, prefetch_factor=args.dataloader_prefetch_factor,
            worker_init_fn=partial(seed_worker, num_workers=args.dataloader_num_workers, rank=args.process_index)
            if training else None,
        )
        return self.accelerator.prepare(loader)

    # ---- one optimizer step ----

    def compute_loss(self, model, batch, num_items_in_batch=None):
        """The model's loss (label-smoothed like Trainer's when asked); returns (loss, outputs). With
        num_items_in_batch: the sum over this batch's labelled tokens divided by it, as in Trainer."""
        kwargs = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
        if self.label_smoother is not None and "labels" in batch:
            batch = dict(batch)
            labels = batch.pop("labels")
            outputs = model(**batch)
            return self.label_smoother(outputs, labels, shift_labels=self.is_causal, **kwargs), outputs
        outputs = model(**batch, **kwargs)
        return outputs["loss"], outputs

    def _labelled_tokens(self, micro_batches):
        """A causal LM's predicted tokens in one update on all processes, counted as Trainer counts
        them (labels[..., 1:], or shift_labels); None where the micro-batch means count equally."""
        if not (self.weigh_tokens and "labels" in micro_batches[0]):
            return None
        count = sum((b["shift_labels"] if "shift_labels" in b else b["labels"][..., 1:]).ne(-100).sum()
                    for b in micro_batches)
        return self.accelerator.reduce(count, "sum") if self.args.average_tokens_across_devices else count

    def _backward(self, micro_batches):
        """Forward/backward over the micro-batches of one update; DDP syncs on the last only."""
        tokens = self._labelled_tokens(micro_batches)
        for i, batch in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            with nullcontext() if last else self._no_sync():
                loss = self._training_loss(batch, tokens, len(micro_batches))
                self.accelerator.backward(loss)
            self._add_to_logged_loss(loss.detach())

    def _training_loss(self, batch, tokens=None, accumulation=1):
        """This micro-batch's share of the update's loss: the task loss (over `tokens` labelled tokens
        of the update when given, else a micro-batch mean), mixed with the teacher's distillation term,
        plus the penalties once per update."""
        loss, outputs = self.compute_loss(self.model, batch, tokens)
        scaled = tokens is not None
        if scaled and self.args.average_tokens_across_devices:
            # DDP and FSDP average gradients over processes; Trainer multiplies the loss back the same way
            loss = loss * self.accelerator.num_processes
            tokens = tokens / self.accelerator.num_processes
        if self.distiller is not None:
            loss = self.distiller.mix(loss, task_logits(outputs), batch, batch.get("labels"), num_items=tokens,
                                      accumulation=accumulation, scaled=scaled)
        loss = self.penalties.add_to(loss, 1 / accumulation if scaled else 1.0)
        return loss if scaled else loss / accumulation

    def _no_sync(self):
        return self.fsdp.no_sync(self.model) if self.fsdp else self.accelerator.no_sync(self.model)

    def _add_to_logged_loss(self, loss):
        if self.args.logging_nan_inf_filter and not torch.isfinite(loss):
            # as Trainer: a non-finite loss counts as the mean of the losses since the last log line
            loss = self._tr_loss / (1 + self.state.global_step - self._last_logged)
        self._tr_loss += loss

    def _pop_loss(self):
        loss = self.accelerator.reduce(self._tr_loss, "mean").item()
        self._tr_loss.zero_()
        return loss

    def _closure_step(self, batch):
        """Line-search optimizers (lbfgs) re-evaluate loss and gradient as often as they need."""
        losses = []

        def closure():
            self.optimizer.zero_grad()
            loss = self._training_loss(batch)
            self.accelerator.backward(loss)
            losses.append(self.accelerator.reduce(loss.detach(), "mean"))  # all ranks decide alike
            return losses[-1]

        self.callback_handler.on_pre_optimizer_step(self.args, self.state, self.control)
        self.optimizer.step(closure)  # Accelerate's wrapper drops step()'s return value
        self._add_to_logged_loss(losses[0])  # the loss before the step, as for every other optimizer
        self._grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), float("inf"))

    def _gradient_step(self, micro_batches):
        self._backward(micro_batches)
        args, params = self.args, self.model.parameters()
        if args.max_grad_norm > 0:
            self._grad_norm = self.accelerator.clip_grad_norm_(params, args.max_grad_norm, args.max_grad_norm_type)
        else:  # the norm is logged either way, as Trainer does
            self._grad_norm = self.accelerator.clip_grad_norm_(params, float("inf"))
        if hasattr(self._grad_norm, "full_tensor"):  # FSDP: a replicated DTensor; the guard wants a tensor
            self._grad_norm = self._grad_norm.full_tensor()
        if self.guard is not None:  # a skipped update leaves no gradient, so optimizer.step() passes over it
            self.guard.check(self.model.parameters(), self.state.global_step + 1, self._grad_norm)
        clip_grad_value_(self.model.parameters(), args.max_grad_value)  # gradients are unscaled by now
        self.callback_handler.on_pre_optimizer_step(args, self.state, self.control)
        self.optimizer.step()

    def _update(self, micro_batches):
        self.model.train()
        if self.needs_closure:
            self._closure_step(micro_batches[0])
        else:
            self._gradient_step(micro_batches)
        self.control = self.callback_handler.on_optimizer_step(self.args, self.state, self.control)
        self._learning_rate = self.optimizer.param_groups[0]["lr"]  # the rate this step used
        if not self.accelerator.optimizer_step_was_skipped:
            if isinstance(self.lr_scheduler, WarmupReduceLROnPlateau):
                self.lr_scheduler.warmup_step()
            elif not isinstance(self.lr_scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                self.lr_scheduler.step()
        self.optimizer.zero_grad()

    # ---- training ----

    def _setup_training(self):
        """Loader, optimizer, schedule and step counts, as Trainer computes them."""
        args = self.args
        self._train_loader = self._dataloader(self.bundle.train_dataset, training=True)
        per_epoch = max(1, math.ceil(len(self._train_loader) / args.gradient_accumulation_steps))
        max_steps, epochs = self._plan(per_epoch)
        if args.activation_checkpointing:  # as Trainer: two keys select layers, the rest go to torch
            kwargs = dict(args.activation_checkpointing_kwargs or {})
            self.model.activation_checkpointing_enable(
                activation_checkpointing_kwargs=kwargs or None, every_n_layers=kwargs.pop("every_n_layers", 1),
                offload=kwargs.pop("offload", False))
        if self.fsdp:  # before the optimizer, which must hold the sharded parameters
            self.model = self.fsdp.shard(self.model)
        self.optimizer = build_optimizer(self.model, args)
        for line in describe_strategy(self.model, self.optimizer, args, self.penalties):
            logger.info(line)
        self.lr_scheduler = build_scheduler(self.optimizer, args, max_steps, per_epoch)
        if not self.fsdp:  # prepare would wrap (or re-shard) the sharded model; the raw optimizer is saved by fsdp
            self.model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        # Not register_for_checkpointing: accelerate reads registered states back with an unrestricted pickle
        # (load_custom_state: torch.load(weights_only=False)); the schedule's state is saved beside instead.
        self.callback_handler.model, self.callback_handler.optimizer = self.model, self.optimizer
        self.callback_handler.lr_scheduler = self.lr_scheduler
        self._tr_loss = torch.tensor(0.0, device=self.accelerator.device)
        return per_epoch, max_steps, epochs

    def _load_checkpoint(self, checkpoint):
        """Model, optimizer, schedule and RNG states from checkpoint-N."""
        self.accelerator.load_state(os.path.join(checkpoint, ENGINE_STATE))
        self.lr_scheduler.load_state_dict(
            torch.load(os.path.join(checkpoint, ENGINE_STATE, SCHEDULER_STATE), map_location="cpu", weights_only=True))
        if self.fsdp:
            self.fsdp.load_state(self.model, self.optimizer, os.path.join(checkpoint, ENGINE_STATE))

    def _epoch_updates(self, epoch, steps_done, per_epoch):
        """This epoch's updates (lists of micro-batches), past the first `steps_done` on resume."""
        loader, accumulation = self._train_loader, self.args.gradient_accumulation_steps
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        skip = 0 if self.args.ignore_data_skip else steps_done * accumulation
        batches = iter(self.accelerator.skip_first_batches(loader, skip) if skip else loader)
        return grouped(batches, accumulation, len(loader), seen=skip)

    def _track_best(self, metrics):
        """Trainer's best_metric bookkeeping, which early stopping reads; reduce_on_plateau steps here."""
        key = self.args.metric_for_best_model
        if key is None:
            return
        value = metrics[key if key.startswith("eval_") else f"eval_{key}"]
        if isinstance(self.lr_scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.lr_scheduler.step(value)
        better = np.greater if self.args.greater_is_better else np.less
        if self.state.best_metric is None or better(value, self.state.best_metric):
            self.state.best_metric, self.state.best_global_step = value, self.state.global_step

    def _samples_trained(self, steps, max_steps, epochs):
        batch = self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size
        samples = len(self.bundle.train_dataset) * epochs if self.args.max_steps <= 0 else max_steps * batch
        return samples * steps / max(max_steps, 1)

    # ---- evaluation, logging, saving ----

    def evaluate(self, eval_dataset=None, metric_key_prefix="eval"):
        dataset = self.bundle.eval_dataset if eval_dataset is None else eval_dataset
        loader = self._dataloader(dataset, training=False)
        if self.optimizer is None:  # evaluation without training: place the model once
            self.model = self.fsdp.shard(self.model) if self.fsdp else self.accelerator.prepare(self.model)
        self.model.eval()
        start, losses, logits, labels = time.time(), [], [], []
        for batch in loader:
            with torch.no_grad():
                loss, outputs = self.compute_loss(self.model, batch)
            targets = tuple(batch[name] for name in self.label_names)
            losses.append(self.accelerator.gather_for_metrics(loss.detach().repeat(len(targets[0]))))
            if self.bundle.compute_metrics is not None:
                predicted = tuple(outputs[key].float() for key in PREDICTED if outputs.get(key) is not None)
                logits.append(self._gathered(predicted))
                labels.append(self._gathered(targets))
        metrics = self._task_metrics(logits, labels, metric_key_prefix)
        metrics[f"{metric_key_prefix}_loss"] = torch.cat(losses).mean().item()
        return self._report_evaluation(metrics, metric_key_prefix, start, len(dataset), len(loader))

    def _gathered(self, tensors):
        """Every process's rows of this batch, in order; sequences padded with -100 to the longest process's."""
        padded = self.accelerator.pad_across_processes(tensors, dim=1, pad_index=-100)
        return tuple(t.cpu() for t in self.accelerator.gather_for_metrics(padded))

    def _loss_terms(self):
        terms = self.penalties.pop_means()
        if self.distiller is not None:  # every process logs the training loss at the same steps
            terms.update(self.distiller.pop_means(lambda sums: self.accelerator.reduce(sums, "mean")))
        return terms

    def save_model(self, output_dir=None):
        """A plain HF checkpoint (safetensors + config + processor) that from_pretrained loads."""
        output_dir = output_dir or self.args.output_dir
        self.accelerator.wait_for_everyone()
        # Under FSDP both gather the whole model onto rank 0 (every process takes part).
        state_dict = self.fsdp.full_state_dict(self.model) if self.fsdp else self.accelerator.get_state_dict(self.model)
        self.accelerator.unwrap_model(self.model).save_pretrained(
            output_dir, is_main_process=self.accelerator.is_main_process, save_function=self.accelerator.save,
            state_dict=state_dict,
        )
        if self.accelerator.is_main_process and self.bundle.processor is not None:
            self.bundle.processor.save_pretrained(output_dir)

    def _save_checkpoint_files(self, path):
        self.save_model(path)
        self.accelerator.save_state(os.path.join(path, ENGINE_STATE))
        if self.accelerator.is_main_process:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(path, ENGINE_STATE, SCHEDULER_STATE))
        if self.fsdp:  # model and optimizer are not the accelerator's to save here
            self.fsdp.save_state(self.model, self.optimizer, os.path.join(path, ENGINE_STATE))


def grouped(batches, accumulation, batches_in_epoch, seen):
    """`accumulation` micro-batches at a time (the epoch's last update may take fewer), each with the
    share of the epoch's `batches_in_epoch` done after it, `seen` already done before."""
    while micro_batches := list(islice(batches, accumulation)):
        seen += len(micro_batches)
        yield micro_batches, seen / batches_in_epoch
