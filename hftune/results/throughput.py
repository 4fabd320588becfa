"""Throughput, model FLOPs utilization (MFU) and peak memory of a training run, for engines
`trainer` and `accelerate` (`pipeline` runs its own loop and writes none of these fields).

What is measured, per process, then added up over processes:
- The window: every optimizer step after the first (the first is warm-up: allocator, kernel
  selection, and the FLOP count below), from one step's end to the next, so data loading counts;
  evaluation and checkpointing during training do not (the clock restarts at on_evaluate/on_save).
  A run of a single step is measured whole. On a GPU the device is synchronized at the window's ends.
- Samples and real tokens of every micro-batch the model trains on (a forward pre-hook, so both
  engines count alike): tokens are the attention mask's sum, or every input id when a batch has no
  mask (packed blocks, or flattened sequences marked by position_ids, which carry no padding).
  Token ids are not compared with pad_token_id: a tokenizer whose pad is its EOS would lose real EOS.
  A line-search optimizer re-running one batch counts it once. Images have no tokens.
- Model FLOPs, by the usual MFU convention (PaLM, Megatron): the FLOPs the model needs, not what
  the hardware ran (activation recomputation and line-search re-runs are overhead, not work):
  - token inputs: 6 x N per real token when every weight trains, N = the non-embedding parameters
    (as Trainer's floating_point_ops and Kaplan et al.'s C = 6N), plus an output head tied to the
    input embedding, whose matmul runs on every token. With frozen weights (PEFT, frozen layers)
    each weight counts 2 (forward) + 2 where the backward pass runs through it (it comes after the
    first trainable parameter) + 2 where it trains itself: LoRA on every layer is ~4N, on the upper
    half ~3N. Attention's sequence-length term is not counted (small at fine-tuning's lengths).
  - other inputs (CNNs, 6N per token does not apply): 3 x the forward FLOPs that
    torch.utils.flop_counter.FlopCounterMode counts on the first training batch, per sample.
  Trainer's own total_flos uses 6 x N x every input element, padding and pixels included.
- Peak FLOP/s of the device (the MFU denominator): on a GPU named in GPU_PEAKS its dense tensor-core
  peak for the run's precision (bf16/fp16, else TF32 when enabled, else plain fp32); on CPU or an
  unlisted device a measured matmul peak (best of repeated square matmuls in the run's dtype, with
  torch's threads; once per process, about half a second), so a busy machine measures a lower peak.
- Peak memory: torch.cuda.max_memory_allocated on a GPU, else the process's peak RSS
  (getrusage ru_maxrss); in MiB, since the process started, its kind named in train_peak_memory_kind.
Several processes: samples, tokens, FLOP/s and peak FLOP/s (world_size x each process's peak) are
summed, the window is the slowest process's, peak memory the largest process's.

Example:
    >>> import torch
    >>> batch = {"input_ids": torch.ones(2, 4), "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])}
    >>> [int(n) for n in batch_counts(batch)]
    [2, 7]
    >>> model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 3))
    >>> matmul_parameters(model)  # the Linear's weight and bias; the embedding lookup does no matmul
    15
    >>> measured_matmul_peak("cpu", torch.float32) > 1e8
    True
"""

import functools
import logging
import resource
import sys
import time

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers import DataCollatorWithFlattening, TrainerCallback

logger = logging.getLogger("hftune")

# Dense peaks in TFLOP/s (NVIDIA datasheets, no 2:4 sparsity): (bf16/fp16, tf32, fp32), matched as a
# substring of torch.cuda.get_device_name, first match wins ("H100 PCIe" before the SXM "H100").
GPU_PEAKS = {
    "H200": (989, 494, 67),
    "H100 PCIe": (756, 378, 51),
    "H100": (989, 494, 67),
    "A100": (312, 156, 19.5),
}
MAIN_INPUTS = ("input_ids", "pixel_values", "input_values", "inputs_embeds")


def batch_counts(inputs, flattened=False):
    """(samples, real tokens or None) of one batch of model inputs; `flattened`: the batch's texts
    were flattened into one row (DataCollatorWithFlattening), each starting at position 0. Packed
    blocks carry position ids too, but a block is a sample, as Trainer counts it."""
    ids = inputs.get("input_ids")
    main = next(inputs[k] for k in MAIN_INPUTS if k in inputs)
    if ids is None:
        return main.shape[0], None
    if "attention_mask" in inputs:
        return ids.shape[0], inputs["attention_mask"].sum()
    if flattened and "position_ids" in inputs:
        return (inputs["position_ids"] == 0).sum(), ids.numel()
    return ids.shape[0], ids.numel()


def training_flops_per_parameter(model):
    """{id(parameter): training FLOPs per token per element} for the parameters that take part in a
    matmul for every token: all but the input embeddings (a lookup), counting an output head tied to
    them. 2 forward, 2 where gradients flow back through it (registered after the first trainable
    parameter: the models' layer order), 2 where it trains."""
    lookups = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        lookups.discard(id(head.weight))
    flops, backward = {}, False
    for p in model.parameters():
        backward = backward or p.requires_grad
        if id(p) not in lookups:
            flops[id(p)] = 2 + 2 * backward + 2 * p.requires_grad
    return flops


def numel(p):
    return getattr(p, "ds_numel", p.numel())  # ZeRO-3 leaves a stub per parameter: ds_numel is its size


def _synchronize(device):
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


@functools.cache
def measured_matmul_peak(device_type, dtype, size=1024, budget_s=0.5):
    """FLOP/s of the fastest of repeated size x size matmuls (the first warms up) within budget_s."""
    device = torch.device(device_type)
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    best, start = float("inf"), time.perf_counter()
    for run in range(1000):
        _synchronize(device)
        began = time.perf_counter()
        torch.matmul(a, b)
        _synchronize(device)
        if run:
            best = min(best, time.perf_counter() - began)
        if run >= 3 and time.perf_counter() - start > budget_s:
            break
    return 2 * size**3 / best


def peak_flops(device, args):
    """(FLOP/s, where the figure comes from) for one process of this run."""
    dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peaks = next((p for key, p in GPU_PEAKS.items() if key in name), None)
        if peaks is not None:
            tf32 = torch.backends.cuda.matmul.fp32_precision == "tf32"  # set by TrainingArguments' tf32, either API
            precision = "bf16/fp16" if dtype != torch.float32 else "tf32" if tf32 else "fp32"
            peak = peaks[0] if dtype != torch.float32 else peaks[1] if tf32 else peaks[2]
            return peak * 1e12, f"{name} dense {precision} datasheet peak"
    size = 1024 if device.type == "cpu" else 8192  # each large enough to reach the BLAS plateau
    peak = measured_matmul_peak(device.type, dtype, size)
    threads = f", {torch.get_num_threads()} thread(s)" if device.type == "cpu" else ""
    return peak, f"measured {str(dtype).removeprefix('torch.')} matmul peak on {device.type}{threads}"


def peak_memory(device):
    """(MiB, kind): the most memory this process has held."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda max_memory_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10), "process peak RSS"


class ThroughputCallback(TrainerCallback):
    """Counts what the model trains on and times the steps; `metrics` holds the train_* fields after training."""

    def __init__(self, model, accelerator, collator=None):
        self.model, self.accelerator = model, accelerator
        self.flattened = isinstance(collator, DataCollatorWithFlattening)
        self.flops_per_sample = self.metrics = self._mark = None  # _mark: None outside training's steps

    def _count_flops(self):
        """Per-token FLOPs, once training starts: only then is it settled which weights train (PEFT)."""
        model = self.model
        per_element = training_flops_per_parameter(model)
        self.flops_per_token = sum(per_element[id(p)] * numel(p) for p in model.parameters() if id(p) in per_element)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        # the head runs only at `logits_to_keep` positions where a batch names them (sft): counted apart
        self.head_flops = per_element[id(head.weight)] * numel(head.weight) if head is not None else 0

    # ---- counting, from the model's forward ----

    def _before_forward(self, module, args, kwargs):
        main = next((kwargs[k] for k in MAIN_INPUTS if k in kwargs), None)
        if not module.training or main is None or main is self._last_input:  # eval, or a line search's re-run
            return
        self._last_input = main
        samples, tokens = batch_counts(kwargs, self.flattened)
        self._samples, self._tokens = self._samples + samples, self._tokens + (tokens or 0)
        kept = kwargs.get("logits_to_keep")
        if torch.is_tensor(kept) and tokens is not None:
            # positions whose logits were not computed (a new number: `+=` on a tensor would change the warm-up's)
            self._skipped_head = self._skipped_head + int(tokens) - main.shape[0] * kept.numel()
        if tokens is None and self.flops_per_sample is None:
            self._flop_counter = FlopCounterMode(display=False)
            self._flop_counter.__enter__()
            self._counted_samples = samples

    def _after_forward(self, module, args, kwargs, output):
        if self._flop_counter is not None:
            self._flop_counter.__exit__(None, None, None)
            self.flops_per_sample = 3 * self._flop_counter.get_total_flops() / self._counted_samples
            self._flop_counter = None

    # ---- timing ----

    def on_train_begin(self, args, state, control, **kwargs):
        self._count_flops()
        self._samples = self._tokens = self._seconds = self._steps = self._skipped_head = 0
        self._warmup = self._mark = self._last_input = self._flop_counter = None
        self._hooks = [self.model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
                       self.model.register_forward_hook(self._after_forward, with_kwargs=True)]

    def on_step_begin(self, args, state, control, **kwargs):
        if self._mark is None:  # the first step: timed from here, later steps from the previous step's end
            self._mark = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._steps == 0 or state.global_step >= state.max_steps:  # the window's ends
            _synchronize(self.accelerator.device)
        now = time.perf_counter()
        self._seconds += now - self._mark
        self._mark, self._steps = now, self._steps + 1
        if self._steps == 1:
            self._warmup = (self._samples, self._tokens, self._seconds, self._skipped_head)

    def on_evaluate(self, args, state, control, **kwargs):
        self._restart_clock()  # evaluating is no training time

    def on_save(self, args, state, control, **kwargs):
        self._restart_clock()  # nor is checkpointing

    def _restart_clock(self):
        if self._mark is not None:
            self._mark = time.perf_counter()

    def on_train_end(self, args, state, control, **kwargs):
        for hook in self._hooks:
            hook.remove()
        self._last_input = self._mark = None
        if self._steps == 0:
            return
        # measured here, after Trainer took train_runtime: its ~0.5 s would otherwise count as training time
        self._peak, self._peak_source = peak_flops(self.accelerator.device, args)
        self.metrics = self._results()
        if state.is_world_process_zero:
            logger.info(summary(self.metrics))

    # ---- results ----

    def _results(self):
        counts = [self._samples, self._tokens, self._seconds, self._skipped_head]
        if self._steps > 1:  # leave the warm-up step out
            counts = [total - first for total, first in zip(counts, self._warmup)]
        memory, kind = peak_memory(self.accelerator.device)
        mine = torch.tensor([float(c) for c in counts] + [self._peak, memory], dtype=torch.float64,
                            device=self.accelerator.device)
        every = self.accelerator.gather(mine).reshape(-1, len(mine))
        samples, tokens, peak = every[:, 0].sum().item(), every[:, 1].sum().item(), every[:, 4].sum().item()
        seconds, memory, skipped = every[:, 2].max().item(), every[:, 5].max().item(), every[:, 3].sum().item()
        source = self._peak_source
        if self.accelerator.num_processes > 1:
            source += f", summed over {self.accelerator.num_processes} processes"
        metrics = {"train_measured_steps": max(self._steps - 1, 1), "train_measured_seconds": seconds,
                   "train_measured_samples_per_second": samples / seconds}
        if self.flops_per_sample is None:
            metrics["train_real_tokens_per_second"] = tokens / seconds
            per_token = self.flops_per_token - (self.head_flops * skipped / tokens if skipped and tokens else 0)
            metrics["train_model_flops_per_token"] = per_token  # the head's skipped positions left out
            achieved = per_token * tokens / seconds
        else:
            metrics["train_model_flops_per_sample"] = self.flops_per_sample
            achieved = self.flops_per_sample * samples / seconds
        return {**metrics, "train_model_flops_per_second": achieved, "train_peak_flops": peak,
                "train_peak_flops_source": source, "train_mfu": achieved / peak,
                "train_peak_memory_mib": memory, "train_peak_memory_kind": kind}


def summary(metrics):
    """The one line a run logs at its end."""
    tokens = metrics.get("train_real_tokens_per_second")
    tokens = f"{tokens:,.0f} real tokens/s" if tokens is not None else "no tokens (images)"
    return (f"throughput: {metrics['train_measured_samples_per_second']:,.1f} samples/s, {tokens}, "
            f"MFU {metrics['train_mfu']:.2%} of {metrics['train_peak_flops'] / 1e9:,.1f} GFLOP/s "
            f"({metrics['train_peak_flops_source']}), peak memory {metrics['train_peak_memory_mib']:,.0f} MiB "
            f"({metrics['train_peak_memory_kind']}); {metrics['train_measured_steps']} steps measured")


def throughput_results(trainer):
    """The train_* throughput fields of the run just trained; {} for an engine without the callback."""
    handler = getattr(trainer, "callback_handler", None)
    callbacks = handler.callbacks if handler is not None else []
    callback = next((c for c in callbacks if isinstance(c, ThroughputCallback)), None)
    return {} if callback is None or callback.metrics is None else dict(callback.metrics)
