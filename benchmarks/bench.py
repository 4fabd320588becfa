"""Benchmark: the same fine-tune under hftune and under a plain Trainer script, side by side.

Each workload runs its variants alternately (A B C, B C A, ... for --repeats rounds), every run in
a fresh subprocess with OMP_NUM_THREADS fixed, all on the same rows, model and hyperparameters:
- hftune runs its shipped recipe (hftune/recipes/*.yaml) with the sizes and hyperparameters
  overridden by flags; everything else stays hftune's default.
- the baseline is benchmarks/baseline_trainer.py, written the way the transformers docs teach.
Numbers come from each run's all_results.json: Trainer's train_samples_per_second (samples
over train_runtime, the same clock on both sides) and the final eval metric; peak memory is the
child's peak RSS (its ru_maxrss from os.wait4). Real tokens/s = samples/s x the mean non-padding tokens of that
variant's training examples (the attention-mask sum of each truncated text, every token of a
packed block), counted here from the same rows both sides read: every run trains on each example
once per epoch, so both sides are counted the same way. The table shows medians over the repeats.

Workloads:
  text   all-MiniLM-L6-v2 on the tweet corpus (3 classes): hftune default vs docs-style baseline
         (padding="max_length") vs baseline with dynamic padding vs hftune with the baseline's
         settings (random sampling: the overhead figure).
  clm    a GPT-style (Llama) causal LM on the tweet texts: hftune packing (texts kept apart: the
         default; or run_clm.py's blocks) and padding-free batches vs batches padded to
         max_seq_length or to each batch's longest text.
         Default model: a small random-init Llama with the SmolLM2 tokenizer; --clm_model smollm2
         uses the real SmolLM2-135M-Instruct (slow on CPU).
  sft    chat SFT on the tweets asked as a question (system question, tweet, one-word answer),
         the small Llama (or --clm_model smollm2): hftune's defaults (the LM head only where the
         next token is trained) vs a docs-style Trainer SFT script (chat template, prompt masked,
         batches padded per batch), and hftune with the baseline's settings (the overhead).
  image  a random-init ResNet-18 (64 px) on sklearn's real digit scans, hftune vs baseline.

Example:
    python benchmarks/bench.py --tiny                       # seconds: checks that everything runs
    python benchmarks/bench.py --workloads text --repeats 3 --max_train_samples 1024
"""

import argparse
import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BASELINE = REPO / "benchmarks" / "baseline_trainer.py"
SEED = 42


@dataclass
class Variant:
    name: str
    side: str  # "hftune" or "baseline"
    flags: dict = field(default_factory=dict)  # this variant's own flags, on top of the workload's shared ones
    drop: tuple = ()  # recipe keys the variant removes (hftune)
    tokens_per_sample: float = None  # mean non-padding tokens of its training examples; None for images


@dataclass
class Workload:
    name: str
    task: str
    recipe: str  # shipped hftune recipe
    metric: str  # key in all_results.json
    shared: dict  # flags both sides get: data, sizes, hyperparameters
    variants: list
    # (variant, reference variant, what it measures): printed under the table with the ratios
    comparisons: list


# --------------------------------------------------------------------------------------------
# Data and models, written once into the work folder


def tweet_corpus(folder, rows=None):
    """The real tweet corpus as clean UTF-8 CSVs (sentiment,text), 5% held out as validation:
    (train path, validation path). The asset file mixes encodings, which a docs-style
    `load_dataset("csv")` cannot read. Both sides read these same files, so the training seed can
    change from round to round without changing the data."""
    import pandas as pd

    from hftune.assets import get_asset

    frame = pd.read_csv(get_asset("asset:tweet-sentiment", "dataset").locate(), encoding_errors="replace")
    frame = frame.dropna(subset=["text"])
    # Bare carriage returns inside tweets are not quoted by to_csv; whitespace runs become one space.
    frame["text"] = frame["text"].str.replace(r"\s+", " ", regex=True).str.strip()
    frame = frame[frame["text"] != ""][["sentiment", "text"]]
    # The file is sorted by label: shuffled rows, so any first N hold every label.
    frame = frame.sample(n=rows or len(frame), random_state=SEED)
    held_out = len(frame) // 20
    paths = folder / "tweets-train.csv", folder / "tweets-validation.csv"
    frame.iloc[held_out:].to_csv(paths[0], index=False)
    frame.iloc[:held_out].to_csv(paths[1], index=False)
    return paths


def digit_folders(folder, size=32):
    """sklearn's real 8x8 digit scans upscaled to `size` px, as train/<digit>/*.png (first 1500)
    and validation/<digit>/*.png (the other 297)."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    data = load_digits()
    images = (data.images * (255 / 16)).astype(np.uint8)
    for i, (pixels, target) in enumerate(zip(images, data.target)):
        out = folder / "digits" / ("train" if i < 1500 else "validation") / str(target)
        out.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).resize((size, size)).save(out / f"{i}.png")
    return folder / "digits" / "train", folder / "digits" / "validation"


def smollm2_tokenizer():
    """SmolLM2's tokenizer with <|endoftext|> as pad token: its own pad is its EOS, and padding
    could then not be told from the real EOS that ends each text when tokens are counted."""
    from transformers import AutoTokenizer

    from hftune.assets import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("asset:SmolLM2-135M-Instruct"))
    tokenizer.pad_token = "<|endoftext|>"
    return tokenizer


def llama(folder, tiny):
    """A random-init Llama (seed 0) with the SmolLM2 tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = smollm2_tokenizer()
    width = 32 if tiny else 256
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=width * 3, num_hidden_layers=2 if tiny else 4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def smollm2(folder):
    """The real SmolLM2-135M-Instruct (links to the converted checkpoint) with the pad-fixed tokenizer."""
    from hftune.assets import resolve_model

    source = Path(resolve_model("asset:SmolLM2-135M-Instruct"))
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        (folder / name).symlink_to(source / name)
    smollm2_tokenizer().save_pretrained(folder)
    return str(folder)


def tiny_bert(folder):
    """A 2-layer BERT with the real MiniLM tokenizer (the --tiny stand-in for MiniLM)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    from hftune.assets import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("asset:all-MiniLM-L6-v2"))
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(0)
    BertForMaskedLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def tiny_resnet(folder):
    import torch
    from transformers import ConvNextImageProcessorPil, ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=10)
    torch.manual_seed(0)
    ResNetForImageClassification(config).save_pretrained(folder)
    ConvNextImageProcessorPil(size={"shortest_edge": 32}).save_pretrained(folder)
    return str(folder)


# --------------------------------------------------------------------------------------------
# Workloads


def common(opts, sizes):
    """Hyperparameters both sides get, explicitly, so neither falls back on its own default."""
    flags = dict(
        learning_rate=sizes["lr"], per_device_train_batch_size=opts.batch_size or sizes["batch"],
        per_device_eval_batch_size=sizes["eval_batch"], warmup_steps=0.06, weight_decay=0.01,
        lr_scheduler_type="linear", logging_steps=25, save_strategy="no", eval_strategy="no", report_to="none",
        disable_tqdm="true", max_eval_samples=opts.max_eval_samples or sizes["eval"],
    )
    if opts.max_steps:
        flags.update(max_steps=opts.max_steps)
    else:  # the CLM recipe sets max_steps: -1 lets num_train_epochs count
        flags.update(num_train_epochs=opts.epochs, max_steps=-1)
    return flags


def text_workload(opts, folder, corpus):
    sizes = dict(train=1024, eval=500, batch=32, eval_batch=128, lr=1e-4, length=128)
    if opts.tiny:
        sizes.update(train=64, eval=32, batch=16, eval_batch=32, length=48)
    model = tiny_bert(folder / "tiny-bert") if opts.tiny else resolve("asset:all-MiniLM-L6-v2")
    shared = dict(
        common(opts, sizes), model_name_or_path=model, train_file=corpus[0], validation_file=corpus[1],
        label_column="sentiment", max_seq_length=sizes["length"],
        max_train_samples=opts.max_train_samples or sizes["train"],
    )
    from transformers import AutoTokenizer

    texts, _ = split_texts(corpus, shared["max_train_samples"], 0)
    encoded = AutoTokenizer.from_pretrained(model)(texts, truncation=True, max_length=sizes["length"])["input_ids"]
    tokens = statistics.mean(len(ids) for ids in encoded)  # the attention mask's sum, padded or not
    variants = [
        Variant("baseline-max_length", "baseline", dict(padding="max_length"), tokens_per_sample=tokens),
        Variant("baseline-dynamic", "baseline", dict(padding="dynamic"), tokens_per_sample=tokens),
        Variant("hftune", "hftune", tokens_per_sample=tokens),
        Variant("hftune-same-as-baseline", "hftune", dict(train_sampling_strategy="random"), tokens_per_sample=tokens),
    ]
    comparisons = [
        ("hftune", "baseline-max_length", "default vs docs-style (target >= 3x samples/s)"),
        ("hftune", "baseline-dynamic", "default vs dynamic padding (target >= 1.3x)"),
        ("hftune-same-as-baseline", "baseline-dynamic", "same settings: overhead (target <= 3%)"),
    ]
    return Workload("text", "text-classification", "text_classification", "eval_accuracy", shared, variants, comparisons)


def split_texts(corpus, rows, eval_rows):
    """The first `rows` training and `eval_rows` validation texts: what both sides train and evaluate on."""
    import pandas as pd

    return [pd.read_csv(path)["text"].head(n).tolist() for path, n in zip(corpus, (rows, eval_rows))]


def clm_workload(opts, folder, corpus):
    sizes = dict(train=1024, eval=200, batch=8, eval_batch=32, lr=1e-4 if opts.clm_model == "smollm2" else 1e-3,
                 length=128)
    if opts.tiny:
        sizes.update(train=64, eval=16, batch=8, eval_batch=16, length=32)
    if opts.clm_model == "smollm2" and not opts.tiny:
        model = smollm2(folder / "smollm2")
    else:
        model = llama(folder / "llama", opts.tiny)
    length = sizes["length"]
    shared = dict(common(opts, sizes), model_name_or_path=model, train_file=corpus[0], validation_file=corpus[1],
                  text_column="text", max_seq_length=length,
                  max_train_samples=opts.max_train_samples or sizes["train"])
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    texts = split_texts(corpus, shared["max_train_samples"], shared["max_eval_samples"])
    lengths = [[len(ids) + 1 for ids in tokenizer(t)["input_ids"]] for t in texts]  # each text + its EOS
    blocks, eval_blocks = (max(1, sum(n) // length) for n in lengths)
    per_text = statistics.mean(min(n, length) for n in lengths[0])  # truncated to max_seq_length
    unpacked = dict(concatenate_texts="false", train_sampling_strategy="random")
    packed = dict(block_size=length, max_train_samples=blocks, max_eval_samples=eval_blocks)
    variants = [
        # padded as the text workload's docs-style script pads: every text to max_seq_length
        Variant("baseline-max_length", "baseline", dict(padding="max_length"), tokens_per_sample=per_text),
        Variant("baseline-padded", "baseline", dict(padding="dynamic"), tokens_per_sample=per_text),
        # packing's limits count blocks (as run_clm.py): as many as the same texts fill
        Variant("hftune-packed", "hftune", packed, tokens_per_sample=length),
        Variant("hftune-packed-run_clm", "hftune", dict(packed, isolate_texts="false"), tokens_per_sample=length),
        Variant("hftune-padding-free", "hftune", unpacked, drop=("block_size",), tokens_per_sample=per_text),
        Variant("hftune-padded", "hftune", dict(unpacked, padding_free="false"), drop=("block_size",),
                tokens_per_sample=per_text),
    ]
    comparisons = [
        ("hftune-packed", "baseline-max_length", "packing vs batches padded to max_seq_length (target >= 1.8x tokens/s)"),
        ("hftune-packed", "baseline-padded", "packing vs batches padded to their longest text (target >= 1.8x tokens/s)"),
        ("hftune-packed-run_clm", "baseline-padded", "run_clm.py's packing, texts see each other"),
        ("hftune-padding-free", "baseline-padded", "padding-free vs padded batches (target >= 1.8x tokens/s)"),
        ("hftune-padded", "baseline-padded", "same settings: overhead (target <= 3%)"),
    ]
    return Workload("clm", "causal-lm", "causal_lm", "eval_perplexity", shared, variants, comparisons)


def image_workload(opts, folder, _corpus):
    sizes = dict(train=1024, eval=297, batch=32, eval_batch=128, lr=1e-3)
    if opts.tiny:
        sizes.update(train=64, eval=32, batch=16, eval_batch=32)
    train, validation = digit_folders(folder)
    model = tiny_resnet(folder / "tiny-resnet") if opts.tiny else resolve("asset:resnet-18-untrained")
    shared = dict(common(opts, sizes), model_name_or_path=model, train_file=train, validation_file=validation,
                  max_train_samples=opts.max_train_samples or sizes["train"])
    variants = [Variant("baseline", "baseline"), Variant("hftune", "hftune")]
    comparisons = [("hftune", "baseline", "default vs docs-style")]
    return Workload("image", "image-classification", "image_classification", "eval_accuracy", shared, variants,
                    comparisons)


def chat_files(folder, corpus):
    """The corpus CSVs as chat JSON Lines, as asset:tweet-sentiment-chat words them."""
    import pandas as pd

    from hftune.assets import TWEET_QUESTION

    paths = []
    for path in corpus:
        out = folder / (Path(path).stem + "-chat.jsonl")
        with open(out, "w") as handle:
            for row in pd.read_csv(path).itertuples():
                messages = [{"role": "system", "content": TWEET_QUESTION}, {"role": "user", "content": row.text},
                            {"role": "assistant", "content": row.sentiment}]
                handle.write(json.dumps({"messages": messages}) + "\n")
        paths.append(out)
    return paths


def sft_workload(opts, folder, corpus):
    sizes = dict(train=1024, eval=200, batch=16, eval_batch=32, lr=1e-4 if opts.clm_model == "smollm2" else 1e-3,
                 length=128)
    if opts.tiny:
        sizes.update(train=64, eval=16, batch=8, eval_batch=16)
    model = smollm2(folder / "smollm2") if opts.clm_model == "smollm2" and not opts.tiny else \
        llama(folder / "llama", opts.tiny)
    train, validation = chat_files(folder, corpus)
    shared = dict(common(opts, sizes), model_name_or_path=model, train_file=train, validation_file=validation,
                  max_seq_length=sizes["length"], max_train_samples=opts.max_train_samples or sizes["train"])
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    with open(train) as handle:
        rows = [json.loads(line)["messages"] for line, _ in zip(handle, range(shared["max_train_samples"]))]
    tokens = statistics.mean(len(tokenizer(tokenizer.apply_chat_template(m, tokenize=False), add_special_tokens=False,
                                           truncation=True, max_length=sizes["length"])["input_ids"]) for m in rows)
    full_training = dict(max_new_tokens=4)  # the recipe's LoRA and packing are dropped: hftune's defaults,
    recipe_only = ("peft", "lora_target_modules", "lora_layers_to_transform", "lora_dropout", "packing")  # all weights
    variants = [
        Variant("baseline-padded", "baseline", tokens_per_sample=tokens),
        Variant("hftune", "hftune", full_training, drop=recipe_only, tokens_per_sample=tokens),
        Variant("hftune-padding-free", "hftune", dict(full_training, padding_free="true"), drop=recipe_only,
                tokens_per_sample=tokens),
        Variant("hftune-same-as-baseline", "hftune", dict(full_training, logits_where_trained="false",
                                                          train_sampling_strategy="random"),
                drop=recipe_only, tokens_per_sample=tokens),
    ]
    comparisons = [
        ("hftune", "baseline-padded", "default vs docs-style SFT (target >= 1.5x tokens/s, equal eval loss)"),
        ("hftune-padding-free", "hftune", "padding-free vs padded batches (both with the LM head where trained)"),
        ("hftune-same-as-baseline", "baseline-padded", "same settings: overhead (target <= 3%)"),
    ]
    return Workload("sft", "sft", "sft", "eval_loss", shared, variants, comparisons)


WORKLOADS = {"text": text_workload, "clm": clm_workload, "sft": sft_workload, "image": image_workload}


def resolve(name):
    from hftune.assets import resolve_model

    return resolve_model(name)


# --------------------------------------------------------------------------------------------
# Running


def recipe_for(workload, variant, folder):
    """The shipped recipe, or a copy without the keys the variant drops (a CLI flag cannot unset one)."""
    if not variant.drop:
        return workload.recipe
    import yaml

    from hftune.recipe_file import load_recipe, recipe_path

    recipe = {k: v for k, v in load_recipe(recipe_path(workload.recipe)).items() if k not in variant.drop}
    path = folder / f"{workload.recipe}-{variant.name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return str(path)


def command(workload, variant, output_dir, folder, seed):
    flags = {**workload.shared, **variant.flags, "output_dir": output_dir, "seed": seed}
    if variant.side == "hftune":
        head = [sys.executable, "-m", "hftune", "--config", recipe_for(workload, variant, folder)]
    else:
        head = [sys.executable, str(BASELINE), "--task", workload.task]
    return head + [f"--{key}={value}" for key, value in flags.items()]


class Launcher:
    """Starts the runs from a process forked while the benchmark is still small. Linux carries a
    parent's resident set into a forked child's ru_maxrss (and keeps it across exec), so runs
    started from the benchmark itself, once it holds models and data, would all report its peak."""

    def __init__(self):
        self.conn, theirs = multiprocessing.Pipe()
        self.process = multiprocessing.get_context("fork").Process(target=self._serve, args=(theirs,), daemon=True)
        self.process.start()

    @staticmethod
    def _serve(conn):
        while (job := conn.recv()) is not None:
            cmd, env, log_path = job
            with open(log_path, "w") as log:
                child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
                _, status, usage = os.wait4(child.pid, 0)
            child.returncode = os.waitstatus_to_exitcode(status)
            conn.send((child.returncode, usage.ru_maxrss / 1024))  # Linux reports KiB

    def run(self, cmd, env, log_path):
        """(exit code, peak RSS in MiB) of one child process."""
        self.conn.send((cmd, env, str(log_path)))
        return self.conn.recv()

    def close(self):
        self.conn.send(None)
        self.process.join()


def child_env(threads):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def run_once(launcher, workload, variant, folder, threads, index):
    """One fresh process; returns its numbers."""
    output_dir = folder / "runs" / f"{workload.name}-{variant.name}-{index}"
    shutil.rmtree(output_dir, ignore_errors=True)
    log_path = folder / "runs" / f"{workload.name}-{variant.name}-{index}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    # round i trains with seed 42 + i on both sides: the eval metric's median is over seeds, not one draw
    code, peak_mb = launcher.run(command(workload, variant, output_dir, folder, SEED + index), child_env(threads),
                                 log_path)
    if code != 0:
        tail = "".join(open(log_path).readlines()[-15:])
        raise RuntimeError(f"{workload.name}/{variant.name} exited {code}; log {log_path}:\n{tail}")
    results = json.loads((output_dir / "all_results.json").read_text())
    samples = results["train_samples_per_second"]
    return {
        "samples_per_s": samples,
        "tokens_per_s": samples * variant.tokens_per_sample if variant.tokens_per_sample else None,
        "peak_mb": peak_mb,
        "metric": results.get(workload.metric),
        "mfu": results.get("train_mfu"),  # hftune's own figure (hftune/results/throughput.py); the baseline has none
        "train_runtime": results["train_runtime"],
        "wall_s": time.time() - start,
    }


def summarize(runs):
    def median(key):
        values = [r[key] for r in runs if r[key] is not None]
        return statistics.median(values) if values else None

    summary = {key: median(key) for key in ("samples_per_s", "tokens_per_s", "metric", "mfu", "train_runtime", "wall_s")}
    summary["peak_mb"] = max(r["peak_mb"] for r in runs)
    summary["runs"] = len(runs)
    return summary


def round_order(variants, index):
    """Round `index`'s order, rotated each round (A B C, B C A, C A B, ...), so load drifting on the
    machine and whatever a run leaves behind hit all variants alike."""
    shift = index % len(variants)
    return variants[shift:] + variants[:shift]


def benchmark(launcher, workload, folder, threads, repeats):
    """Alternate the variants in fresh processes, `repeats` rounds."""
    raw = {v.name: [] for v in workload.variants}
    for index in range(repeats):
        for variant in round_order(workload.variants, index):
            result = run_once(launcher, workload, variant, folder, threads, index)
            raw[variant.name].append(result)
            print(f"  {workload.name:5} {variant.name:24} run {index + 1}/{repeats}: "
                  f"{result['samples_per_s']:.1f} samples/s, {workload.metric} {fmt(result['metric'], '.4f')}, "
                  f"{result['wall_s']:.0f} s", flush=True)
    return {name: summarize(runs) for name, runs in raw.items()}, raw


# --------------------------------------------------------------------------------------------
# Report


def fmt(value, spec=".1f"):
    return "-" if value is None else format(value, spec)


def ratio(value, reference):
    return None if value is None or not reference else value / reference


def table(workloads, results):
    """Markdown: one row per variant, ratio against the workload's first (docs-style) baseline."""
    lines = ["| workload | variant | samples/s | real tokens/s | peak MB | eval metric | x baseline (samples/s) "
             "| x baseline (tokens/s) | MFU |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for workload in workloads:
        reference = results[workload.name][workload.variants[0].name]
        for variant in workload.variants:
            s = results[workload.name][variant.name]
            metric = f"{workload.metric[len('eval_'):]} {fmt(s['metric'], '.4f')}"
            lines.append(
                f"| {workload.name} | {variant.name} | {fmt(s['samples_per_s'])} | {fmt(s['tokens_per_s'], '.0f')} "
                f"| {fmt(s['peak_mb'], '.0f')} | {metric} | {fmt(ratio(s['samples_per_s'], reference['samples_per_s']), '.2f')} "
                f"| {fmt(ratio(s['tokens_per_s'], reference['tokens_per_s']), '.2f')} | {fmt(s['mfu'], '.2%')} |"
            )
    return "\n".join(lines)


def comparison_lines(workloads, results):
    lines = []
    for workload in workloads:
        for name, reference, what in workload.comparisons:
            if name not in results[workload.name] or reference not in results[workload.name]:
                continue  # left out by --variants
            a, b = results[workload.name][name], results[workload.name][reference]
            key = "tokens_per_s" if a["tokens_per_s"] is not None else "samples_per_s"
            delta = None if a["metric"] is None or b["metric"] is None else a["metric"] - b["metric"]
            lines.append(
                f"- {workload.name}: {name} / {reference}: {fmt(ratio(a['samples_per_s'], b['samples_per_s']), '.2f')}x "
                f"samples/s, {fmt(ratio(a[key], b[key]), '.2f')}x {key.replace('_per_s', '')}/s, "
                f"{workload.metric} {fmt(delta, '+.4f')} ({what})"
            )
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="text,clm,sft,image", help="comma-separated: text, clm, sft, image")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of alternating runs (default 2)")
    parser.add_argument("--max_train_samples", type=int, help="training rows (texts for clm); default per workload")
    parser.add_argument("--max_eval_samples", type=int, help="validation rows; default per workload")
    parser.add_argument("--epochs", type=float, default=1.0, help="num_train_epochs (default 1)")
    parser.add_argument("--max_steps", type=int, help="train this many steps instead of --epochs")
    parser.add_argument("--batch_size", type=int, help="per_device_train_batch_size (default per workload: 32, clm 8)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="OMP_NUM_THREADS of every run (default: the cores available)")
    parser.add_argument("--clm_model", choices=["small", "smollm2"], default="small",
                        help="small: random-init 4-layer Llama with the SmolLM2 tokenizer; smollm2: the real 135M model")
    parser.add_argument("--variants", help="comma-separated variant names to run (default: all of each workload)")
    parser.add_argument("--tiny", action="store_true", help="tiny models and sizes, 1 repeat: a quick check that all runs")
    parser.add_argument("--workdir", help="where data, models and runs go (default: a temporary folder, removed)")
    parser.add_argument("--json", help="also write the per-run figures and summaries here")
    opts = parser.parse_args(argv)
    opts.workloads = [w.strip() for w in opts.workloads.split(",") if w.strip()]
    unknown = [w for w in opts.workloads if w not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workload(s) {unknown}; valid: {sorted(WORKLOADS)}")
    if opts.tiny:
        opts.repeats = 1
    opts.variants = opts.variants and {v.strip() for v in opts.variants.split(",")}
    return opts


def main(argv=None):
    opts = parse_args(argv)
    launcher = Launcher()  # first, while this process is small
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    folder = Path(opts.workdir or tempfile.mkdtemp(prefix="hftune-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        corpus = tweet_corpus(folder, rows=600 if opts.tiny else None)
        workloads = [WORKLOADS[name](opts, folder, corpus) for name in opts.workloads]
        for workload in workloads:
            workload.variants = [v for v in workload.variants if not opts.variants or v.name in opts.variants]
        workloads = [w for w in workloads if w.variants]
        print(f"threads={opts.threads} repeats={opts.repeats} load average at start: {os.getloadavg()}", flush=True)
        results, raw = {}, {}
        for workload in workloads:
            results[workload.name], raw[workload.name] = benchmark(launcher, workload, folder, opts.threads,
                                                                   opts.repeats)
        print(f"\nload average at end: {os.getloadavg()}; medians over {opts.repeats} run(s) each\n")
        print(table(workloads, results))
        print("\n" + comparison_lines(workloads, results))
        if opts.json:
            Path(opts.json).write_text(json.dumps({"results": results, "runs": raw}, indent=1, default=str))
    finally:
        launcher.close()
        if not opts.workdir:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
