"""The Trainer-like plumbing the `accelerate` and `pipeline` engines share: TrainerState and
Trainer's callbacks, the epoch/step loop that drives them, log lines, evaluation's metric names,
resuming the state and committing checkpoints.

An engine subclasses LoopEngine and supplies what differs between them:
  is_world_process_zero(), is_local_process_zero(), _barrier()  its processes;
  _setup_training() -> (per_epoch, max_steps, epochs)  optimizer, schedule, and its running loss;
  _epoch_updates(epoch, steps_done, per_epoch)  this epoch's updates, each with the share of the
      epoch done after it; called before on_epoch_begin, so its loader draws its seed where it always has;
  _update(update)  one optimizer step, setting _learning_rate and _grad_norm and adding to the loss;
  _pop_loss()  the loss summed over the updates since the last call (averaged over processes), zeroed;
  _samples_trained(steps, max_steps, epochs)  the sample count of the train speed metrics;
  _load_checkpoint(checkpoint) / _save_checkpoint_files(path)  its model, optimizer and schedule;
  evaluate() and save_model().
"""

import logging
import math
import os
import time

from transformers.integrations import get_reporting_integration_callbacks
from transformers.trainer_callback import (
    CallbackHandler, DefaultFlowCallback, PrinterCallback, ProgressCallback, TrainerControl, TrainerState,
)
from transformers.trainer_pt_utils import log_metrics, nested_concat, nested_numpify, save_metrics, save_state
from transformers.trainer_utils import EvalPrediction, TrainOutput, denumpify_detensorize, speed_metrics

from hftune.training.checkpoints import commit, unseal

logger = logging.getLogger("hftune")
RESUMED = ("global_step", "epoch", "log_history", "best_metric", "best_global_step")  # what a resume restores


class LoopEngine:
    """Trainer's loop around an engine's optimizer step; offers the Trainer methods run.py uses."""

    log_metrics, save_metrics, save_state = log_metrics, save_metrics, save_state

    def _start_callbacks(self, *extra):
        """A fresh TrainerState, and Trainer's callbacks (flow, trackers, progress) followed by the
        task's (as Trainer places its `callbacks` argument) and the engine's `extra` ones (None: not wanted)."""
        args = self.args
        self.state = TrainerState(is_local_process_zero=self.is_local_process_zero(),
                                  is_world_process_zero=self.is_world_process_zero())
        self.control = TrainerControl()
        callbacks = [DefaultFlowCallback, *get_reporting_integration_callbacks(args.report_to),
                     PrinterCallback if args.disable_tqdm else ProgressCallback, *self.bundle.callbacks, *extra]
        self.callback_handler = CallbackHandler([c for c in callbacks if c is not None], self.model,
                                                self.bundle.processor, None, None)

    def add_callback(self, callback):
        self.callback_handler.add_callback(callback)

    # ---- training ----

    def _plan(self, per_epoch):
        """Trainer's step and epoch counts for `per_epoch` updates an epoch, recorded in the state as
        Trainer records them; returns (max_steps, epochs)."""
        args = self.args
        max_steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * per_epoch)
        epochs = math.ceil(max_steps / per_epoch) if args.max_steps > 0 else math.ceil(args.num_train_epochs)
        self.state.max_steps, self.state.num_train_epochs = max_steps, epochs
        self.state.train_batch_size = args.per_device_train_batch_size
        self.state.compute_steps(args, max_steps)
        return max_steps, epochs

    def _resume(self, checkpoint, per_epoch):
        """The engine's states and Trainer's from checkpoint-N; returns (epochs done, steps into the next)."""
        if checkpoint is None:
            return 0, 0
        self._load_checkpoint(checkpoint)
        loaded = TrainerState.load_from_json(os.path.join(checkpoint, "trainer_state.json"))
        for key in RESUMED:
            setattr(self.state, key, getattr(loaded, key))
        logger.info(f"resumed from {checkpoint} at step {self.state.global_step}")
        return divmod(self.state.global_step, per_epoch)

    def train(self, resume_from_checkpoint=None):
        args = self.args
        per_epoch, max_steps, epochs = self._setup_training()
        epochs_done, steps_done = self._resume(resume_from_checkpoint, per_epoch)
        self._total_loss, self._grad_norm, self._learning_rate = 0.0, None, None
        self._last_logged = first_step = self.state.global_step
        start = time.time()
        self.control = self.callback_handler.on_train_begin(args, self.state, self.control)
        for epoch in range(epochs_done, epochs):
            self._run_epoch(epoch, self._epoch_updates(epoch, steps_done, per_epoch))
            steps_done = 0
            # max_steps: a run resumed at its last step takes no step, so the flow callback never stops it
            if self.control.should_training_stop or self.state.global_step >= max_steps:
                break
        self.control = self.callback_handler.on_train_end(args, self.state, self.control)
        return self._train_output(start, first_step, max_steps, epochs)

    def _run_epoch(self, epoch, updates):
        args = self.args
        self.control = self.callback_handler.on_epoch_begin(args, self.state, self.control)
        for update, done in updates:
            self.control = self.callback_handler.on_step_begin(args, self.state, self.control)
            self._update(update)
            self.state.global_step += 1
            self.state.epoch = epoch + done
            self.control = self.callback_handler.on_step_end(args, self.state, self.control)
            self._maybe_log_save_evaluate()
            if self.control.should_epoch_stop or self.control.should_training_stop:
                break
        self.control = self.callback_handler.on_epoch_end(args, self.state, self.control)
        self._maybe_log_save_evaluate()

    def _maybe_log_save_evaluate(self):
        if self.control.should_log and self.state.global_step > self._last_logged:
            self._log_loss()
        if self.control.should_evaluate:
            self._track_best(self.evaluate())
        if self.control.should_save:
            self._save_checkpoint()
            self.control = self.callback_handler.on_save(self.args, self.state, self.control)

    def _log_loss(self):
        """A training log line: the mean loss per update since the last line, gradient norm, learning rate."""
        loss = self._pop_loss()
        logs = {"loss": loss / (self.state.global_step - self._last_logged)}
        if self._grad_norm is not None:  # DeepSpeed may report none
            logs["grad_norm"] = float(self._grad_norm)
        self.log({**logs, "learning_rate": self._learning_rate})
        self._total_loss += loss
        self._last_logged = self.state.global_step

    def _track_best(self, metrics):
        """Trainer's best-metric bookkeeping after an evaluation in training, where an engine keeps it."""

    def _train_output(self, start, first_step, max_steps, epochs):
        self._total_loss += self._pop_loss()  # steps after the last log line
        steps = max(self.state.global_step - first_step, 1)
        metrics = speed_metrics("train", start, num_samples=self._samples_trained(steps, max_steps, epochs),
                                num_steps=steps)
        metrics["train_loss"] = self._total_loss / steps
        self.log(dict(metrics))
        return TrainOutput(self.state.global_step, metrics["train_loss"], metrics)

    # ---- evaluation, logging, saving ----

    def _task_metrics(self, logits, labels, prefix):
        """The task's metrics over the gathered batches of logits and labels (none gathered: none), named
        as Trainer names them, `<prefix>_<name>`. A batch may be a tuple (a span model's start and end
        logits; its start and end positions)."""
        if not logits:
            return {}
        predictions = EvalPrediction(predictions=joined(logits), label_ids=joined(labels))
        metrics = denumpify_detensorize(self.bundle.compute_metrics(predictions))  # as Trainer: plain numbers
        return {f"{prefix}_{k}": v for k, v in metrics.items()}

    def _report_evaluation(self, metrics, prefix, start, num_samples, num_steps):
        """Speed metrics added to an evaluation's, logged and passed to on_evaluate, as Trainer does."""
        metrics.update(speed_metrics(prefix, start, num_samples=num_samples, num_steps=num_steps))
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics=metrics)
        return metrics

    def log(self, logs):
        if self.bundle.derived_metrics:
            logs.update(self.bundle.derived_metrics(logs))
        if "loss" in logs:  # a training line
            logs.update(self._loss_terms())
        if self.state.epoch is not None:
            logs["epoch"] = self.state.epoch
        self.state.log_history.append({**logs, "step": self.state.global_step})
        self.control = self.callback_handler.on_log(self.args, self.state, self.control, logs)

    def _loss_terms(self):
        """Parts of the training loss an engine logs beside it (penalties, distillation)."""
        return {}

    def _save_checkpoint(self):
        """checkpoint-N, written unsealed: the engine's files and trainer_state.json, then sealed
        (and older ones rotated) by commit once every process is done."""
        path = os.path.join(self.args.output_dir, f"checkpoint-{self.state.global_step}")
        main = self.is_world_process_zero()
        if main:
            unseal(path)
        self._save_checkpoint_files(path)
        if main:
            self.state.save_to_json(os.path.join(path, "trainer_state.json"))
        commit(path, self.args, self.state.best_model_checkpoint, self._barrier, main)


def joined(batches):
    """Batches concatenated as Trainer's evaluation loop does: sequences of other lengths padded with -100
    (token tags, span logits), tuples kept as tuples of arrays; a 1-tuple is its array."""
    whole = batches[0]
    for batch in batches[1:]:
        whole = nested_concat(whole, batch, padding_index=-100)
    whole = nested_numpify(whole)
    return whole[0] if isinstance(whole, tuple) and len(whole) == 1 else whole
