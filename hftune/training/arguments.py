"""TrainingArguments plus the switches hftune adds to every run; the config composes the features'
training fields (engine, regularization, pruning, ...) onto this class (hftune.config)."""

from dataclasses import dataclass, field

from transformers import TrainingArguments

from hftune.errors import HftuneError, closest
from hftune.ranges import TRAINING_RANGES, check_ranges, check_something_to_do
from hftune.training.optim import HF_OPTIMIZERS, HF_SCHEDULES, check_optimizer_name


@dataclass
class BaseTrainingArguments(TrainingArguments):
    """TrainingArguments plus the few switches hftune adds; every HF name keeps its meaning."""

    # The features' checks of their training fields, set by the composed class (hftune.config): not a field.
    feature_checks = ()

    do_train: bool = field(default=True, metadata={"help": "Train (TrainingArguments' default is False)."})
    do_eval: bool = field(default=True, metadata={"help": "Evaluate on eval_split after training (or alone, without do_train)."})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Allow writing into a non-empty output_dir (its files may be overwritten)."},
    )
    # Declared as plain strings so hftune's own names (gd, lbfgs, exponential, ...) parse; TrainingArguments'
    # enum values keep working.
    optim: str = field(
        default=TrainingArguments.default_optim,
        metadata={"help": "sgd, gd, adam, adamw, adagrad, rmsprop, lbfgs, or any TrainingArguments optim; "
                          "hyperparameters (momentum, nesterov, ...) go in optim_args."},
    )
    lr_scheduler_type: str = field(
        default="linear",
        metadata={"help": "constant, linear, cosine, cosine_with_restarts, polynomial, exponential, step, "
                          "reduce_on_plateau, or any TrainingArguments schedule; parameters in lr_scheduler_kwargs."},
    )
    warmup_ratio: float = field(
        default=None, metadata={"help": "Warmup as a fraction of the training steps (alternative to warmup_steps)."}
    )
    # Not an option: the settings hftune chose for this machine (hftune.launch.gpu_defaults), left out of the
    # resolved config so a re-run elsewhere chooses again.
    machine_defaults: tuple = field(default=(), init=False, repr=False)
    # Not an option either: what the run is built on (a recipe, the demo or the defaults), logged at set-up.
    config_base: str = field(default=None, init=False, repr=False)

    def __post_init__(self):
        check_ranges(self, TRAINING_RANGES)  # before anything computes with a NaN, a negative or a null
        check_something_to_do(self)
        check_optimizer_name(self.optim)
        check_no_effect(self)
        for check in self.feature_checks:  # before TrainingArguments' own checks, which need DeepSpeed installed
            check(self)
        optim, schedule = self.optim, self.lr_scheduler_type
        # TrainingArguments only accepts its own enum names: give it a stand-in for ours (plateau's keeps
        # its eval-strategy check and metric_for_best_model default), then put ours back.
        if optim not in HF_OPTIMIZERS:
            self.optim = "sgd"
        if schedule not in HF_SCHEDULES:
            self.lr_scheduler_type = "reduce_lr_on_plateau" if schedule == "reduce_on_plateau" else "linear"
        if self.warmup_ratio is not None:
            if self.warmup_steps:
                raise HftuneError("set warmup_steps or warmup_ratio, not both.")
            if not 0 <= self.warmup_ratio < 1:
                raise HftuneError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}.")
            self.warmup_steps = self.warmup_ratio
        if self.early_stopping_patience is not None and self.metric_for_best_model is None:
            self.metric_for_best_model = "loss"
        super().__post_init__()
        check_report_to(self.report_to)
        if optim not in HF_OPTIMIZERS:
            self.optim = optim
        if schedule not in HF_SCHEDULES:
            self.lr_scheduler_type = schedule


# field -> (the switch it depends on, the switch's values that use it). Set (to other than its default)
# while the switch says otherwise, it would do nothing: refused, as every other field without effect.
DEPENDS_ON = {
    "save_steps": ("save_strategy", ("steps",)),
    "save_total_limit": ("save_strategy", ("steps", "epoch", "best")),
    "save_only_model": ("save_strategy", ("steps", "epoch", "best")),
    "eval_steps": ("eval_strategy", ("steps",)),
    "eval_delay": ("eval_strategy", ("steps", "epoch")),
    "logging_steps": ("logging_strategy", ("steps",)),
    "logging_first_step": ("logging_strategy", ("steps", "epoch")),
}


def check_no_effect(args):
    defaults = type(args).__dataclass_fields__
    for name, (switch, using) in DEPENDS_ON.items():
        value, mode = getattr(args, name), str(getattr(args, switch))
        mode = getattr(getattr(args, switch), "value", mode)  # an enum given in Python
        if value != defaults[name].default and mode not in using:
            raise HftuneError(f"{name} has no effect with {switch} '{mode}'; set {switch}: {using[0]}, or drop {name}.")


def check_report_to(report_to):
    """An unknown or uninstalled tracker fails here, not after the data and model have loaded."""
    from transformers.integrations import get_available_reporting_integrations
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    installed = get_available_reporting_integrations()
    for name in report_to or []:
        if name in ("none", "all"):
            continue
        if name not in INTEGRATION_TO_CALLBACK:
            raise HftuneError(f"unknown report_to '{name}'.{closest(name, INTEGRATION_TO_CALLBACK)} "
                              f"Trackers: {sorted(INTEGRATION_TO_CALLBACK)}, all or none.")
        if name not in installed:
            raise HftuneError(f"report_to '{name}' needs its package, which is not installed; pip install it, "
                              "or drop it from report_to.")
