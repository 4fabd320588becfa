"""All the cores by default: each process of an `accelerate launch` on a machine without accelerators
uses cores / local processes threads, unless the user chose a count."""

import json
import os
import subprocess
import sys

import pytest

from hftune.launch import threads

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = """
import json, os, sys
sys.path.insert(0, {repo!r})
import torch
from hftune.launch.threads import use_all_cores
line = use_all_cores()
print("PROBE " + json.dumps({{"threads": torch.get_num_threads(), "line": line}}))
"""


def probe(tmp_path, launch_flags, env=None):
    script = tmp_path / "probe.py"
    script.write_text(PROBE.format(repo=REPO))
    environment = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    environment.update(env or {})
    command = [sys.executable, "-m", "accelerate.commands.launch", *launch_flags, str(script)]
    out = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    return [json.loads(line[len("PROBE "):]) for line in out.stdout.splitlines() if line.startswith("PROBE ")]


SINGLE = ["--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


@pytest.mark.skipif(threads.cores() < 2, reason="needs 2 cores to tell 1 thread from all")
@pytest.mark.parametrize("flags, env, expected", [
    (SINGLE, None, "all"),  # accelerate alone would give 1
    (["--num_cpu_threads_per_process", "1", *SINGLE], None, 1),
    (SINGLE, {"OMP_NUM_THREADS": "1"}, 1),
    (["--config_file", "accelerate_configs/ddp.yaml"], None, "half"),
], ids=["default", "flag", "omp-env", "two-processes"])
@pytest.mark.slow
def test_threads_per_process_under_accelerate_launch(tmp_path, flags, env, expected):
    processes = probe(tmp_path, flags, env)
    wanted = {"all": threads.cores(), "half": threads.cores() // 2}.get(expected, expected)
    assert processes and all(p["threads"] == wanted for p in processes), processes
    assert all(("as the launch chose" in p["line"]) == (expected == 1) for p in processes)


def test_outside_accelerate_launch_torch_keeps_its_choice(monkeypatch):
    monkeypatch.delenv("ACCELERATE_DYNAMO_BACKEND", raising=False)
    assert threads.use_all_cores() is None
