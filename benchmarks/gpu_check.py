"""GPU check: every shipped launch config this machine's GPUs allow, run for a few steps, in one table.

One command on a GPU machine, from the repository root:

    .venv/bin/python benchmarks/gpu_check.py --output gpu_check.md

Each check is one fresh `accelerate launch --config_file accelerate_configs/X.yaml hftune/run.py
--config RECIPE ...` (`python -m hftune` for a single-device run), as a user would start it, with
max_steps and a time limit. Its figures come from the run's all_results.json: hftune's own throughput
fields (hftune/results/throughput.py: real tokens/s, MFU, peak memory; the first step is warm-up and
left out) and Trainer's train_loss, the mean training loss over the run's steps. "loss against a
reference": every check names a reference run of the same model, data and global batch (one process,
listed first), and the table shows its loss minus the reference's. On a GPU, bf16 rounding and the
order of reductions move that difference by up to ~1e-2; LoRA and QLoRA train other weights, so their
difference says how far LoRA's 30 steps get from full fine-tuning, and QLoRA is compared with LoRA.

Checks (the table lists every one; those this machine cannot run say "skipped: <reason>"):
  1 GPU      SmolLM2-135M bf16 full fine-tune (the MFU figure; with and without torch.compile), LoRA,
             QLoRA 4-bit (bitsandbytes), ZeRO-2 and ZeRO-3 with CPU offload; MiniLM (BERT) bf16
  2+ GPUs    DDP, ZeRO-3, FSDP (SmolLM2 and MiniLM), pipeline (2 stages)
  4+ GPUs    hybrid: 2 pipeline stages x 2 data-parallel replicas
  CPU only   a tiny random-init Llama: full fine-tune, LoRA, 2-process DDP over gloo (seconds each);
             skipped where a GPU is present (the GPU checks cover the same paths)

The SmolLM2 reference is set up to reach the issue's target of >= 45% MFU on one H100 (see SMOLLM2).
A whole GPU run fits in --budget seconds (default 570): a check that would start after that is
skipped and says so. The exit status is 1 when a check that should have run failed.

Example:
    python benchmarks/gpu_check.py --list               # the checks and what this machine would do
    python benchmarks/gpu_check.py --only cpu-ddp       # one check (comma-separated names)
"""

import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (the tweet corpus and the number format the benchmark uses)

REPO = bench.REPO
ALL_GPUS = 0  # Check.processes: one process per visible GPU


@dataclass
class Workload:
    """A model + data + settings that every check on it shares, so their losses compare."""
    recipe: str  # shipped recipe (hftune/recipes/) the flags override
    flags: dict
    global_batch: int  # per-device batch x accumulation x data-parallel processes, the same for every check


# The MFU check. Why these settings: bf16 (tensor cores); 2048-token packed blocks and 16 of them per
# step (32k tokens) so every matmul is large; `isolate_texts: false` gives plain causal blocks, which
# SDPA runs with its flash kernel (per-text masks from position ids fall back to slower kernels);
# activation checkpointing stays off (the default: its recomputation is not counted as model FLOPs);
# fused AdamW is TrainingArguments' default. The tweet corpus fills ~600 such blocks: 30 steps of 16 fit.
SMOLLM2 = Workload("causal_lm", dict(
    model_name_or_path="asset:SmolLM2-135M-Instruct", block_size=2048, isolate_texts="false", bf16="true",
    max_steps=30, logging_steps=5, do_eval="false", disable_tqdm="true",
), global_batch=16)

# BERT-style, for FSDP on an encoder: 2000 tweets of up to 128 tokens, 64 a step; random order (the
# recipe's length grouping orders batches per process count, which would leave nothing to compare).
MINILM = Workload("text_classification", dict(
    max_seq_length=128, max_train_samples=2000, train_sampling_strategy="random", bf16="true", max_steps=30,
    logging_steps=5, do_eval="false", disable_tqdm="true",
), global_batch=64)

# CPU: a tiny Llama (built into the work folder) on 300 tweets in 64-token blocks, a loss logged every
# step (Trainer gathers it across processes only when it logs, so DDP's train_loss is the global one).
# The blocks are SmolLM2's kind (isolate_texts: false), which ZeRO-3 and the pipeline engine fall back to.
TINY = Workload("causal_lm", dict(
    block_size=64, isolate_texts="false", max_steps=6, learning_rate=1e-3, warmup_steps=0, logging_steps=1, do_eval="false",
    disable_tqdm="true",
), global_batch=8)

WORKLOADS = {"smollm2": SMOLLM2, "minilm": MINILM, "tiny": TINY}


@dataclass
class Check:
    name: str
    workload: str  # key of WORKLOADS
    what: str
    config: str = "single_device.yaml"  # accelerate_configs/
    processes: int = 1  # ALL_GPUS: one per visible GPU
    flags: dict = field(default_factory=dict)  # hftune flags on top of the workload's
    launch_flags: tuple = ()  # accelerate launch options
    min_gpus: int = 0
    cuda: bool = True
    bitsandbytes: bool = False
    cpu_only: bool = False
    reference: str = None  # the check whose loss this one's is compared with; None: it is a reference

    @property
    def deepspeed(self):
        return "deepspeed" in self.config

    @property
    def stages(self):
        return int(self.flags.get("pipeline_stages", 1))


LORA = dict(peft="lora", lora_target_modules="all-linear", lora_dropout=0.0)
PIPELINE = dict(engine="pipeline", pipeline_stages=2, gradient_accumulation_steps=4)  # 4 micro-batches fill 2 stages

CHECKS = [
    Check("smollm2-bf16", "smollm2", "bf16 full fine-tune, 1 GPU: the MFU figure (target >= 45% on an H100)"),
    Check("minilm-bf16", "minilm", "BERT-style bf16 full fine-tune, 1 GPU"),
    Check("smollm2-lora", "smollm2", "LoRA on every linear layer", flags=LORA, reference="smollm2-bf16"),
    Check("smollm2-qlora", "smollm2", "QLoRA: LoRA on a 4-bit NF4 base", flags={**LORA, "load_in_4bit": "true"},
          bitsandbytes=True, reference="smollm2-lora"),
    Check("smollm2-ddp", "smollm2", "DDP, one process per GPU", "ddp.yaml", ALL_GPUS, min_gpus=2,
          reference="smollm2-bf16"),
    Check("smollm2-zero3", "smollm2", "DeepSpeed ZeRO-3, one process per GPU", "deepspeed_zero3.yaml", ALL_GPUS,
          min_gpus=2, reference="smollm2-bf16"),
    Check("smollm2-fsdp", "smollm2", "FSDP2, one process per GPU", "fsdp.yaml", ALL_GPUS, min_gpus=2,
          reference="smollm2-bf16"),
    Check("minilm-fsdp", "minilm", "FSDP2 on the BERT-style encoder", "fsdp.yaml", ALL_GPUS, min_gpus=2,
          reference="minilm-bf16"),
    Check("smollm2-pipeline", "smollm2", "DeepSpeed pipeline, 2 stages", "deepspeed_pipeline.yaml", 2,
          flags=PIPELINE, min_gpus=2, reference="smollm2-bf16"),
    Check("smollm2-hybrid", "smollm2", "2 pipeline stages x 2 data-parallel replicas", "deepspeed_pipeline.yaml", 4,
          flags=PIPELINE, min_gpus=4, reference="smollm2-bf16"),
    Check("smollm2-zero2-offload", "smollm2", "ZeRO-2, optimizer offloaded to the CPU, 1 GPU", "deepspeed_zero2.yaml",
          launch_flags=("--deepspeed_config_file", "deepspeed_configs/zero2_offload.json"), reference="smollm2-bf16"),
    Check("smollm2-zero3-offload", "smollm2", "ZeRO-3, parameters and optimizer offloaded to the CPU, 1 GPU",
          "deepspeed_zero3_offload.yaml", reference="smollm2-bf16"),
    # last: it compiles for a minute or more before its first step (left out of the measured window)
    Check("smollm2-bf16-compile", "smollm2", "the MFU check under torch.compile", flags=dict(torch_compile="true"),
          reference="smollm2-bf16"),
    Check("cpu-full", "tiny", "tiny Llama full fine-tune on the CPU", cuda=False, cpu_only=True),
    Check("cpu-lora", "tiny", "tiny Llama LoRA on the CPU", flags=LORA, cuda=False, cpu_only=True,
          reference="cpu-full"),
    Check("cpu-ddp", "tiny", "tiny Llama, 2-process DDP over gloo", "ddp.yaml", 2, cuda=False, cpu_only=True,
          reference="cpu-full"),
]


# --------------------------------------------------------------------------------------------
# Which checks this machine can run


@dataclass
class Machine:
    gpus: int  # visible CUDA devices (0: none)
    name: str = "CPU"
    bitsandbytes: bool = False
    deepspeed: bool = False

    @classmethod
    def this_one(cls):
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return cls(gpus, torch.cuda.get_device_name(0) if gpus else "CPU",
                   importlib.util.find_spec("bitsandbytes") is not None, importlib.util.find_spec("deepspeed") is not None)

    def describe(self):
        if not self.gpus:
            return "CPU only (no CUDA device): only the CPU checks run; the GPU checks are listed as skipped."
        return (f"{self.gpus} x {self.name}; bitsandbytes {'yes' if self.bitsandbytes else 'no'}, "
                f"deepspeed {'yes' if self.deepspeed else 'no'}")


def skip_reason(check, machine):
    """Why `check` cannot run on `machine`, or None when it can."""
    if check.cuda and not machine.gpus:
        return "no CUDA device"
    if check.cpu_only and machine.gpus:
        return "CPU-only check: a GPU is present, the GPU checks cover it"
    if machine.gpus < check.min_gpus:
        return f"needs {check.min_gpus} GPUs, {machine.gpus} visible"
    if check.bitsandbytes and not machine.bitsandbytes:
        return "bitsandbytes not installed (pip install bitsandbytes)"
    if check.deepspeed and not machine.deepspeed:
        return "deepspeed not installed (bash scripts/install.sh deepspeed)"
    return None


def process_count(check, machine):
    return machine.gpus if check.processes == ALL_GPUS else check.processes


def per_device_batch(check, processes):
    """The reference's global batch split over data-parallel processes and micro-batches, or None
    when it does not divide evenly (the loss would then not be comparable)."""
    accumulation = int(check.flags.get("gradient_accumulation_steps", 1))
    share = (processes // check.stages) * accumulation
    global_batch = WORKLOADS[check.workload].global_batch
    return global_batch // share if global_batch % share == 0 else None


# --------------------------------------------------------------------------------------------
# Running one check


def tiny_llama(folder):
    """A random-init 2-layer Llama (tied embeddings, as SmolLM2) with MiniLM's real WordPiece tokenizer
    ([SEP] as EOS): it installs from a package in seconds, where SmolLM2's tokenizer needs its asset built."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from hftune.assets import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("asset:all-MiniLM-L6-v2"))
    tokenizer.eos_token = "[SEP]"
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=tokenizer.cls_token_id,
                         eos_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def prepare_tiny(folder):
    """The tiny workload's model and data, written once into the work folder (only when a CPU check runs)."""
    train, _ = bench.tweet_corpus(folder, rows=320)
    return dict(model_name_or_path=tiny_llama(folder / "tiny-llama"), train_file=str(train), text_column="text")


def hftune_args(check, processes, output_dir, extra=None):
    """The run's hftune arguments: the workload's recipe and flags, the check's, the batch share."""
    workload = WORKLOADS[check.workload]
    flags = {**workload.flags, **(extra or {}), **check.flags,
             "per_device_train_batch_size": per_device_batch(check, processes), "output_dir": output_dir}
    return ["--config", workload.recipe] + [f"--{key}={value}" for key, value in flags.items()]


def command(check, processes, output_dir, extra=None):
    args = hftune_args(check, processes, output_dir, extra)
    if processes == 1 and check.config == "single_device.yaml":
        return [sys.executable, "-m", "hftune", *args]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(REPO / "accelerate_configs" / check.config), "--num_processes", str(processes),
            "--main_process_port", "0", *check.launch_flags, str(REPO / "hftune" / "run.py"), *args]


def child_env():
    """Offline, with hftune importable; thread counts left to hftune (cores / processes of the launch).
    DeepSpeed's JIT-built ops (cpu_adam for offload) are kept where the test suite keeps them."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    return env


def run_process(cmd, log_path, timeout):
    """(exit code or None when it ran past `timeout`, seconds). The launch gets its own process group,
    so a timed-out launch is ended with every process it started."""
    start = time.time()
    with open(log_path, "w") as log:
        child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env(), cwd=REPO,
                                 start_new_session=True)
        try:
            code = child.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            code = None
    return code, time.time() - start


def last_line(log_path):
    lines = [line.strip() for line in Path(log_path).read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:200] if lines else "(empty log)"


def run_check(check, machine, folder, timeout, extra=None):
    """One check, launched and read back: a result dict for the table."""
    processes = process_count(check, machine)
    if per_device_batch(check, processes) is None:
        return dict(status=f"skipped: global batch {WORKLOADS[check.workload].global_batch} does not split "
                           f"over {processes} processes")
    output_dir, log_path = folder / "runs" / check.name, folder / "runs" / f"{check.name}.log"
    shutil.rmtree(output_dir, ignore_errors=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = command(check, processes, output_dir, extra)
    print(f"[{check.name}] {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    code, seconds = run_process(cmd, log_path, timeout)
    results_path = output_dir / "all_results.json"
    if code is None:
        return dict(status=f"failed: timed out after {timeout:.0f} s (log {log_path})", wall=seconds, failed=True)
    if not results_path.is_file():
        return dict(status=f"failed: exit {code}: {last_line(log_path)} (log {log_path})", wall=seconds, failed=True)
    results = json.loads(results_path.read_text())
    # DeepSpeed sometimes aborts a process at exit after the run finished and wrote its results
    status = "yes" if code == 0 else f"yes (exit {code} after writing results)"
    return dict(status=status, wall=seconds, processes=processes, results=results)


# --------------------------------------------------------------------------------------------
# The table


def figures(results):
    """tokens/s, samples/s, MFU, peak memory (MiB), train loss from one run's all_results.json; None where absent
    (the pipeline engine has no throughput callback: Trainer's samples/s over its whole runtime stands in)."""
    samples = results.get("train_measured_samples_per_second", results.get("train_samples_per_second"))
    return (results.get("train_real_tokens_per_second"), samples, results.get("train_mfu"),
            results.get("train_peak_memory_mib"), results.get("train_loss"))


def loss_delta(check, outcomes):
    """This check's train loss minus its reference's, with the reference named; "-" without both."""
    if check.reference is None:
        return "reference"
    mine, theirs = outcomes.get(check.name, {}), outcomes.get(check.reference, {})
    if "results" not in mine or "results" not in theirs:
        return f"- (vs {check.reference}: not run)"
    delta = mine["results"]["train_loss"] - theirs["results"]["train_loss"]
    return f"{delta:+.2e} (vs {check.reference})"


def launch_cell(check, outcome, machine):
    processes = outcome.get("processes") or process_count(check, machine) or "(one per GPU)"
    return f"{check.config} x{processes}" + (" + " + " ".join(check.launch_flags) if check.launch_flags else "")


def table(checks, outcomes, machine):
    fmt = bench.fmt
    lines = ["| check | launch | ran | tokens/s | samples/s | MFU | peak memory MiB | train loss | loss - reference "
             "| wall s |", "|---|---|---|---:|---:|---:|---:|---:|---|---:|"]
    for check in checks:
        outcome = outcomes[check.name]
        tokens, samples, mfu, memory, loss = figures(outcome.get("results", {}))
        delta = loss_delta(check, outcomes) if "results" in outcome else "-"
        lines.append(f"| {check.name} | {launch_cell(check, outcome, machine)} | {outcome['status']} "
                     f"| {fmt(tokens, ',.0f')} | {fmt(samples, ',.1f')} | {fmt(mfu, '.1%')} | {fmt(memory, ',.0f')} "
                     f"| {fmt(loss, '.4f')} | {delta} | {fmt(outcome.get('wall'), '.0f')} |")
    return "\n".join(lines)


def notes(checks, outcomes):
    """Where each MFU's peak comes from and what each peak memory measures, once per distinct source."""
    seen = []
    for check in checks:
        results = outcomes[check.name].get("results", {})
        for key in ("train_peak_flops_source", "train_peak_memory_kind"):
            if results.get(key) and results[key] not in seen:
                seen.append(results[key])
    return "".join(f"\n- {line}" for line in seen)


def report(checks, outcomes, machine, started):
    return (f"# GPU check\n\nmachine: {machine.describe()}\n\n{table(checks, outcomes, machine)}\n\n"
            f"train loss: Trainer's mean over the run's steps; tokens/s, MFU and peak memory: hftune's "
            f"throughput fields (first step left out). Total {time.time() - started:.0f} s.{notes(checks, outcomes)}\n")


# --------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated check names (default: all)")
    parser.add_argument("--list", action="store_true", help="list the checks and what this machine would do")
    parser.add_argument("--output", help="also write the Markdown report here")
    parser.add_argument("--timeout", type=float, default=300, help="seconds one check may run (default 300)")
    parser.add_argument("--budget", type=float, default=570,
                        help="seconds for the whole check: later checks are skipped (default 570)")
    parser.add_argument("--workdir", help="keep runs and logs here (default: a temporary folder, kept on failure)")
    opts = parser.parse_args(argv)
    names = [c.name for c in CHECKS]
    opts.only = [n.strip() for n in opts.only.split(",") if n.strip()] if opts.only else names
    unknown = [n for n in opts.only if n not in names]
    if unknown:
        parser.error(f"unknown check(s) {unknown}; valid: {names}")
    return opts


def listing(checks, machine):
    lines = [f"machine: {machine.describe()}", ""]
    for check in checks:
        reason = skip_reason(check, machine)
        lines.append(f"{check.name:22} {check.config} x{check.processes or ' one per GPU'}: {check.what}"
                     f" -> {'runs' if reason is None else 'skipped: ' + reason}")
    return "\n".join(lines)


def run_all(checks, machine, folder, opts, started):
    outcomes, extra = {}, {}
    for check in checks:
        reason, left = skip_reason(check, machine), opts.budget - (time.time() - started)
        if reason is None and left < 30:
            reason = f"time budget (--budget {opts.budget:.0f} s) spent"
        if reason is not None:
            outcomes[check.name] = dict(status=f"skipped: {reason}")
            continue
        if check.workload == "tiny" and not extra:
            with contextlib.redirect_stdout(sys.stderr):  # what the libraries print: stdout holds the report only
                extra = prepare_tiny(folder)
        outcomes[check.name] = run_check(check, machine, folder, min(opts.timeout, left),
                                         extra if check.workload == "tiny" else None)
        print(f"[{check.name}] {outcomes[check.name]['status']}", file=sys.stderr, flush=True)
    return outcomes


def main(argv=None):
    opts = parse_args(argv)
    checks = [c for c in CHECKS if c.name in opts.only]
    machine = Machine.this_one()
    if opts.list:
        print(listing(checks, machine))
        return 0
    started = time.time()
    folder = Path(opts.workdir or tempfile.mkdtemp(prefix="hftune-gpu-check-")).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    outcomes = run_all(checks, machine, folder, opts, started)
    text = report(checks, outcomes, machine, started)
    print(text)
    if opts.output:
        Path(opts.output).write_text(text)
    failed = any(o.get("failed") for o in outcomes.values())
    if failed or opts.workdir:
        print(f"runs and logs kept in {folder}", file=sys.stderr)
    else:
        shutil.rmtree(folder, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
