"""Post-training dynamic int8 quantization for deployment (`quantize: dynamic`).

After training, a CPU copy of the fine-tuned model has its Linear layers replaced by torch's
dynamically quantized ones (int8 weights, activations quantized on the fly): the copy is written to
`output_dir/quantized/` and both models are evaluated on the validation split by the same CPU loop,
so the metric before and after and the size on disk land side by side in `quantize_results.json`
(and `all_results.json`).

Only Linear layers are quantized: torch's dynamic quantization has no working convolution kernel
(its DynamicQuantizedConv2d was measured to return near-zero outputs), so a CNN keeps float
convolutions and shrinks little; `quantize_int8_fraction` says how much of the model was quantized.

Example:
    >>> from hftune.compression.quantization import load_quantized
    >>> model = load_quantized("output_dir/quantized")  # doctest: +SKIP
"""

import copy
import io
import logging
import os
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import AutoConfig, EvalPrediction
from transformers.pytorch_utils import Conv1D

from hftune.errors import HftuneError
from hftune.launch.checks import shards_parameters

logger = logging.getLogger("hftune")


@dataclass
class TrainingFields:
    """Post-training quantization."""

    quantize: str = field(
        default=None,
        metadata={"help": "dynamic: also write a post-training dynamic int8 copy of the model to output_dir/quantized."},
    )


METHODS = ("dynamic",)
WEIGHTS_NAME = "quantized_model.pt"


def check_quantize_args(args):
    if args.quantize is None:
        return
    if args.quantize not in METHODS:
        raise HftuneError(f"unknown quantize '{args.quantize}'; choose one of {list(METHODS)} or drop it.")
    if shards_parameters(args) or args.engine == "pipeline":
        raise HftuneError("quantize needs the whole trained model in one process; ZeRO-3, FSDP and the pipeline "
                          "engine split it (use DDP or ZeRO-1/2, or quantize the saved model with a 1-process run).")


check_training = check_quantize_args  # runs while TrainingArguments parses (hftune.features)


def _conv1d_to_linear(model):
    """GPT-2 style models use transformers' Conv1D (a Linear with its weight transposed), which torch's
    quantizer does not know: swap each for the equivalent nn.Linear."""
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, Conv1D):
                linear = torch.nn.Linear(child.weight.shape[0], child.nf)
                linear.weight.data = child.weight.data.t().contiguous()
                linear.bias.data = child.bias.data
                setattr(parent, name, linear)
    return model


def _quantizable_linears(model):
    """Names of the Linear layers to quantize: all but an output layer tied to the input embeddings,
    whose int8 copy would be stored beside the float embedding it shares weights with now."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = output is not None and output.weight is model.get_input_embeddings().weight
    return {name for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and not (tied and module is output)}


def quantize_dynamic_int8(model):
    """An int8 copy of a float model: Linear (and Conv1D) layers dynamically quantized, on CPU."""
    from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic

    model = _conv1d_to_linear(model).cpu().eval()
    spec = dict.fromkeys(_quantizable_linears(model), default_dynamic_qconfig)
    with warnings.catch_warnings():  # torch.ao's deprecation notices, repeated for every layer
        warnings.simplefilter("ignore")
        return quantize_dynamic(model, spec, dtype=torch.qint8)


def float_copy(model):
    """A plain float CPU copy of the trained model (PEFT adapters merged into it)."""
    model = copy.deepcopy(model).cpu().float().eval()
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


def int8_fraction(model):
    """Share of the float model's parameters that get quantized (`model` already has Linear for Conv1D)."""
    total = sum(p.numel() for p in model.parameters())  # tied weights counted once
    names = _quantizable_linears(model)
    quantized = sum(m.weight.numel() for name, m in model.named_modules() if name in names)
    return quantized / total if total else 0.0


def serialized_size(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    return buffer.tell()


@torch.no_grad()
def evaluate_on_cpu(model, dataset, collator, compute_metrics, batch_size):
    """Loss (and the task's metrics) of `model` on `dataset`, one CPU process, as Trainer computes them:
    the batch losses weighted by batch size, the metrics from the concatenated logits."""
    losses, logits, labels = [], [], []
    for start in range(0, len(dataset), batch_size):
        batch = collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        outputs = model(**batch)
        size = len(batch["labels"])
        losses.append(outputs.loss.float().repeat(size))
        if compute_metrics is not None:
            logits.append(outputs.logits.float().numpy())
            labels.append(batch["labels"].numpy())
    metrics = {"eval_loss": torch.cat(losses).mean().item()}
    if compute_metrics is not None:
        metrics.update(compute_metrics(EvalPrediction(np.concatenate(logits), np.concatenate(labels))))
        metrics = {k if k.startswith("eval_") else f"eval_{k}": v for k, v in metrics.items()}
    return metrics


def quantize_and_compare(model, bundle, args):
    """Write output_dir/quantized and return the quantize_* results (before/after metric and size)."""
    start = time.time()
    original = _conv1d_to_linear(float_copy(model))
    fraction = int8_fraction(original)
    quantized = quantize_dynamic_int8(float_copy(model))
    folder = os.path.join(args.output_dir, "quantized")
    os.makedirs(folder, exist_ok=True)
    quantized.config.architectures = [type(original).__name__]  # what load_quantized rebuilds
    quantized.config.save_pretrained(folder)
    if bundle.processor is not None:
        bundle.processor.save_pretrained(folder)
    torch.save(quantized.state_dict(), os.path.join(folder, WEIGHTS_NAME))
    results = {
        "quantize_before_size_mb": serialized_size(original.state_dict()) / 2**20,
        "quantize_after_size_mb": os.path.getsize(os.path.join(folder, WEIGHTS_NAME)) / 2**20,
        "quantize_int8_fraction": fraction,
    }
    if bundle.eval_dataset is not None:
        for when, candidate in (("before", original), ("after", quantized)):
            metrics = evaluate_on_cpu(candidate, bundle.eval_dataset, bundle.data_collator,
                                      bundle.compute_metrics, args.per_device_eval_batch_size)
            if bundle.derived_metrics is not None:
                metrics.update(bundle.derived_metrics(metrics))
            results.update({f"quantize_{when}_{key}": value for key, value in metrics.items()})
    results["quantize_runtime"] = time.time() - start
    logger.info(f"quantize dynamic int8: {fraction:.0%} of the parameters quantized, "
                f"{results['quantize_before_size_mb']:.2f} MB -> {results['quantize_after_size_mb']:.2f} MB, "
                f"written to {folder}")
    return results


def load_quantized(folder):
    """The int8 model `quantize: dynamic` wrote: the architecture rebuilt from config.json, quantized
    the same way, then its saved int8 state loaded (weights_only: no arbitrary pickle)."""
    import transformers

    config = AutoConfig.from_pretrained(folder)
    model = getattr(transformers, config.architectures[0])(config)
    model = quantize_dynamic_int8(model)
    state = torch.load(os.path.join(folder, WEIGHTS_NAME), weights_only=True)
    model.load_state_dict(state)
    return model
