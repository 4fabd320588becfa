"""Regularization shared by both engines: L1/L2 penalties added to the loss, clipping by value,
dropout overrides for the loaded checkpoint, BatchNorm freezing, early stopping.

Example:
    >>> import torch
    >>> model = torch.nn.Linear(3, 1)
    >>> _ = torch.nn.init.constant_(model.weight, -2.0)
    >>> penalties = Penalties(model, l1_lambda=0.5, l2_lambda=0.0, regularize="weights")
    >>> float(penalties.add_to(torch.tensor(1.0)))  # 1 + 0.5 * (2 + 2 + 2); the bias is spared
    4.0
"""

import re
from dataclasses import dataclass, field

from torch import nn
from transformers import EarlyStoppingCallback

from hftune.errors import HftuneError
from hftune.training.optim import decay_parameter_names


@dataclass
class ModelFields:
    """Dropout overrides of the checkpoint's config."""

    hidden_dropout: float = field(
        default=None,
        metadata={"help": "Override the checkpoint's hidden/residual dropout (e.g. BERT hidden_dropout_prob)."},
    )
    attention_dropout: float = field(
        default=None, metadata={"help": "Override the checkpoint's attention dropout."}
    )
    classifier_dropout: float = field(
        default=None, metadata={"help": "Override the dropout before the classification head."}
    )


@dataclass
class TrainingFields:
    """Clipping, penalties, early stopping and BatchNorm handling beyond TrainingArguments'."""

    max_grad_norm_type: float = field(
        default=2.0, metadata={"help": "p of the p-norm max_grad_norm bounds ('inf' for the max norm)."}
    )
    max_grad_value: float = field(
        default=None, metadata={"help": "Clip every gradient element into [-max_grad_value, max_grad_value]."}
    )
    l1_lambda: float = field(default=0.0, metadata={"help": "L1 penalty l1_lambda * sum|w| added to the loss."})
    l2_lambda: float = field(
        default=0.0, metadata={"help": "Coupled L2 penalty l2_lambda * sum w^2 added to the loss (not weight_decay)."}
    )
    regularize: str = field(
        default="weights",
        metadata={"help": "Parameters the L1/L2 penalties apply to: weights (not biases or norms), all, or a regex."},
    )
    early_stopping_patience: int = field(
        default=None,
        metadata={"help": "Stop after this many evaluations without metric_for_best_model improving."},
    )
    early_stopping_threshold: float = field(
        default=0.0, metadata={"help": "Smallest change of metric_for_best_model that counts as an improvement."}
    )
    freeze_bn_stats: bool = field(
        default=False, metadata={"help": "Keep BatchNorm running statistics as pretrained (CNN fine-tuning)."}
    )
    freeze_bn_affine: bool = field(default=False, metadata={"help": "Freeze BatchNorm scale and shift."})


class Penalties:
    """Explicit penalties on the loss: l1_lambda * sum|w| and l2_lambda * sum w^2 (coupled L2, unlike
    decoupled weight_decay), over the parameters `regularize` selects: 'weights' (not biases or
    norms), 'all', or a regular expression searched in parameter names."""

    def __init__(self, model, l1_lambda, l2_lambda, regularize):
        self.lambdas = {name: lam for name, lam in (("l1_penalty", l1_lambda), ("l2_penalty", l2_lambda)) if lam}
        self.params = select_parameters(model, regularize) if self.lambdas else []
        self.regularize = regularize
        self._sums, self._count = {}, 0

    def __bool__(self):
        return bool(self.lambdas)

    def terms(self):
        """Each penalty's current value (lambda included)."""
        norms = {"l1_penalty": lambda p: p.abs().sum(), "l2_penalty": lambda p: p.pow(2).sum()}
        return {name: lam * sum(norms[name](p) for p in self.params) for name, lam in self.lambdas.items()}

    def add_to(self, loss, scale=1.0):
        """loss + scale * penalties; the values are remembered for the next log line."""
        terms = self.terms()
        for name, value in terms.items():  # kept as tensors: no device sync on the training path
            self._sums[name] = self._sums.get(name, 0.0) + value.detach()
        self._count += bool(terms)
        return loss + scale * sum(terms.values()) if terms else loss

    def pop_means(self):
        """Mean of each penalty since the last call (one log line's worth)."""
        means = {name: float(total) / self._count for name, total in self._sums.items()} if self._count else {}
        self._sums, self._count = {}, 0
        return means

    def describe(self):
        if not self:
            return "none"
        count = sum(p.numel() for p in self.params)
        terms = ", ".join(f"{name.replace('_penalty', '')} lambda {lam}" for name, lam in self.lambdas.items())
        return f"{terms} on {len(self.params)} tensors/{count:,} params (regularize: {self.regularize})"


def select_parameters(model, regularize):
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if regularize == "all":
        return [p for _, p in trainable]
    if regularize == "weights":
        decay = set(decay_parameter_names(model))
        return [p for n, p in trainable if n in decay]
    try:
        pattern = re.compile(regularize)
    except re.error as err:
        raise HftuneError(f"regularize '{regularize}' is not 'weights', 'all' or a valid regex: {err}.") from None
    chosen = [p for n, p in trainable if pattern.search(n)]
    if not chosen:
        raise HftuneError(f"regularize '{regularize}' matches no trainable parameter; e.g. {trainable[0][0]}.")
    return chosen


def clip_grad_value_(parameters, max_value):
    """Clamp every gradient element into [-max_value, max_value] (after unscaling under AMP)."""
    if max_value:
        nn.utils.clip_grad_value_(parameters, max_value)


# Unified dropout names -> the config keys model families use for them.
DROPOUT_KEYS = {
    "hidden_dropout": ("hidden_dropout_prob", "resid_pdrop", "embd_pdrop", "hidden_dropout", "dropout"),
    "attention_dropout": ("attention_probs_dropout_prob", "attn_pdrop", "attention_dropout"),
    "classifier_dropout": ("classifier_dropout", "seq_classif_dropout"),
}


def apply_dropout_overrides(config, model_args):
    """Set the checkpoint config's dropout probabilities before the model is built; a setting the
    model family has no knob for is an error, never a no-op."""
    for name, keys in DROPOUT_KEYS.items():
        value = getattr(model_args, name)
        if value is None:
            continue
        if not 0 <= value < 1:
            raise HftuneError(f"{name} must be in [0, 1), got {value}.")
        present = [key for key in keys if hasattr(config, key)]
        if not present:
            raise HftuneError(f"{name} does not apply to {type(config).__name__} "
                              f"(it has none of {list(keys)}); drop it.")
        for key in present:
            setattr(config, key, value)
    return config


def _keep_eval_mode(module, _inputs):
    module.train(False)  # Trainer calls model.train() every step; this undoes it for frozen BN only


def apply_batchnorm_policy(model, freeze_stats, freeze_affine):
    """CNN fine-tuning: keep BN running statistics as pretrained (normalize with them, never update
    them) and/or freeze BN scale and shift. Returns the number of BatchNorm layers affected."""
    if not (freeze_stats or freeze_affine):
        return 0
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not layers:
        raise HftuneError("freeze_bn_stats/freeze_bn_affine are set but the model has no BatchNorm layer; drop them.")
    for layer in layers:
        if freeze_stats:
            layer.register_forward_pre_hook(_keep_eval_mode)
        if freeze_affine:
            for param in layer.parameters(recurse=False):
                param.requires_grad_(False)
    return len(layers)


def early_stopping_callback(args):
    """transformers' EarlyStoppingCallback on metric_for_best_model, or None when not asked for."""
    if args.early_stopping_patience is None:
        return None
    return EarlyStoppingCallback(args.early_stopping_patience, args.early_stopping_threshold)


def penalties_for(model, args):
    return Penalties(model, args.l1_lambda, args.l2_lambda, args.regularize)

