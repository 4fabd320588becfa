"""benchmarks/reliability.py runs its bad-input battery (benchmarks/battery.py: recipes, command
lines, data, models, output folders, checkpoints) and prints its table: every case clear, none
a traceback, none accepted, none losing a file of an earlier run (the kill -9 trials it also runs
are tested directly in test_crash_safety.py)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow  # ~1 minute: over 100 cases, most of which load a tiny model and data


def test_every_bad_input_case_is_clear(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "reliability.py"), "--trials", "0", "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=900, cwd=REPO)
    lines = result.stdout.splitlines()
    assert lines[lines.index("| trials | killed | resumed | identical | tracebacks after a kill |") + 2] == \
        "| 0 | 0 (0 kills) | 0 | 0 | 0 |"
    total = re.search(r"^\| all \| (\d+) \| (\d+) \| (\d+) \| (\d+) \| (\d+) \|$", result.stdout, re.M)
    assert total, result.stdout[-3000:] + result.stderr[-3000:]
    cases, clear, tracebacks, accepted, lost = map(int, total.groups())
    failing = [line for line in lines if re.match(r"- \[\w+\] .*: (TRACEBACK|ACCEPTED|LOST)", line)]
    assert (clear, tracebacks, accepted, lost) == (cases, 0, 0, 0), failing
    assert cases >= 80 and {"recipe", "cli", "data", "model", "output", "checkpoint"} <= set(
        re.findall(r"^- \[(\w+)\]", result.stdout, re.M))
    assert result.returncode == 0
    assert "- [checkpoint] explicit checkpoint corrupted after its seal: hftune: error: " in result.stdout
