"""benchmarks/bench.py: it runs at tiny sizes and prints its table, and every variant of every
workload hands hftune and the plain Trainer script the same data, model and hyperparameters.
No timings are asserted: the figures live in the benchmark's output (benchmarks/README.md)."""

import json
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import bench  # noqa: E402
import baseline_trainer  # noqa: E402


@pytest.mark.slow
def test_tiny_benchmark_runs_and_prints_the_table(tmp_path):
    """Two fresh processes (hftune's default and the docs-style script) on the tiny BERT."""
    out = tmp_path / "results.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench.py"), "--tiny", "--workloads", "text",
         "--variants", "baseline-max_length,hftune", "--workdir", str(tmp_path / "work"), "--json", str(out)],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "| workload | variant | samples/s | real tokens/s | peak MB | eval metric |" in result.stdout
    rows = [line for line in result.stdout.splitlines() if line.startswith("| text |")]
    assert [row.split("|")[2].strip() for row in rows] == ["baseline-max_length", "hftune"]
    assert "- text: hftune / baseline-max_length:" in result.stdout
    summary = json.loads(out.read_text())["results"]["text"]
    for name in ("baseline-max_length", "hftune"):
        figures = summary[name]
        assert figures["samples_per_s"] > 0 and figures["tokens_per_s"] > 0
        assert 100 < figures["peak_mb"] < 20000  # the child's own peak, not the benchmark's
        assert 0 <= figures["metric"] <= 1
    assert summary["hftune"]["mfu"] > 0 and summary["baseline-max_length"]["mfu"] is None


def tiny_opts(**overrides):
    """bench.py's parsed flags for --tiny, overrides applied."""
    return Namespace(**{**dict(tiny=True, max_train_samples=None, max_eval_samples=None, max_steps=None, epochs=1.0,
                               clm_model="small", batch_size=None), **overrides})


@pytest.fixture(scope="module")
def workloads(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    opts = tiny_opts()
    corpus = bench.tweet_corpus(folder, rows=600)
    return folder, [make(opts, folder, corpus) for make in bench.WORKLOADS.values()]


def parse_hftune(argv):
    from hftune.config import parse_config

    return parse_config(argv)


def parse_baseline(argv):
    from transformers import HfArgumentParser, TrainingArguments

    parser = HfArgumentParser((baseline_trainer.ScriptArguments, TrainingArguments))
    return parser.parse_args_into_dataclasses(args=argv)


SAME = ("learning_rate", "per_device_train_batch_size", "per_device_eval_batch_size", "num_train_epochs", "max_steps",
        "seed", "warmup_steps", "weight_decay", "lr_scheduler_type")


def plain(value):
    return str(getattr(value, "value", value))  # TrainingArguments' enums, hftune's plain names


def test_every_variant_parses_with_the_same_settings_on_both_sides(workloads, tmp_path):
    folder, loads = workloads
    for workload in loads:
        parsed = {}
        for variant in workload.variants:
            argv = bench.command(workload, variant, tmp_path / variant.name, folder, seed=43)
            flags = argv[3:] if variant.side == "hftune" else argv[2:]  # after `python -m hftune` / the script
            parse = parse_hftune if variant.side == "hftune" else parse_baseline
            parsed[variant.name] = parse(flags)
        for name, args in parsed.items():
            training, data = args[-1], args[-2] if len(args) == 3 else args[0]
            reference = parsed[workload.variants[0].name]
            for key in SAME:
                assert plain(getattr(training, key)) == plain(getattr(reference[-1], key)), (workload.name, name, key)
            model = args[0].model_name_or_path
            assert model == reference[0].model_name_or_path == workload.shared["model_name_or_path"]
            assert str(data.train_file) == str(workload.shared["train_file"])
            assert str(data.validation_file) == str(workload.shared["validation_file"])
            assert training.seed == 43


def test_packing_trains_on_the_same_texts_as_padded_batches(workloads):
    """The packed variant's block limit covers the padded variants' texts: same tokens, rearranged."""
    _, loads = workloads
    clm = next(w for w in loads if w.name == "clm")
    variants = {v.name: v for v in clm.variants}
    packed, padded = variants["hftune-packed"], variants["baseline-padded"]
    length = clm.shared["max_seq_length"]
    blocks = packed.flags["max_train_samples"]
    texts = clm.shared["max_train_samples"]
    assert packed.tokens_per_sample == length
    # packing cuts untruncated texts into blocks, dropping only the last partial block
    assert blocks * length >= texts * padded.tokens_per_sample - length


def test_rounds_rotate_the_order_so_each_variant_runs_first_once():
    orders = [bench.round_order(list("ABC"), i) for i in range(4)]
    assert orders == [list("ABC"), list("BCA"), list("CAB"), list("ABC")]


def test_batch_size_flag_reaches_both_sides(workloads, tmp_path):
    folder, _ = workloads
    opts = tiny_opts(batch_size=4)
    corpus = (folder / "tweets-train.csv", folder / "tweets-validation.csv")
    for workload in (make(opts, folder, corpus) for make in bench.WORKLOADS.values()):
        for variant in workload.variants:
            argv = bench.command(workload, variant, tmp_path / variant.name, folder, seed=42)
            parse = parse_hftune if variant.side == "hftune" else parse_baseline
            training = parse(argv[3:] if variant.side == "hftune" else argv[2:])[-1]
            assert training.per_device_train_batch_size == 4, (workload.name, variant.name)
