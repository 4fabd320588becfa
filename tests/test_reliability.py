"""benchmarks/reliability.py runs end to end at tiny sizes: a run killed at a random moment and
rerun ends bit-identical to the reference, and bad input gets clear one-line errors."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_reliability_script_prints_its_table(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "reliability.py"), "--trials", "1", "--kills_per_trial", "1",
         "--steps", "6", "--cases", "2", "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    trials = lines[lines.index("| trials | killed | resumed | identical | tracebacks after a kill |") + 2]
    cells = [cell.strip() for cell in trials.strip("|").split("|")]
    assert cells[0] == "1" and cells[2:] == ["1", "1", "0"], trials  # resumed, identical, no traceback
    assert lines[lines.index("| cases | errors clear | tracebacks | other |") + 2] == "| 2 | 2 | 0 | 0 |"
    assert "- negative learning_rate: hftune: error: learning_rate" in result.stdout
