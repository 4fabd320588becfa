"""benchmarks/reliability.py runs: its bad-input battery at tiny size (the kill -9 trials it also
runs are tested directly in test_crash_safety.py), and it prints its table."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow  # runs the whole benchmark script


def test_reliability_script_prints_its_table(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "reliability.py"), "--trials", "0", "--cases", "3",
         "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[lines.index("| trials | killed | resumed | identical | tracebacks after a kill |") + 2] == \
        "| 0 | 0 (0 kills) | 0 | 0 | 0 |"
    assert lines[lines.index("| cases | errors clear | tracebacks | other |") + 2] == "| 3 | 3 | 0 | 0 |"
    assert "- negative learning_rate: hftune: error: learning_rate" in result.stdout
