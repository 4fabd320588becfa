"""The default engine: Hugging Face Trainer over a TaskBundle, with hftune's optimizer and schedule
registries, p-norm and by-value clipping, loss penalties and early stopping."""

import copy
import dataclasses
import logging
import os

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, has_length

from hftune.training.checkpoints import commit, unseal
from hftune.compression.distillation import distiller_for, task_logits
from hftune.training.guards import guard_for
from hftune.results.hub import describe_error, push_problems
from hftune.data import is_stream
from hftune.errors import HftuneError
from hftune.launch.checks import ddp_comm_kwargs, uses_fsdp
from hftune.training.optim import (
    WarmupReduceLROnPlateau, build_optimizer, build_scheduler, decay_parameter_names, describe_strategy,
    optimizer_spec, updates_per_epoch,
)
from hftune.compression.pruning import pruning_callback
from hftune.training.regularization import clip_grad_value_, early_stopping_callback, penalties_for
from hftune.training.sampling import shuffle_batches
from hftune.results.throughput import ThroughputCallback

logger = logging.getLogger("hftune")


class StrategyCallback(TrainerCallback):
    """What Trainer's loop has no hook for: the non-finite guard and clipping by value, once per
    optimizer step (after Trainer's norm clipping, which has already unscaled AMP gradients), and
    warmup for reduce_on_plateau, which Trainer only steps after evaluations."""

    def __init__(self, accelerator, max_grad_value, guard):
        self.accelerator, self.max_grad_value, self.guard = accelerator, max_grad_value, guard

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.guard is not None:
            self.guard.check(model.parameters(), state.global_step + 1)
        clip_grad_value_(model.parameters(), self.max_grad_value)

    def on_step_end(self, args, state, control, lr_scheduler=None, **kwargs):
        # as Trainer's own scheduler step: not after a step the AMP loss scaler skipped
        if isinstance(lr_scheduler, WarmupReduceLROnPlateau) and not self.accelerator.optimizer_step_was_skipped:
            lr_scheduler.warmup_step()


class HftuneTrainer(Trainer):
    """Trainer that builds hftune's optimizer and schedule, adds a teacher's distillation term and
    penalties to the loss, clips by a p-norm, and adds derived metrics (e.g. perplexity), penalty
    values and the distillation loss's parts to every log line."""

    def __init__(self, *args, derived_metrics=None, teacher=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.derived_metrics = derived_metrics
        self.penalties = penalties_for(self.model, self.args)
        self.distiller = distiller_for(teacher, self.args, self.accelerator)
        guard = guard_for(self.args, self.accelerator)
        self.add_callback(StrategyCallback(self.accelerator, self.args.max_grad_value, guard))
        stopper = early_stopping_callback(self.args)
        if stopper is not None:
            self.add_callback(stopper)
        pruner = pruning_callback(self.model, self.args, self.train_dataset)
        if pruner is not None:
            self.add_callback(pruner)
        # after the others: it times their work too
        self.add_callback(ThroughputCallback(self.model, self.accelerator, self.data_collator))

    def _get_train_sampler(self, train_dataset=None):
        return shuffle_batches(super()._get_train_sampler(train_dataset))

    def train(self, *args, **kwargs):
        # hftune rotates checkpoints itself, after each one is sealed (hftune.training.checkpoints): Trainer's
        # rotation runs before that, and at the end of training deletes the latest checkpoint when
        # save_total_limit is 1 and the best is another. Its own copy of the limit is off meanwhile.
        self.save_limit, self.args.save_total_limit = self.args.save_total_limit, None
        try:
            return super().train(*args, **kwargs)
        finally:
            self.args.save_total_limit = self.save_limit

    def _save_checkpoint(self, model, trial):
        run_dir = self._get_output_dir(trial=trial)
        folder = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if self.args.should_save:
            unseal(folder)
        super()._save_checkpoint(model, trial)
        configured = copy.copy(self.args)  # the arguments as configured, not with the limit switched off
        configured.save_total_limit = self.save_limit
        if self.args.should_save:
            torch.save(configured, os.path.join(folder, TRAINING_ARGS_NAME))
        commit(folder, configured, self.state.best_model_checkpoint, self.accelerator.wait_for_everyone,
               self.args.should_save)

    def get_decay_parameter_names(self, model):
        return decay_parameter_names(model)  # Trainer's own misses BatchNorm and other norms by type

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            model = self.model if model is None else model
            if optimizer_spec(self.args) is None:
                super().create_optimizer(model)  # a TrainingArguments optim: Trainer's own factory
            else:
                self.optimizer = build_optimizer(model, self.args)
            for line in describe_strategy(model, self.optimizer, self.args, self.penalties):
                logger.info(line)
        return self.optimizer

    def create_scheduler(self, num_training_steps, optimizer=None):
        if self.lr_scheduler is None:
            # a stream has no length: check_streaming refuses the schedules that would need one
            per_epoch = updates_per_epoch(len(self.train_dataset), self.args) if has_length(self.train_dataset) else 1
            self.lr_scheduler = build_scheduler(optimizer or self.optimizer, self.args, num_training_steps, per_epoch)
            self._created_lr_scheduler = True
        return self.lr_scheduler

    def _build_accelerator_args(self, **kwargs):
        args = super()._build_accelerator_args(**kwargs)
        compression = ddp_comm_kwargs(self.args)  # gradient compression: accelerate registers the DDP comm hook
        if compression:
            args["kwargs_handlers"] = [dataclasses.replace(args["kwargs_handlers"][0], **compression)]
        return args

    def _clip_grad_norm(self, model):
        # Trainer clips with the 2-norm; max_grad_norm_type picks p. DeepSpeed (always p=2) clips itself.
        if self.args.max_grad_norm_type == 2 or self.is_deepspeed_enabled:
            return super()._clip_grad_norm(model)
        return self.accelerator.clip_grad_norm_(model.parameters(), self.args.max_grad_norm,
                                                norm_type=self.args.max_grad_norm_type)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        distilling = self.distiller is not None and model.training
        labels = inputs.get("labels")  # label smoothing pops them from inputs
        result = super().compute_loss(model, inputs, return_outputs=return_outputs or distilling,
                                      num_items_in_batch=num_items_in_batch)
        if not ((self.penalties or distilling) and model.training):
            return result
        loss, outputs = result if return_outputs or distilling else (result, None)
        # training_step divides the loss by the accumulation steps unless it is already normalized
        # by num_items_in_batch; the penalty must count once per optimizer step either way.
        scaled = self.loss_is_scaled_for_ga
        if scaled is None:
            scaled = self.compute_loss_func is not None or (
                self.model_accepts_loss_kwargs and num_items_in_batch is not None)
        if distilling:
            loss = self._distill(loss, outputs, inputs, labels, num_items_in_batch, scaled)
        loss = self.penalties.add_to(loss, 1 / self.current_gradient_accumulation_steps if scaled else 1.0)
        return (loss, outputs) if return_outputs else loss

    def _distill(self, loss, outputs, inputs, labels, num_items_in_batch, scaled):
        """The distillation term normalized as Trainer normalized the task loss: a batch mean, or (causal
        LM) a sum over the accumulated batch's tokens, which Trainer then multiplies by the processes."""
        tokens = None
        if scaled and num_items_in_batch is not None:
            processes = self.accelerator.num_processes if self.args.average_tokens_across_devices else 1
            tokens = num_items_in_batch / processes
        return self.distiller.mix(loss, task_logits(outputs), inputs, labels, num_items=tokens,
                                  accumulation=self.current_gradient_accumulation_steps, scaled=scaled)

    def log(self, logs, *args, **kwargs):
        if self.derived_metrics:
            logs.update(self.derived_metrics(logs))  # in place: evaluate() returns this same dict
        if "loss" in logs:
            logs.update(self.penalties.pop_means())
            if self.distiller is not None:  # every process logs the training loss at the same steps
                logs.update(self.distiller.pop_means(lambda sums: self.accelerator.reduce(sums, "mean")))
        super().log(logs, *args, **kwargs)

    # ---- Hub: hftune pushes once, at the end of the run, after its model card (hftune/results/hub.py) ----

    def init_hf_repo(self, token=None, private=None):
        """Trainer creates the repo when it is built, so a missing token or a refused repo would stop the run
        before training. Only pushes during training (hub_strategy other than end) need it now; if it cannot
        be had they are skipped with a warning, and the push at the end reports why."""
        self.hub_model_id, self.push_in_progress = None, None
        if self.args.hub_strategy == "end" or not self.is_world_process_zero() or push_problems(self.args):
            return  # (push_problems were warned about at parse time)
        try:
            super().init_hf_repo(token=token, private=private)
        except Exception as err:  # whatever the Hub or the network answers: training goes ahead
            logger.warning(f"push_to_hub: no pushes during training ({describe_error(err)}).")
            return
        self.add_callback(PushSealedCheckpoint(self))

    def _push_from_checkpoint(self, checkpoint_folder):
        # Trainer asks mid-save; hftune seals checkpoint-N (its manifest, which resuming requires) only after
        # every file is written, so the push waits for on_save (PushSealedCheckpoint).
        if self.hub_model_id is not None:  # None: the repo could not be created (warned in init_hf_repo)
            self.checkpoint_to_push = checkpoint_folder

    def save_model(self, output_dir=None, _internal_call=False):
        # Called by hftune, Trainer.save_model would push with a model card of its own, over hftune's.
        super().save_model(output_dir, _internal_call=True)

    def _save(self, output_dir=None, state_dict=None):
        # transformers' save_pretrained writes the weights and config only on global rank 0, whatever
        # is_main_process says (distributed/mixin.py's should_save_on_this_rank): under save_on_each_node the
        # other nodes' checkpoints would hold no model, and could not be resumed from.
        model = self.accelerator.unwrap_model(self.model)
        if self.args.save_on_each_node and self.args.should_save and hasattr(model, "should_save_on_this_rank"):
            model.should_save_on_this_rank = lambda is_main_process: is_main_process
        try:
            super()._save(output_dir, state_dict)
        finally:
            model.__dict__.pop("should_save_on_this_rank", None)


class PushSealedCheckpoint(TrainerCallback):
    """Trainer's push of a save (hub_strategy every_save, checkpoint, all_checkpoints), once the save is sealed."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_save(self, args, state, control, **kwargs):
        folder = self.trainer.__dict__.pop("checkpoint_to_push", None)
        if folder is not None:
            Trainer._push_from_checkpoint(self.trainer, folder)


def build_trainer(bundle, training_args, teacher=None):
    trainer = HftuneTrainer(
        model=bundle.model,
        args=training_args,
        train_dataset=bundle.train_dataset if training_args.do_train else None,
        eval_dataset=bundle.eval_dataset if training_args.do_eval else None,
        processing_class=bundle.processor,
        data_collator=bundle.data_collator,
        compute_metrics=bundle.compute_metrics,
        derived_metrics=bundle.derived_metrics,
        teacher=teacher,
        callbacks=list(bundle.callbacks),
    )
    check_best_metric(trainer, training_args)
    return trainer


def check_best_metric(trainer, args):
    """metric_for_best_model must be a metric evaluation reports: transformers finds out at the first
    evaluation, mid-run. An evaluation of two rows names them now. Sharded launches (DeepSpeed, FSDP) skip
    this: an evaluation before training would set their engine up for inference."""
    name = args.metric_for_best_model
    if not name or trainer.eval_dataset is None or args.deepspeed or uses_fsdp(args) or is_stream(trainer.eval_dataset):
        return
    rows = trainer.eval_dataset.select(range(min(2, len(trainer.eval_dataset))))
    with torch.random.fork_rng(devices=[]):  # its data loader draws a seed: the run's own draws stay as they were
        metrics = trainer.predict(rows, metric_key_prefix="eval").metrics
    if trainer.derived_metrics:
        metrics.update(trainer.derived_metrics(metrics))
    if (name if name.startswith("eval_") else f"eval_{name}") not in metrics:
        reported = sorted(k for k in metrics if not k.endswith(("_runtime", "_per_second", "_preparation_time")))
        raise HftuneError(f"metric_for_best_model '{name}' is not a metric evaluation reports ({reported}); "
                          "choose one of them.")
