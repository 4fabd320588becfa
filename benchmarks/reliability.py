"""Reliability: kill -9 a fine-tune at random moments and rerun the same command, then feed hftune
bad configs and bad data; print what happened.

Kill trials: one uninterrupted reference run, then per trial a fresh output_dir, the same command
(`resume_from_checkpoint: auto`) killed with SIGKILL after a random delay drawn over the
reference's wall time, rerun until it exits (at most 5 kills per trial: with --kills_per_trial 2
the rerun is killed once more). A trial is `identical` when the final model.safetensors holds the
same tensors, bit for bit, as the reference's.
Bad input: the battery of benchmarks/battery.py (recipes, command lines, data, models, output
folders, checkpoints), each case run once in this process and sorted as clear / traceback /
accepted / lost (see there).

    python benchmarks/reliability.py --trials 10            # ~6 minutes on 2 CPU cores
    python benchmarks/reliability.py --trials 0             # the bad-input battery alone (~1 minute)
"""

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from battery import Materials, all_cases, run_battery, table, tweet_split  # noqa: E402
from bench import tiny_bert  # noqa: E402


def hftune_command(model, train, validation, output_dir, steps=16, **overrides):
    settings = dict(model_name_or_path=model, train_file=train, validation_file=validation, output_dir=output_dir,
                    label_column="label", report_to="none", disable_tqdm="true", max_seq_length=32,
                    per_device_train_batch_size=16, max_steps=steps, logging_steps=1, learning_rate=1e-3,
                    warmup_steps=0, eval_strategy="steps", eval_steps=5, save_strategy="steps", save_steps=3,
                    save_total_limit=1, hidden_dropout=0.1, train_sampling_strategy="random",
                    resume_from_checkpoint="auto")
    settings.update(overrides)
    return [sys.executable, "-m", "hftune", *[f"--{k}={v}" for k, v in settings.items() if v is not None]]


def child_env():
    return {**os.environ, "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false"}


def run_to_end(command, log):
    started = time.time()
    result = subprocess.run(command, env=child_env(), cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    return result.returncode, time.time() - started


def run_killed_after(command, delay, log):
    """Start the command, SIGKILL it after `delay` s; True when it was killed, False when it ended first."""
    process = subprocess.Popen(command, env=child_env(), cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        process.wait(timeout=delay)
        return False
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
        process.wait()
        return True


def same_weights(a, b):
    first, second = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def kill_trials(opts, make_command, folder, rng):
    if opts.trials == 0:
        return [], 0.0
    reference = folder / "reference"
    with open(folder / "reference.log", "w") as log:
        code, wall = run_to_end(make_command(reference), log)
    if code != 0:
        raise SystemExit(f"the reference run failed (exit {code}); see {folder / 'reference.log'}")
    rows = []
    for trial in range(opts.trials):
        out = folder / f"trial-{trial}"
        delays, killed = [], 0
        with open(folder / f"trial-{trial}.log", "w") as log:
            for _ in range(opts.kills_per_trial):
                delays.append(rng.uniform(0, wall))
                killed += run_killed_after(make_command(out), delays[-1], log)
            code, _ = run_to_end(make_command(out), log)
        log_text = (folder / f"trial-{trial}.log").read_text()
        rows.append(dict(trial=trial, delays=delays, killed=killed, resumed=code == 0,
                         identical=code == 0 and same_weights(reference, out),
                         tracebacks=log_text.count("Traceback (most recent call last)")))
    return rows, wall


def report(kills, wall, battery):
    lines = [f"kill -9 trials (reference run {wall:.1f} s wall; delays uniform over it)",
             "| trials | killed | resumed | identical | tracebacks after a kill |", "|---|---|---|---|---|",
             f"| {len(kills)} | {sum(r['killed'] > 0 for r in kills)} ({sum(r['killed'] for r in kills)} kills) "
             f"| {sum(r['resumed'] for r in kills)} | {sum(r['identical'] for r in kills)} "
             f"| {sum(r['tracebacks'] for r in kills)} |", "",
             "bad input (benchmarks/battery.py)", table(battery)]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--kills_per_trial", type=int, default=2)
    parser.add_argument("--steps", type=int, default=16, help="max_steps of every run (saves every 3 steps)")
    parser.add_argument("--cases", type=int, default=None, help="run only the first N bad-input cases")
    parser.add_argument("--kind", default=None, help="run only the bad-input cases of this kind (recipe, cli, ...)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None)
    opts = parser.parse_args(argv)
    folder = Path(opts.workdir or tempfile.mkdtemp(prefix="hftune-reliability-"))
    folder.mkdir(parents=True, exist_ok=True)
    train, validation = tweet_split(folder)
    model = tiny_bert(folder / "tiny-bert")
    kills, wall = kill_trials(opts, lambda out: hftune_command(model, train, validation, out, opts.steps), folder,
                              random.Random(opts.seed))
    cases = [c for c in all_cases(Materials(folder / "battery")) if opts.kind in (None, c.kind)]
    battery = run_battery(cases[:opts.cases])
    print(report(kills, wall, battery))
    failed = sum(not r["identical"] for r in kills) + sum(o.verdict != "clear" for o in battery)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
