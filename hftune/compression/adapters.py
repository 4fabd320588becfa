"""Parameter-efficient fine-tuning through peft: `peft: lora` (with `use_dora` / `use_rslora`),
`ia3`, and for causal-lm `prefix_tuning` / `prompt_tuning`; QLoRA (`load_in_4bit`) on a CUDA GPU.

The backbone stays frozen. Default targets are read off the loaded model: the Linear layers that sit
directly inside attention modules (BERT query/key/value, Llama q/k/v/o_proj, GPT-2 c_attn), else every
Conv2d (ResNet-style). Trained and saved in full beside the adapter (`modules_to_save`): the
classification head, layers the checkpoint did not hold (newly initialised, e.g. BERT's pooler from
an MLM checkpoint) and BatchNorm layers (their running statistics move while training), so that
base + adapter reproduce the trained model exactly.

Saved in output_dir: adapter_config.json + adapter_model.safetensors (Trainer.save_model) and
base_config/config.json (the base model's config with the run's labels); with `merge_adapter: true`
also output_dir/merged, a plain checkpoint that from_pretrained loads without peft.

Example:
    >>> from hftune.run import main
    >>> main(["--peft", "lora", "--merge_adapter", "true", "--max_steps", "2", "--output_dir", "/tmp/lora"])  # doctest: +SKIP
    >>> from transformers import AutoModelForSequenceClassification
    >>> model = AutoModelForSequenceClassification.from_pretrained("/tmp/lora/merged")  # doctest: +SKIP
"""

import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Any, Callable

import torch

from hftune.compression.adapter_modules import (
    as_module_names, check_layers, check_module_names, copy_names, default_modules_to_save, default_target_modules,
    linear_layer_names, warn_unsaved,
)
from hftune.errors import HftuneError, closest
from hftune.launch.checks import shards_parameters, uses_fsdp
from hftune.outputs import BASE_CONFIG_DIR, MERGED_DIR
from hftune.tasks import TASKS, traits
from hftune.tasks.common import pretrained_source

logger = logging.getLogger("hftune")


@dataclass
class ModelFields:
    """PEFT fields (names as in trl's ModelConfig)."""

    peft: str = field(
        default=None,
        metadata={"help": "Parameter-efficient fine-tuning through peft: lora, ia3, prefix_tuning or prompt_tuning "
                          "(the last two causal-lm only). DoRA/rsLoRA: peft: lora with use_dora/use_rslora."},
    )
    lora_r: int = field(default=16, metadata={"help": "peft lora: rank of the update matrices."})
    lora_alpha: int = field(default=32, metadata={"help": "peft lora: scaling numerator (alpha / r, or / sqrt(r) for rsLoRA)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "peft lora: dropout on the adapter's input."})
    lora_target_modules: str | list[str] = field(
        default=None,
        metadata={"help": "Modules the adapter wraps (names, a list, or 'all-linear'); default per family: "
                          "attention projections (BERT/GPT-style), convolutions (ResNet-style)."},
    )
    lora_modules_to_save: str | list[str] = field(
        default=None,
        metadata={"help": "Modules trained and saved in full beside the adapter; default for classification: the head."},
    )
    lora_layers_to_transform: str = field(
        default=None,
        metadata={"help": "peft lora: adapt only these layers (peft's layers_to_transform): indices, comma-separated, "
                          "or a range such as 15-29. Layers below the lowest adapted one need no backward pass."},
    )
    use_dora: bool = field(default=False, metadata={"help": "peft lora: weight-decomposed LoRA (DoRA)."})
    use_rslora: bool = field(default=False, metadata={"help": "peft lora: rank-stabilised scaling alpha / sqrt(r)."})
    num_virtual_tokens: int = field(
        default=20, metadata={"help": "peft prefix_tuning/prompt_tuning: number of virtual tokens."}
    )
    load_in_4bit: bool = field(
        default=False, metadata={"help": "QLoRA: load the base model in 4-bit (bitsandbytes, needs a GPU) under peft: lora."}
    )
    merge_adapter: bool = field(
        default=False, metadata={"help": "After training also write output_dir/merged: base + adapter as a plain checkpoint."}
    )



LORA_FIELDS = ("lora_r", "lora_alpha", "lora_dropout", "lora_layers_to_transform", "use_dora", "use_rslora",
               "load_in_4bit")
MODULE_FIELDS = ("lora_target_modules", "lora_modules_to_save", "merge_adapter")
PROMPT_FIELDS = ("num_virtual_tokens",)


def _lora(model_args, targets, to_save, task_type):
    from peft import LoraConfig

    return LoraConfig(
        r=model_args.lora_r, lora_alpha=model_args.lora_alpha, lora_dropout=model_args.lora_dropout,
        use_dora=model_args.use_dora, use_rslora=model_args.use_rslora, target_modules=targets,
        modules_to_save=to_save, task_type=task_type, revision=model_args.model_revision,
        layers_to_transform=layer_indices(model_args.lora_layers_to_transform),
    )


def layer_indices(value):
    """lora_layers_to_transform as peft takes it: None, or a list of layer indices.

    >>> layer_indices("3-5"), layer_indices("0, 2"), layer_indices(None)
    ([3, 4, 5], [0, 2], None)
    """
    if value is None:
        return None
    indices = []
    try:
        for part in str(value).split(","):
            first, _, last = part.strip().partition("-")
            indices += range(int(first), int(last or first) + 1)
    except ValueError:
        raise HftuneError(f"lora_layers_to_transform '{value}': give layer indices, comma-separated, or a range "
                          "such as 15-29.") from None
    if not indices:
        raise HftuneError(f"lora_layers_to_transform '{value}' names no layer; give e.g. 15-29.")
    return sorted(set(indices))


def _ia3(model_args, targets, to_save, task_type):
    from peft import IA3Config

    # No feed-forward modules: every target's output is scaled by a learned vector.
    return IA3Config(target_modules=targets, feedforward_modules=[], modules_to_save=to_save, task_type=task_type,
                     revision=model_args.model_revision)


def _prefix_tuning(model_args, targets, to_save, task_type):
    from peft import PrefixTuningConfig

    return PrefixTuningConfig(num_virtual_tokens=model_args.num_virtual_tokens, task_type=task_type,
                              revision=model_args.model_revision)


def _prompt_tuning(model_args, targets, to_save, task_type):
    from peft import PromptTuningConfig

    return PromptTuningConfig(num_virtual_tokens=model_args.num_virtual_tokens, task_type=task_type,
                              revision=model_args.model_revision)


@dataclass(frozen=True)
class PeftMethod:
    build: Callable  # (model_args, target modules, modules_to_save, peft task type) -> peft config
    fields: tuple  # the ModelArguments fields it reads; the other PEFT fields set for it are errors
    outputs: tuple = ("classes", "tokens", "spans")  # the task outputs (TaskTraits.output) it applies to
    wraps_modules: bool = True  # prefix/prompt tuning add virtual tokens instead: no targets, nothing to merge


PEFT_METHODS = {
    "lora": PeftMethod(_lora, LORA_FIELDS + MODULE_FIELDS),
    "ia3": PeftMethod(_ia3, MODULE_FIELDS),
    "prefix_tuning": PeftMethod(_prefix_tuning, PROMPT_FIELDS, outputs=("tokens",), wraps_modules=False),
    "prompt_tuning": PeftMethod(_prompt_tuning, PROMPT_FIELDS, outputs=("tokens",), wraps_modules=False),
}
PEFT_FIELDS = LORA_FIELDS + MODULE_FIELDS + PROMPT_FIELDS


# ---- checks on the config alone (parse time) ----

def _changed(model_args):
    """PEFT fields set to something other than their default, in declaration order."""
    defaults = {f.name: f.default for f in fields(model_args)}
    return [name for name in PEFT_FIELDS if getattr(model_args, name) != defaults[name]]


def check_peft_args(model_args, data_args, training_args):
    """Refuse, before anything loads, PEFT settings that would be ignored or cannot run."""
    method, changed = model_args.peft, _changed(model_args)
    if method is None:
        if changed:
            raise HftuneError(f"{changed[0]} is set but peft is not; set peft: lora (or {', '.join(PEFT_METHODS)}) "
                              f"or drop {changed[0]}.")
        return
    if model_args.model_type:
        raise HftuneError(f"peft {method} adapts a pretrained checkpoint; a model_type model trained from scratch "
                          "trains whole: drop peft, or fine-tune a model_name_or_path.")
    if method not in PEFT_METHODS:
        raise HftuneError(f"unknown peft '{method}'.{closest(method, PEFT_METHODS)} "
                          f"Choose one of {list(PEFT_METHODS)}.")
    spec = PEFT_METHODS[method]
    if traits(data_args.task).output not in spec.outputs:
        tasks = [name for name in TASKS if traits(name).output in spec.outputs]
        raise HftuneError(f"peft {method} only applies to task {', '.join(tasks)} (it prepends virtual tokens to "
                          f"a causal LM's input); use peft: lora or ia3 for {data_args.task}.")
    for name in changed:
        if name not in spec.fields:
            raise HftuneError(f"{name} does not apply to peft {method}; drop it.")
    _check_values(model_args)
    _check_combinations(method, training_args)
    if model_args.load_in_4bit:
        check_qlora(data_args, training_args)


check_config = check_peft_args  # the feature's parse-time check (hftune.features)


def _check_values(model_args):
    if model_args.lora_r < 1:
        raise HftuneError(f"lora_r must be >= 1, got {model_args.lora_r}.")
    if not 0 <= model_args.lora_dropout < 1:
        raise HftuneError(f"lora_dropout must be in [0, 1), got {model_args.lora_dropout}.")
    if model_args.num_virtual_tokens < 1:
        raise HftuneError(f"num_virtual_tokens must be >= 1, got {model_args.num_virtual_tokens}.")
    layer_indices(model_args.lora_layers_to_transform)


def _check_combinations(method, args):
    if args.engine == "pipeline":
        raise HftuneError(f"peft {method} does not run on engine: pipeline (its stages are built from the plain "
                          "model); use engine: trainer.")
    if uses_fsdp(args):
        raise HftuneError(f"peft {method} under FSDP is not supported; launch with accelerate_configs/ddp.yaml, "
                          "deepspeed_zero2.yaml or deepspeed_zero3.yaml.")
    if getattr(args, "prune_sparsity", None) is not None:
        raise HftuneError(f"prune_sparsity cannot be combined with peft {method}: pruning changes the frozen base "
                          "weights, which the adapter does not save; drop one of them.")
    if getattr(args, "quantize", None) is not None and not PEFT_METHODS[method].wraps_modules:
        raise HftuneError(f"quantize needs the adapter merged into the model, which peft {method} cannot be; "
                          "use peft: lora or ia3, or drop quantize.")


def check_qlora(data_args, args):
    """QLoRA needs bitsandbytes on a CUDA GPU: refused here, before any model is loaded."""
    import importlib.util

    if not torch.cuda.is_available():
        raise HftuneError("load_in_4bit (QLoRA) needs a CUDA GPU with bitsandbytes and this machine has no GPU; "
                          "drop load_in_4bit to train LoRA on the full-precision model.")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise HftuneError("load_in_4bit (QLoRA) needs bitsandbytes: pip install bitsandbytes.")
    if traits(data_args.task).inputs == "image":  # (not "no peft TaskType": multiple-choice has none, and Linear layers)
        raise HftuneError(f"load_in_4bit quantizes Linear layers; {data_args.task} models are convolutional: drop it.")
    if shards_parameters(args):
        raise HftuneError("load_in_4bit cannot be sharded by ZeRO-3 or FSDP here; launch with ddp.yaml or ZeRO-2.")


def quantized_loading(model_args, task):
    """from_pretrained arguments for QLoRA: 4-bit NF4 weights (double quantization, bf16 compute), each
    process's copy on its own GPU; {} without load_in_4bit."""
    if not model_args.load_in_4bit:
        return {}
    from accelerate import PartialState
    from transformers import BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        # a classification head must stay float: it is trained in full (modules_to_save)
        llm_int8_skip_modules=["classifier", "score", "pooler"] if traits(task).output == "classes" else None,
    )
    return {"quantization_config": quantization, "device_map": {"": PartialState().local_process_index}}


# ---- applying and saving ----

def apply_peft(model, model_args, data_args, training_args):
    """The model wrapped by peft as model_args asks (unchanged without `peft`), plus an AdapterSaver."""
    if model_args.peft is None:
        return model, None
    from peft import get_peft_model, prepare_model_for_kbit_training

    spec, task = PEFT_METHODS[model_args.peft], data_args.task
    targets = to_save = None
    if spec.wraps_modules:
        targets = as_module_names(model_args.lora_target_modules) or default_target_modules(model)
        if targets == "all-linear" and getattr(model_args, "lora_layers_to_transform", None):
            targets = linear_layer_names(model)  # peft takes layers_to_transform with a list of names only
        to_save = as_module_names(model_args.lora_modules_to_save) or default_modules_to_save(model, task)
        warn_unsaved(model, to_save)
        check_module_names(model, targets, "lora_target_modules", layers_only=True)
        check_module_names(model, to_save, "lora_modules_to_save")
        check_layers(model, layer_indices(getattr(model_args, "lora_layers_to_transform", None)))
    if model_args.load_in_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=training_args.gradient_checkpointing)
    # copies: peft's sequence-classification model appends its own head names to the list it is given
    config = spec.build(model_args, copy_names(targets), copy_names(to_save), traits(task).peft_task_type)
    try:
        model = get_peft_model(model, config)
    except ValueError as err:  # e.g. a target whose layer type peft cannot adapt
        raise HftuneError(f"peft {model_args.peft}: {' '.join(str(err).split())[:300]}") from None
    trainable, total = model.get_nb_trainable_parameters()
    where = f"; targets {targets}, modules_to_save {to_save}" if spec.wraps_modules else ""
    logger.info(f"PEFT {describe(model_args)}: {trainable:,} of {total:,} parameters trainable "
                f"({100 * trainable / total:.2f}%){where}")
    return model, AdapterSaver(model_args, model.get_base_model())


def describe(model_args):
    if not PEFT_METHODS[model_args.peft].wraps_modules:
        return f"{model_args.peft} ({model_args.num_virtual_tokens} virtual tokens)"
    if model_args.peft == "ia3":
        return "IA3"
    variant = "DoRA" if model_args.use_dora else "LoRA"
    scaling = "rsLoRA alpha/sqrt(r)" if model_args.use_rslora else "alpha/r"
    return (f"{variant} (r={model_args.lora_r}, lora_alpha={model_args.lora_alpha}, {scaling}, "
            f"lora_dropout={model_args.lora_dropout}{', 4-bit base' if model_args.load_in_4bit else ''}"
            + (f", layers {model_args.lora_layers_to_transform}" if model_args.lora_layers_to_transform else "") + ")")


@contextmanager
def zero3_init_disabled():
    """Under an active ZeRO-3 config, from_pretrained partitions the model as it builds it (deepspeed's
    zero.Init), a collective every process must join: one process loading alone would wait forever.
    The config is hidden while it loads, then restored. (accelerate's zero3_init_context_manager
    re-registers a ZeRO-3 config in accelerate 1.15 and so does not help here.)"""
    from transformers.integrations import deepspeed as hf_deepspeed

    ref = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = ref


@dataclass
class AdapterSaver:
    """Writes what the adapter needs beside it once the engine has saved it (every process calls `save`)."""

    model_args: Any
    base_model: Any  # the wrapped transformers model: its class and config (labels, dropout) are the base's

    def save(self, engine, processor):
        out = engine.args.output_dir
        if engine.is_world_process_zero():
            self.base_model.config.save_pretrained(os.path.join(out, BASE_CONFIG_DIR))
            if self.model_args.merge_adapter:
                self.write_merged(out, processor)
        engine.accelerator.wait_for_everyone()

    def summary(self, out, pipeline_task, usage=None):
        """The end-of-run lines: where the adapter is and how to load it (usage: TaskBundle.usage, where
        transformers has no pipeline for the task)."""
        lines = [f"  adapter saved to {out} (base model: {self.model_args.model_name_or_path}, "
                 f"its config with this run's labels: {os.path.join(out, BASE_CONFIG_DIR)})"]
        merged = os.path.join(out, MERGED_DIR)
        if self.model_args.merge_adapter and usage:
            lines.append(f"  load the merged model: {usage.format(ref=merged).splitlines()[-1]}")
        elif self.model_args.merge_adapter:
            lines.append(f'  load the merged model: transformers.pipeline("{pipeline_task}", model="{merged}")')
        else:
            lines.append(f'  load it: peft.PeftModel.from_pretrained(base_model, "{out}")')
        return lines

    def write_merged(self, out, processor):
        """output_dir/merged: the base reloaded from its checkpoint, the saved adapter loaded onto it
        (exactly as a user would) and merged in; a plain checkpoint for from_pretrained."""
        from peft import PeftModel
        from transformers import AutoConfig

        path, common = pretrained_source(self.model_args)
        config = AutoConfig.from_pretrained(os.path.join(out, BASE_CONFIG_DIR), **common)
        with zero3_init_disabled():
            # ignore_mismatched_sizes: a head resized for this data set is in the adapter (modules_to_save)
            base = type(self.base_model).from_pretrained(path, config=config, dtype=torch.float32,
                                                         ignore_mismatched_sizes=True, **common)
            merged = PeftModel.from_pretrained(base, out).merge_and_unload()
        merged.save_pretrained(os.path.join(out, MERGED_DIR))
        if processor is not None:
            processor.save_pretrained(os.path.join(out, MERGED_DIR))
        logger.info(f"merged base + adapter written to {os.path.join(out, MERGED_DIR)}")
