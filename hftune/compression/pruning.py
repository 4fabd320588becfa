"""Gradual magnitude pruning (Zhu & Gupta 2017, "To prune, or not to prune") for both engines.

The weights of the backbone's Linear/Conv layers (inside `model.base_model`; the task head -
classifier, lm_head - embeddings, norms and biases stay dense) are pruned to `prune_sparsity`, the
final fraction of zeros, reached over training by `prune_schedule`. Masks are computed by
torch.nn.utils.prune (L1Unstructured, LnStructured, global_unstructured's one-threshold logic) but
kept here rather than as torch's reparametrisation, which renames `weight` to `weight_orig` and so
breaks HF save/load and the optimizer's parameter list: the weights stay plain tensors, multiplied
by their masks after every optimizer step, so every saved checkpoint already holds the zeros.
Under DDP every process holds the same weights and so computes the same masks; DeepSpeed, FSDP and
the pipeline engine, whose optimizers or shards own the weights, are refused (check_pruning).

Example:
    >>> round(scheduled_sparsity(5, final=0.8, start=0, end=10, schedule="cubic"), 6)  # 0.8 * (1 - (1 - 5/10)**3)
    0.7
    >>> import torch
    >>> torch.manual_seed(0) and None
    >>> model = torch.nn.Sequential(torch.nn.Linear(10, 10), torch.nn.Linear(10, 20))
    >>> pruner = Pruner(model, structure="unstructured", scope="layer")
    >>> pruner.update(0.3)
    >>> pruner.achieved()
    (0.3, {'0.weight': 0.3, '1.weight': 0.3})
"""

import json
import logging
import math
import os
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import prune
from transformers import TrainerCallback
from transformers.pytorch_utils import Conv1D

from hftune.errors import HftuneError, closest
from hftune.launch.checks import deepspeed_config, uses_fsdp
from hftune.training.optim import updates_per_epoch

logger = logging.getLogger("hftune")

# Fraction of the final sparsity reached at progress p = (t - start) / (end - start), p in [0, 1].


@dataclass
class TrainingFields:
    """Gradual magnitude pruning."""

    prune_sparsity: float = field(
        default=None, metadata={"help": "Magnitude-prune the backbone's Linear/Conv weights to this final fraction "
                                        "of zeros, in [0, 1) (see the README's Pruning)."}
    )
    prune_scope: str = field(
        default=None, metadata={"help": "global (one magnitude threshold over all pruned layers; the default) or layer "
                                        "(each layer to the target; the default for channels)."}
    )
    prune_structure: str = field(
        default=None,
        metadata={"help": "unstructured (single weights; the default), channels (conv output channels / linear "
                          "rows) or heads (attention heads)."},
    )
    prune_schedule: str = field(
        default=None,
        metadata={"help": "How sparsity grows from prune_start_step to prune_end_step: cubic (gradual magnitude "
                          "pruning; the default), linear or one_shot."},
    )
    prune_start_step: int = field(default=None, metadata={"help": "Optimizer step at which pruning starts (default 0)."})
    prune_end_step: int = field(
        default=None, metadata={"help": "Step at which prune_sparsity is reached (default: 3/4 of the training steps)."}
    )
    prune_frequency: int = field(default=None, metadata={"help": "Steps between mask updates (default: about 10 updates)."})


SCHEDULES = {
    "cubic": lambda p: 1 - (1 - p) ** 3,  # Zhu & Gupta: prunes fast while redundancy is high, slowly near the end
    "linear": lambda p: p,
    "one_shot": lambda p: 1.0,  # the whole target at prune_start_step
}
SCOPES = ("global", "layer")
STRUCTURES = ("unstructured", "channels", "heads")
PRUNABLE = (nn.Linear, nn.modules.conv._ConvNd, Conv1D)
SPARSITY_FILE = "sparsity.json"


def scheduled_sparsity(step, final, start, end, schedule):
    """s_t = s_f * SCHEDULES[schedule]((t - t0) / (end - t0)), 0 before t0 and s_f from `end` on."""
    if step < start:
        return 0.0
    return final * SCHEDULES[schedule](min(1.0, (step - start) / (end - start)))


@dataclass
class Window:
    """Mask updates at start, start + frequency, ... and at end; none after it."""

    start: int
    end: int
    frequency: int

    def is_update(self, step):
        return self.start <= step <= self.end and ((step - self.start) % self.frequency == 0 or step == self.end)

    def last_update(self, step):
        """The latest update at or before `step` (None before start): the masks a checkpoint was saved with."""
        if step < self.start:
            return None
        return self.end if step >= self.end else self.start + (step - self.start) // self.frequency * self.frequency


def planned_steps(args, train_dataset):
    """The run's optimizer steps, as Trainer counts them (a stream has max_steps set)."""
    if args.max_steps > 0:
        return args.max_steps
    return math.ceil(args.num_train_epochs * updates_per_epoch(len(train_dataset), args))


def window_for(args, max_steps):
    """The pruning window in optimizer steps, from the config and the run's total steps."""
    start = args.prune_start_step or 0
    end = args.prune_end_step if args.prune_end_step is not None else int(0.75 * max_steps)  # then recover
    if not start < end <= max_steps:
        default = " (default: 3/4 of the training steps)" if args.prune_end_step is None else ""
        raise HftuneError(f"pruning needs prune_start_step < prune_end_step <= the {max_steps} training steps; got "
                          f"prune_start_step {start}, prune_end_step {end}{default}.")
    return Window(start, end, args.prune_frequency or max(1, (end - start) // 10))  # about 10 updates


# ---- what gets pruned ----

def output_channel_dim(module):
    # transformers' Conv1D (GPT-2) and transposed convolutions store weights as (in, out, ...)
    return 1 if isinstance(module, (Conv1D, nn.modules.conv._ConvTransposeNd)) else 0


def prunable_layers(model):
    """name -> Linear/Conv module inside the backbone; the task head lies outside `model.base_model`."""
    body = {id(m) for m in getattr(model, "base_model", model).modules()}
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {name: m for name, m in model.named_modules()
            if isinstance(m, PRUNABLE) and id(m) in body and m is not output}


@dataclass
class HeadGroup:
    """One attention layer: head h owns rows h*d:(h+1)*d of each `rows` layer (weight and bias) and the
    same input columns of each `columns` layer (the output projection)."""

    num_heads: int
    head_dim: int
    rows: list
    columns: list

    def norms(self):
        """The L2 norm of each head's weights."""
        per_head = [m.weight.detach().reshape(self.num_heads, -1) for m in self.rows]
        per_head += [m.weight.detach().t().reshape(self.num_heads, -1) for m in self.columns]
        return torch.cat(per_head, dim=1).norm(dim=1)

    def masks(self, keep):
        """Broadcastable masks from a keep/prune vector over the heads."""
        units = keep.repeat_interleave(self.head_dim)
        masks = {(m, "weight"): units[:, None] for m in self.rows}
        # a head's value bias alone would still reach the output: its bias rows go too
        masks.update({(m, "bias"): units for m in self.rows if m.bias is not None})
        masks.update({(m, "weight"): units[None, :] for m in self.columns})
        return masks


def _linears(module, names):
    layers = [getattr(module, name, None) for name in names]
    return layers if all(isinstance(layer, nn.Linear) for layer in layers) else None


def bert_heads(module):
    """BertAttention and its relatives (RoBERTa, ...): .self.{query,key,value} and .output.dense."""
    inner = getattr(module, "self", None)
    qkv, out = _linears(inner, ("query", "key", "value")), _linears(getattr(module, "output", None), ("dense",))
    if qkv is None or out is None or not hasattr(inner, "num_attention_heads"):
        return None
    return HeadGroup(inner.num_attention_heads, inner.attention_head_size, qkv, out)


def llama_heads(module):
    """q/k/v/o_proj attention (Llama, Mistral, Qwen, ...). Under grouped-query attention k/v heads are
    shared by several query heads, so only the query rows and output columns go."""
    q, k, v, o = _linears(module, ("q_proj", "k_proj", "v_proj", "o_proj")) or (None,) * 4
    if q is None or not hasattr(module, "head_dim"):
        return None
    rows = [q] if getattr(module, "num_key_value_groups", 1) > 1 else [q, k, v]
    return HeadGroup(q.out_features // module.head_dim, module.head_dim, rows, [o])


HEAD_LAYOUTS = (bert_heads, llama_heads)


def head_groups(model):
    """A HeadGroup for each attention layer of a known layout."""
    found = ((layout(module) for layout in HEAD_LAYOUTS) for module in model.modules())
    return [group for groups in found for group in groups if group is not None]


# ---- masks, by torch.nn.utils.prune ----

def _ones(tensor):
    return torch.ones_like(tensor, dtype=torch.bool)  # masks as bool: a quarter of a float copy's memory


def magnitude_masks(scores, amount, scope):
    """Masks zeroing the `amount` fraction of smallest |score|: in each tensor alone (layer) or with
    one threshold over all of them (global, as prune.global_unstructured)."""
    if scope == "layer":
        return [prune.L1Unstructured(amount).compute_mask(s, _ones(s)) for s in scores]
    flat = torch.cat([s.flatten() for s in scores])
    mask = prune.L1Unstructured(amount).compute_mask(flat, _ones(flat))
    return [m.view_as(s) for m, s in zip(mask.split([s.numel() for s in scores]), scores)]


def _unstructured(targets, amount, scope):
    masks = magnitude_masks([m.weight.detach() for m in targets], amount, scope)
    return {(m, "weight"): mask for m, mask in zip(targets, masks)}


def _channels(targets, amount, scope):
    return {(m, "weight"): prune.LnStructured(amount, n=2, dim=output_channel_dim(m)).compute_mask(
        m.weight.detach(), _ones(m.weight)).bool() for m in targets}


def _heads(targets, amount, scope):
    masks = {}
    for group, keep in zip(targets, magnitude_masks([g.norms() for g in targets], amount, scope)):
        masks.update(group.masks(keep))
    return masks


MASKS = {"unstructured": _unstructured, "channels": _channels, "heads": _heads}


class Pruner:
    """Masks for a model's prunable weights at a given sparsity, applied in place."""

    def __init__(self, model, structure, scope):
        self.structure, self.scope, self.masks = structure, scope, {}
        if structure == "heads":
            self.targets = head_groups(model)
            pruned = {id(m) for g in self.targets for m in g.rows + g.columns}
            self.layers = {name: m for name, m in model.named_modules() if id(m) in pruned}
        else:
            self.layers = prunable_layers(model)
            self.targets = list(self.layers.values())
        if not self.targets:
            what = "BERT- or Llama-style attention heads" if structure == "heads" else "Linear/Conv layers"
            raise HftuneError(f"prune_structure: {structure} found no {what} in {type(model).__name__}; "
                              f"choose another prune_structure ({list(STRUCTURES)}).")

    def update(self, sparsity):
        self.masks = MASKS[self.structure](self.targets, sparsity, self.scope)
        self.apply()

    @torch.no_grad()
    def apply(self):
        for (module, name), mask in self.masks.items():
            getattr(module, name).mul_(mask)

    @torch.no_grad()
    def achieved(self):
        """(overall fraction of zeros, {tensor name: fraction}) over the pruned weights, as they are now."""
        weights = {f"{name}.weight": m.weight for name, m in self.layers.items()}
        zeros = {name: int((w == 0).sum()) for name, w in weights.items()}
        total = sum(w.numel() for w in weights.values())
        per_layer = {name: round(zeros[name] / w.numel(), 6) for name, w in weights.items()}
        return round(sum(zeros.values()) / total, 6), per_layer


class PruningCallback(TrainerCallback):
    """Updates the masks on the schedule and re-applies them after every optimizer step."""

    def __init__(self, model, args, train_dataset):
        self.final, self.schedule = args.prune_sparsity, args.prune_schedule or "cubic"
        self.pruner = Pruner(model, args.prune_structure or "unstructured", resolved_scope(args))
        self.window = window_for(args, planned_steps(args, train_dataset))  # checked now, not once training began

    def on_train_begin(self, args, state, control, **kwargs):
        # A fresh run at step 0, or a resumed one: the checkpoint's zeroed weights are the smallest, so
        # recomputing at the last update's sparsity brings the same masks back.
        last = self.window.last_update(state.global_step)
        if last is not None:
            self._update(last)

    def on_step_end(self, args, state, control, **kwargs):
        if self.window.is_update(state.global_step):
            self._update(state.global_step)
        else:
            self.pruner.apply()  # the optimizer step moved pruned weights (momentum, decay): zero them again

    def _update(self, step):
        target = scheduled_sparsity(step, self.final, self.window.start, self.window.end, self.schedule)
        self.pruner.update(target)
        logger.info(f"pruning at step {step}: target sparsity {target:.4f}, achieved {self.pruner.achieved()[0]:.4f}")


def resolved_scope(args):
    return args.prune_scope or ("layer" if args.prune_structure == "channels" else "global")


def pruning_callback(model, args, train_dataset):
    """The callback for `model`, or None without prune_sparsity or training."""
    return None if args.prune_sparsity is None or train_dataset is None else PruningCallback(model, args, train_dataset)


def sparsity_results(trainer, output_dir):
    """{"train_sparsity": overall} from the final weights, with the per-layer figures written to
    output_dir/sparsity.json; {} without pruning."""
    callback = next((c for c in trainer.callback_handler.callbacks if isinstance(c, PruningCallback)), None)
    if callback is None:
        return {}
    overall, per_layer = callback.pruner.achieved()
    if trainer.is_world_process_zero():
        report = {"target": callback.final, "structure": callback.pruner.structure, "scope": callback.pruner.scope,
                  "overall": overall, "layers": per_layer}
        with open(os.path.join(output_dir, SPARSITY_FILE), "w") as f:
            json.dump(report, f, indent=2)
    return {"train_sparsity": overall}


# ---- config checks, before anything loads ----

PRUNE_FIELDS = ("prune_scope", "prune_structure", "prune_schedule", "prune_start_step", "prune_end_step",
                "prune_frequency")


def _check_choice(key, value, choices):
    if value is not None and value not in choices:
        raise HftuneError(f"unknown {key} '{value}'; choose one of {list(choices)}.{closest(value, choices)}")


def check_pruning(args):
    if args.prune_sparsity is None:
        for key in PRUNE_FIELDS:
            if getattr(args, key) is not None:
                raise HftuneError(f"{key} applies only with prune_sparsity; set prune_sparsity or drop {key}.")
        return
    if not 0 <= args.prune_sparsity < 1:
        raise HftuneError(f"prune_sparsity must be in [0, 1) (the final fraction of zeros), got {args.prune_sparsity}.")
    _check_choice("prune_schedule", args.prune_schedule, SCHEDULES)
    _check_choice("prune_scope", args.prune_scope, SCOPES)
    _check_choice("prune_structure", args.prune_structure, STRUCTURES)
    if args.prune_structure == "channels" and args.prune_scope == "global":
        raise HftuneError("prune_structure: channels prunes each layer to the target (channels of different layers "
                          "differ in size); set prune_scope: layer.")
    _check_steps(args)
    _check_launch(args)


def _check_steps(args):
    start, end = args.prune_start_step or 0, args.prune_end_step
    if start < 0 or (args.prune_frequency is not None and args.prune_frequency < 1):
        raise HftuneError("prune_start_step must be >= 0 and prune_frequency >= 1.")
    if end is not None and start >= end:
        raise HftuneError(f"prune_start_step ({start}) must be < prune_end_step ({end}).")
    if end is not None and args.max_steps > 0 and end > args.max_steps:
        raise HftuneError(f"prune_end_step ({end}) is beyond max_steps ({args.max_steps}).")


def _check_launch(args):
    """Masking works on whole parameters that the optimizer updates in place, on every process alike."""
    if deepspeed_config(args) is not None:
        raise HftuneError("prune_sparsity cannot run under DeepSpeed: its optimizer keeps fp32 master weights that "
                          "would overwrite the pruned ones; launch with accelerate_configs/ddp.yaml or one process.")
    if uses_fsdp(args):
        raise HftuneError("prune_sparsity needs whole parameters on every process; FSDP shards them: "
                          "launch with accelerate_configs/ddp.yaml.")
    if args.engine == "pipeline":
        raise HftuneError("prune_sparsity is not supported by engine: pipeline; use engine: trainer or accelerate.")
