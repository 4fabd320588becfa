"""Value ranges of numeric config fields, checked while the config is parsed.

argparse checks types only: a negative learning rate, a batch size of 0 or a NaN would otherwise
reach training and end in a traceback mid-run or, worse, in a run that silently does something
else (max_seq_length 0 falling back to the tokenizer's limit, num_train_epochs 0 training
nothing). Each bad value stops the run with one line naming the key and what it must be.

Example:
    >>> check_ranges(training_args, TRAINING_RANGES)  # doctest: +SKIP
    hftune.errors.HftuneError: learning_rate must be >= 0 (a finite number), got -1.0.
"""

import math

from hftune.errors import HftuneError


def _number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def at_least(low, what=None):
    return (lambda v: _number(v) and v >= low), what or f">= {low} (a finite number)"


def above(low, what=None):
    return (lambda v: _number(v) and v > low), what or f"> {low} (a finite number)"


def between(low, high):
    """[low, high)"""
    return (lambda v: _number(v) and low <= v < high), f"in [{low}, {high})"


COUNT = at_least(1, "an integer >= 1")
UNSIGNED_SEED = (lambda v: _number(v) and 0 <= v < 2**32), "an integer in [0, 2**32)"  # numpy's seed range

# field: (test, what it must be). A None value passes only where the field's own default is None.
TRAINING_RANGES = {
    "learning_rate": at_least(0),
    "num_train_epochs": at_least(0),
    "max_steps": at_least(-1, "-1 (off: num_train_epochs decides) or a positive number of steps"),
    "per_device_train_batch_size": COUNT,
    "per_device_eval_batch_size": COUNT,
    "gradient_accumulation_steps": COUNT,
    "eval_accumulation_steps": COUNT,
    "warmup_steps": at_least(0),
    "weight_decay": at_least(0),
    "max_grad_norm": at_least(0, ">= 0 (a finite number; 0 turns clipping off)"),
    "label_smoothing_factor": between(0, 1),
    "adam_beta1": between(0, 1),
    "adam_beta2": between(0, 1),
    "adam_epsilon": at_least(0),
    "logging_steps": above(0),
    "save_steps": above(0),
    "eval_steps": above(0),
    "save_total_limit": at_least(0, "an integer >= 0"),
    "dataloader_num_workers": at_least(0, "an integer >= 0"),
    "seed": UNSIGNED_SEED,
    "data_seed": UNSIGNED_SEED,
    "max_new_tokens": COUNT,
    "max_grad_value": above(0),
    "l1_lambda": at_least(0),
    "l2_lambda": at_least(0),
    "early_stopping_threshold": at_least(0),
    "powersgd_rank": COUNT,
    "powersgd_start_iter": at_least(0, "an integer >= 0"),
}

DATA_RANGES = {
    "max_seq_length": COUNT,
    "block_size": COUNT,
    "max_train_samples": COUNT,
    "max_eval_samples": COUNT,
    "preprocessing_num_workers": COUNT,
}


NULLABLE = {"max_seq_length"}  # null: the model's own limit


def check_ranges(args, ranges):
    """Refuse the first field of `args` outside its range (a null only where the default is one)."""
    defaults = type(args).__dataclass_fields__
    for name, (valid, what) in ranges.items():
        value = getattr(args, name, None)
        if value is None and name not in NULLABLE and name in defaults and defaults[name].default is not None:
            raise HftuneError(f"{name} cannot be null; give {what}, or drop the key to keep the default "
                              f"{defaults[name].default}.")
        if value is not None and not valid(value):
            raise HftuneError(f"{name} must be {what}, got {value}.")


def check_something_to_do(args):
    """Contradictions between the switches that say what a run does."""
    if not (args.do_train or args.do_eval or args.do_predict):
        raise HftuneError("do_train, do_eval and do_predict are all false: the run would do nothing; set one to true.")
    if args.do_train and args.max_steps <= 0 and args.num_train_epochs == 0:
        raise HftuneError("num_train_epochs is 0 and max_steps is not set: training would run no step; "
                          "set num_train_epochs > 0 or max_steps > 0 (or do_train: false).")
