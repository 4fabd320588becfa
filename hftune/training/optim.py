"""Optimizer and learning-rate schedule registries: name -> factory + defaults, shared by both
engines. Names TrainingArguments already knows (`optim: adamw_torch_fused`, `lr_scheduler_type:
inverse_sqrt`, ...) keep working through transformers' own factories.

Example:
    >>> from hftune.training.optim import OPTIMIZERS, SCHEDULES
    >>> sorted(OPTIMIZERS)
    ['adagrad', 'adam', 'adamw', 'gd', 'lbfgs', 'rmsprop', 'sgd']
    >>> SCHEDULES["step"].required
    ('step_size',)
"""

import json
import math
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import torch
import yaml
from torch.optim.lr_scheduler import LambdaLR, ReduceLROnPlateau
from transformers import SchedulerType, Trainer, get_scheduler
from transformers.optimization import (
    get_constant_schedule_with_warmup,
    get_cosine_with_hard_restarts_schedule_with_warmup,
    get_cosine_with_min_lr_schedule_with_warmup,
    get_linear_schedule_with_warmup,
    get_polynomial_decay_schedule_with_warmup,
)
from transformers.training_args import OptimizerNames

from hftune.errors import HftuneError, closest


@dataclass(frozen=True)
class OptimizerSpec:
    cls: type
    defaults: dict  # hyperparameters settable through optim_args, with their defaults
    adam_args: bool = False  # betas and eps come from adam_beta1, adam_beta2, adam_epsilon
    full_batch: bool = False  # one update per pass over the whole training set
    needs_closure: bool = False  # step(closure) re-evaluates the loss (line search)
    single_group: bool = False  # one parameter group only: no decay/no-decay split


_SGD = {"momentum": 0.0, "dampening": 0.0, "nesterov": False}
OPTIMIZERS = {
    "sgd": OptimizerSpec(torch.optim.SGD, _SGD),
    "gd": OptimizerSpec(torch.optim.SGD, _SGD, full_batch=True),
    "adam": OptimizerSpec(torch.optim.Adam, {"amsgrad": False}, adam_args=True),
    "adamw": OptimizerSpec(torch.optim.AdamW, {"amsgrad": False}, adam_args=True),
    "adagrad": OptimizerSpec(torch.optim.Adagrad, {"lr_decay": 0.0, "initial_accumulator_value": 0.0, "eps": 1e-10}),
    "rmsprop": OptimizerSpec(torch.optim.RMSprop, {"alpha": 0.99, "eps": 1e-8, "momentum": 0.0, "centered": False}),
    "lbfgs": OptimizerSpec(
        torch.optim.LBFGS,
        {"max_iter": 20, "history_size": 100, "tolerance_grad": 1e-7, "tolerance_change": 1e-9,
         "line_search_fn": "strong_wolfe"},
        needs_closure=True, single_group=True,
    ),
}
HF_OPTIMIZERS = sorted(o.value for o in OptimizerNames)


def name_of(value):
    """'sgd' for both the plain string and TrainingArguments' OptimizerNames.SGD enum."""
    return getattr(value, "value", value)


def optimizer_spec(args):
    """Our spec for `args.optim`, or None for a name only transformers knows."""
    return OPTIMIZERS.get(name_of(args.optim))


def check_optimizer_name(name):
    if name not in OPTIMIZERS and name not in HF_OPTIMIZERS:
        raise HftuneError(
            f"unknown optim '{name}'.{closest(name, [*OPTIMIZERS, *HF_OPTIMIZERS])} hftune optimizers: "
            f"{sorted(OPTIMIZERS)}; TrainingArguments' optim values also work."
        )


def parse_optim_args(text):
    """optim_args as TrainingArguments writes it ('momentum=0.9,nesterov=True') or as JSON (a YAML
    mapping in a recipe arrives as JSON): values become numbers and booleans."""
    if not text:
        return {}
    if text.lstrip().startswith("{"):
        return json.loads(text)
    pairs = [item.split("=", 1) for item in text.replace(" ", "").split(",") if item]
    if any(len(pair) != 2 for pair in pairs):
        raise HftuneError(f"optim_args '{text}' must look like 'key=value,key=value'.")
    return {key: yaml.safe_load(value) for key, value in pairs}


def optimizer_kwargs(args, spec):
    """Hyperparameters for `spec.cls`: registry defaults, then TrainingArguments' own names, then optim_args."""
    name = name_of(args.optim)
    extra = parse_optim_args(args.optim_args)
    unknown = sorted(set(extra) - set(spec.defaults))
    if unknown:
        raise HftuneError(f"optim_args {unknown} do not apply to optim {name}; it takes {sorted(spec.defaults)}.")
    kwargs = {**spec.defaults, "lr": args.learning_rate, **extra}
    if spec.adam_args:
        kwargs.update(betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    if spec.single_group and args.weight_decay:
        raise HftuneError(f"optim {name} has no weight decay; set weight_decay: 0 and use l2_lambda instead.")
    try:  # let torch validate the values (e.g. nesterov needs momentum) before any model is loaded
        spec.cls([torch.zeros(1, requires_grad=True)], **kwargs)
    except (TypeError, ValueError) as err:
        raise HftuneError(f"optim {name} with {extra or 'its defaults'}: {err}") from None
    return kwargs


def no_decay_parameter_names(model):
    """Biases and the weights of every normalization layer (LayerNorm, RMSNorm, BatchNorm, ...):
    decaying them toward zero only hurts. Matched by module type, not by parameter name."""
    names = set()
    for module_name, module in model.named_modules():
        is_norm = "norm" in type(module).__name__.lower()
        for param_name, _ in module.named_parameters(recurse=False):
            if is_norm or param_name == "bias":
                names.add(f"{module_name}.{param_name}" if module_name else param_name)
    return names


def decay_parameter_names(model):
    skip = no_decay_parameter_names(model)
    return [name for name, _ in model.named_parameters() if name not in skip]


def parameter_groups(model, weight_decay):
    """[decay group, no-decay group] of trainable parameters, in Trainer's order."""
    decay = set(decay_parameter_names(model))
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": [p for n, p in params if n in decay], "weight_decay": weight_decay},
        {"params": [p for n, p in params if n not in decay], "weight_decay": 0.0},
    ]


def build_optimizer(model, args):
    """The optimizer `args.optim` names, over parameter groups that spare biases and norms."""
    spec = optimizer_spec(args)
    if spec is None:  # a TrainingArguments name: transformers' own factory, our grouping
        cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
        if {"params", "model", "optimizer_dict"} & set(kwargs):
            raise HftuneError(f"optim {name_of(args.optim)} builds its own parameter groups; use engine: trainer.")
        return cls(parameter_groups(model, args.weight_decay), **kwargs)
    kwargs = optimizer_kwargs(args, spec)
    if spec.single_group:
        return spec.cls([p for p in model.parameters() if p.requires_grad], **kwargs)
    return spec.cls(parameter_groups(model, args.weight_decay), **kwargs)


# ---- learning-rate schedules ----


def _warmup(step, warmup_steps):
    return step / max(1, warmup_steps)


def _decay_after_warmup(step, warmup_steps, gamma, every):
    """gamma ** (number of whole `every`-step periods since warmup ended)."""
    if step < warmup_steps:
        return _warmup(step, warmup_steps)
    return gamma ** ((step - warmup_steps) // every)


def _interval(interval, steps_per_epoch):
    if interval not in ("step", "epoch"):
        raise HftuneError(f"lr_scheduler_kwargs interval must be 'step' or 'epoch', got '{interval}'.")
    return 1 if interval == "step" else steps_per_epoch


def _exponential(optimizer, warmup, total, steps_per_epoch, gamma, interval="step"):
    every = _interval(interval, steps_per_epoch)
    return LambdaLR(optimizer, partial(_decay_after_warmup, warmup_steps=warmup, gamma=gamma, every=every))


def _step(optimizer, warmup, total, steps_per_epoch, step_size, gamma=0.1, interval="step"):
    every = step_size * _interval(interval, steps_per_epoch)
    return LambdaLR(optimizer, partial(_decay_after_warmup, warmup_steps=warmup, gamma=gamma, every=every))


def _cosine(optimizer, warmup, total, steps_per_epoch, min_lr=0.0, num_cycles=0.5):
    return get_cosine_with_min_lr_schedule_with_warmup(optimizer, warmup, total, num_cycles=num_cycles, min_lr=min_lr)


class WarmupReduceLROnPlateau(ReduceLROnPlateau):
    """ReduceLROnPlateau with a linear warmup: `warmup_step()` after each optimizer step ramps the
    learning rate up; eval metrics only count once warmup is over."""

    def __init__(self, optimizer, warmup_steps, **kwargs):
        super().__init__(optimizer, **kwargs)
        self.warmup_steps, self.steps_done = warmup_steps, 0
        self.peak_lrs = [group["lr"] for group in optimizer.param_groups]
        self._set_warmup_lr()

    def _set_warmup_lr(self):
        if self.steps_done <= self.warmup_steps and self.warmup_steps > 0:
            for group, peak in zip(self.optimizer.param_groups, self.peak_lrs):
                group["lr"] = peak * _warmup(self.steps_done, self.warmup_steps)

    def warmup_step(self):
        self.steps_done += 1
        self._set_warmup_lr()

    def step(self, metrics, epoch=None):
        if self.steps_done >= self.warmup_steps:
            super().step(metrics)


@dataclass(frozen=True)
class ScheduleSpec:
    build: Callable  # (optimizer, warmup_steps, total_steps, steps_per_epoch, **kwargs) -> scheduler
    required: tuple = ()
    optional: dict = field(default_factory=dict)
    on_metric: bool = False  # stepped with an eval metric, not every optimizer step


SCHEDULES = {
    "constant": ScheduleSpec(lambda opt, w, total, spe: get_constant_schedule_with_warmup(opt, w)),
    "linear": ScheduleSpec(lambda opt, w, total, spe: get_linear_schedule_with_warmup(opt, w, total)),
    "cosine": ScheduleSpec(_cosine, optional={"min_lr": 0.0, "num_cycles": 0.5}),
    "cosine_with_restarts": ScheduleSpec(
        lambda opt, w, total, spe, num_cycles=1: get_cosine_with_hard_restarts_schedule_with_warmup(
            opt, w, total, num_cycles=num_cycles),
        optional={"num_cycles": 1},
    ),
    "polynomial": ScheduleSpec(
        lambda opt, w, total, spe, lr_end=1e-7, power=1.0: get_polynomial_decay_schedule_with_warmup(
            opt, w, total, lr_end=lr_end, power=power),
        optional={"lr_end": 1e-7, "power": 1.0},
    ),
    "exponential": ScheduleSpec(_exponential, required=("gamma",), optional={"interval": "step"}),
    "step": ScheduleSpec(_step, required=("step_size",), optional={"gamma": 0.1, "interval": "step"}),
    "reduce_on_plateau": ScheduleSpec(
        None, optional={"factor": 0.1, "patience": 10, "threshold": 1e-4, "cooldown": 0, "min_lr": 0.0},
        on_metric=True,
    ),
}
# TrainingArguments' names that hftune's registry does not cover; built by transformers.get_scheduler.
HF_SCHEDULES = tuple(s.value for s in SchedulerType if s.value not in SCHEDULES)


def check_schedule(name, kwargs):
    """Unknown names, missing or unknown parameters: an error naming the valid ones."""
    if name in HF_SCHEDULES:
        return
    if name not in SCHEDULES:
        raise HftuneError(
            f"unknown lr_scheduler_type '{name}'.{closest(name, [*SCHEDULES, *HF_SCHEDULES])} "
            f"hftune schedules: {sorted(SCHEDULES)}; TrainingArguments' values also work."
        )
    spec = SCHEDULES[name]
    missing = [key for key in spec.required if key not in kwargs]
    unknown = sorted(set(kwargs) - set(spec.required) - set(spec.optional))
    if missing or unknown:
        problem = f"needs {missing}" if missing else f"does not take {unknown}"
        raise HftuneError(
            f"lr_scheduler_type {name} {problem} in lr_scheduler_kwargs; it takes "
            f"required {list(spec.required)}, optional {spec.optional}."
        )
    dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    try:  # build it once on a dummy optimizer, so a bad value fails now rather than after loading the model
        if spec.on_metric:
            WarmupReduceLROnPlateau(dummy, 0, **kwargs)
        else:
            spec.build(dummy, 0, 10, 2, **kwargs)  # LambdaLR evaluates step 0 right away
    except (TypeError, ValueError, ArithmeticError) as err:
        raise HftuneError(f"lr_scheduler_type {name} with lr_scheduler_kwargs {kwargs}: {err}") from None


def schedule_kwargs(args):
    """lr_scheduler_kwargs as a dict (a JSON string until TrainingArguments.__post_init__ parses it)."""
    kwargs = args.lr_scheduler_kwargs or {}
    if isinstance(kwargs, str):
        try:
            kwargs = json.loads(kwargs)
        except json.JSONDecodeError as err:
            raise HftuneError(f"lr_scheduler_kwargs '{kwargs}' is not a JSON mapping: {err}.") from None
    if not isinstance(kwargs, dict):
        raise HftuneError(f"lr_scheduler_kwargs must be a mapping, got {kwargs!r}.")
    return dict(kwargs)


def updates_per_epoch(num_examples, args):
    """Optimizer steps in one epoch, as Trainer counts them (a last partial accumulation counts)."""
    per_step = args.per_device_train_batch_size * max(1, args.world_size)
    batches = num_examples // per_step if args.dataloader_drop_last else math.ceil(num_examples / per_step)
    return max(1, math.ceil(batches / args.gradient_accumulation_steps))


def build_scheduler(optimizer, args, total_steps, steps_per_epoch):
    name = name_of(args.lr_scheduler_type)
    kwargs = schedule_kwargs(args)
    warmup = args.get_warmup_steps(total_steps)
    if name in HF_SCHEDULES:
        return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps,
                             scheduler_specific_kwargs=kwargs)
    spec = SCHEDULES[name]
    if spec.on_metric:
        mode = "max" if args.greater_is_better else "min"
        return WarmupReduceLROnPlateau(optimizer, warmup, mode=mode, **{**spec.optional, **kwargs})
    return spec.build(optimizer, warmup, total_steps, steps_per_epoch, **kwargs)


# ---- the strategy, in a few log lines ----


def _warmup_text(warmup_steps):
    if not warmup_steps:
        return "no warmup"
    return f"warmup {int(warmup_steps)} steps" if warmup_steps >= 1 else f"warmup {warmup_steps:.0%} of the steps"


def describe_strategy(model, optimizer, args, regularizer=None):
    """Optimizer, parameter groups, schedule, clipping and penalties, as the run logs them at start."""
    hyper = {k: v for k, v in optimizer.defaults.items()  # weight decay is per group, below
             if k != "weight_decay" and (not isinstance(v, (bool, type(None))) or v)}
    trainable = {id(p) for group in optimizer.param_groups for p in group["params"]}
    frozen = [p for p in model.parameters() if id(p) not in trainable]
    groups = ", ".join(
        f"{len(g['params'])} tensors/{sum(p.numel() for p in g['params']):,} params with weight_decay "
        f"{g.get('weight_decay', 0)}" for g in optimizer.param_groups
    )
    schedule = name_of(args.lr_scheduler_type)
    clip = f"norm {args.max_grad_norm} (p={args.max_grad_norm_type})" if args.max_grad_norm else "norm off"
    lines = [
        f"optimizer: {name_of(args.optim)} ({type(optimizer).__name__}) {hyper}",
        f"parameter groups: {groups}; frozen: {len(frozen)} tensors/{sum(p.numel() for p in frozen):,} params",
        f"lr schedule: {schedule} {schedule_kwargs(args)}, {_warmup_text(args.warmup_steps)}",
        f"gradient clipping: {clip}, value {args.max_grad_value or 'off'}",
    ]
    if regularizer is not None:
        lines.append(f"penalties: {regularizer.describe()}")
    return lines


def check_strategy(args):
    """Checks that need no model: names, optimizer hyperparameters, schedule parameters."""
    spec = optimizer_spec(args)
    if spec is not None:
        optimizer_kwargs(args, spec)
    check_schedule(name_of(args.lr_scheduler_type), schedule_kwargs(args))
