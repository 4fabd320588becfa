"""Speed defaults on a GPU, taken only where the config leaves the choice open, and logged with the
setting that turns each one off.

- bf16 mixed precision on a GPU that supports it, unless a precision was chosen anywhere: fp16 or
  bf16 in the recipe or on the command line, the accelerate config's mixed_precision (other than
  "no"), or an explicit fp16/bf16 `enabled` in the DeepSpeed JSON ("auto" follows the flags).
- channels-last memory format for CNNs, the layout cuDNN's fastest convolution kernels read.

Fused AdamW (TrainingArguments' default optim since torch 2.8) and SDPA attention (transformers'
default; it dispatches to flash kernels on a GPU) need nothing from hftune. torch.compile stays
opt-in (`torch_compile: true`): it compiles for minutes before the first step.
"""

import json
import logging
import os

import torch

logger = logging.getLogger("hftune")


def on_gpu():
    return torch.cuda.is_available()


def gpu_supports_bf16():
    return on_gpu() and torch.cuda.is_bf16_supported()


def _deepspeed_json(flags):
    """The DeepSpeed config: `deepspeed` as a path or inline JSON (a recipe's mapping), or the JSON the
    accelerate config names; {} when there is none (or it cannot be read: DeepSpeed will say why)."""
    value = str(flags.get("deepspeed") or os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") or "")
    try:
        if value.lstrip().startswith("{"):
            return json.loads(value)
        with open(value) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return {}


def precision_chosen(flags):
    """Whether the run already names a precision. `flags`: {flag name: value} from recipe and CLI."""
    if "fp16" in flags or "bf16" in flags:
        return True
    if os.environ.get("ACCELERATE_MIXED_PRECISION", "no") != "no":
        return True
    ds = _deepspeed_json(flags)
    return any(isinstance((ds.get(name) or {}).get("enabled"), bool) for name in ("fp16", "bf16"))


def bf16_by_default(flags):
    return gpu_supports_bf16() and not precision_chosen(flags)


def warn_slow_cpu_bf16(training_args):
    """bf16 on a CPU without native bf16 instructions (AVX512-BF16 / AMX) runs emulated: measured on a
    2-core AVX2 machine, a 2048x2048 bf16 matmul took 300x the fp32 one and a SmolLM2-135M forward under
    bf16 autocast 4-6x. Such a CPU trains in fp32 by default; a bf16 the user asked for is kept, with this warning."""
    if training_args.bf16 and not on_gpu() and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        logger.warning(f"bf16: true on a CPU without native bf16 ({torch.backends.cpu.get_cpu_capability()}): "
                       "several times slower than fp32 here; drop bf16 unless you are checking bf16 itself.")


def log_bf16_default():
    logger.info("precision: bf16 mixed precision (hftune's default on a bf16-capable GPU; bf16: false trains in fp32)")


def channels_last(model):
    """CNNs on a GPU: weights in channels-last layout (inputs follow the weights' layout in cuDNN)."""
    if on_gpu():
        model.to(memory_format=torch.channels_last)
        logger.info("memory format: channels-last (hftune's default for CNNs on a GPU)")
    return model
