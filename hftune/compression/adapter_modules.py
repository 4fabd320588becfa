"""Which modules a peft adapter targets and which it carries in full (hftune/compression/adapters.py
applies them): the defaults read off the loaded model, and the checks of names a recipe gives."""

import logging

from torch import nn
from transformers.pytorch_utils import Conv1D

from hftune.errors import HftuneError
from hftune.tasks import traits

logger = logging.getLogger("hftune")
ADAPTABLE = (nn.Linear, Conv1D, nn.Conv2d)  # the layer types named in error messages


# ---- defaults read off the loaded model ----

def _leaf(name):
    return name.rsplit(".", 1)[-1]


def default_target_modules(model):
    """Names of the Linear layers directly inside attention modules, minus names also used outside
    attention (GPT-2's c_proj is its MLP's output too); without attention, the Conv2d layers."""
    inside, outside = set(), set()
    for module in model.modules():
        in_attention = "attention" in type(module).__name__.lower()
        for name, child in module.named_children():
            if isinstance(child, (nn.Linear, Conv1D)):
                (inside if in_attention else outside).add(name)
    targets = inside - outside or {_leaf(n) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    if not targets:
        raise HftuneError(f"no attention projection or convolution found in {type(model).__name__} to adapt; "
                          "name the layers in lora_target_modules (or 'all-linear').")
    return sorted(targets)


def linear_layer_names(model):
    """What peft's 'all-linear' adapts, as names: every Linear layer's but the output head's."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return sorted({_leaf(n) for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D)) and m is not head})


def _outermost(names):
    """Drop names inside another listed module (peft wraps the outer one whole)."""
    return [n for n in dict.fromkeys(names) if not any(n.startswith(other + ".") for other in names)]


def default_modules_to_save(model, task):
    """What base + adapter must carry in full to reproduce the trained model: the head (top-level
    modules outside the backbone) for classification, layers the checkpoint lacked, BatchNorm layers."""
    keep = []
    if traits(task).output != "tokens":  # a task head: classes or spans
        backbone = model.base_model
        keep += [n for n, child in model.named_children()
                 if child is not backbone and next(child.parameters(), None) is not None]
    keep += newly_initialised(model)
    keep += [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    return _outermost(keep) or None


def newly_initialised(model):
    """Modules with parameters the checkpoint did not hold. from_pretrained marks every parameter it
    loaded (transformers' own record of what to initialise); unmarked ones were drawn at random and
    exist nowhere but in this run. [] for a model that was not loaded by from_pretrained."""
    if not any(getattr(p, "_is_hf_initialized", False) for p in model.parameters()):
        return []
    return [n for n, m in model.named_modules()
            if any(not getattr(p, "_is_hf_initialized", False) for p in m.parameters(recurse=False))]


def warn_unsaved(model, to_save):
    """A random layer left out of an explicit lora_modules_to_save makes base + adapter differ from the run."""
    saved = to_save if isinstance(to_save, list) else []
    for name in newly_initialised(model):
        if not any(f".{s}." in f".{name}." for s in saved):  # the module itself or one around it is saved
            logger.warning(f"{name} is not in the checkpoint (initialised at random) and not in lora_modules_to_save: "
                           "the saved adapter will not reproduce the trained model; add it to lora_modules_to_save.")


def as_module_names(value):
    """lora_target_modules / lora_modules_to_save (a name, a list, or comma-separated names from the CLI)
    as peft takes them: a list of names, or 'all-linear'."""
    if value is None:
        return None
    names = [n.strip() for item in ([value] if isinstance(value, str) else value) for n in item.split(",") if n.strip()]
    return "all-linear" if names == ["all-linear"] else names


def copy_names(names):
    return list(names) if isinstance(names, list) else names


def check_module_names(model, names, key, layers_only=False):
    """Every name must match a module as peft matches it (the whole dotted path or its last parts);
    adapter targets must be layers, not containers such as a whole attention block."""
    modules = list(model.named_modules())
    for name in names if isinstance(names, list) else []:
        matched = [m for path, m in modules if path == name or path.endswith("." + name)]
        if not matched or (layers_only and all(next(m.children(), None) is not None for m in matched)):
            valid = sorted({_leaf(p) for p, m in modules if isinstance(m, ADAPTABLE)})
            what = "no module" if not matched else "no layer (only modules holding others)"
            raise HftuneError(f"{key}: '{name}' names {what} of {type(model).__name__}; "
                              f"valid names include {valid[:12]}.")


def check_layers(model, indices):
    count = getattr(model.config.get_text_config(), "num_hidden_layers", None)
    outside = [i for i in indices or () if count is not None and i >= count]
    if outside:
        raise HftuneError(f"lora_layers_to_transform: layer {outside[0]} is not among the {count} layers of "
                          f"{type(model).__name__} (0-{count - 1}).")
