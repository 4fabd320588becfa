"""`hftune launch`: accelerate launch's options and hftune's told apart, and a DeepSpeed launch config
without DeepSpeed stopped in one line (accelerate's own launcher ends in an ImportError traceback)."""

import os
import subprocess
import sys

import pytest

from conftest import REPO, fail, read_json
from hftune.launch import command


def test_options_are_split_by_accelerates_parser():
    accelerate_options, ours = command.split_options(
        ["--config_file", "accelerate_configs/ddp.yaml", "--num_processes=2", "--config", "recipe.yaml",
         "--main_process_port", "0", "--learning_rate", "3e-5", "--cpu", "--max_steps", "4"])
    assert accelerate_options == ["--config_file", "accelerate_configs/ddp.yaml", "--num_processes=2",
                                  "--main_process_port", "0", "--cpu"]
    assert ours == ["--config", "recipe.yaml", "--learning_rate", "3e-5", "--max_steps", "4"]


def test_deepspeed_config_without_deepspeed_is_one_line(capsys, monkeypatch):
    monkeypatch.setattr(command, "installed", lambda module: module != "deepspeed")
    monkeypatch.setattr(os, "execv", lambda *a: pytest.fail("launched"))
    line = fail(capsys, ["launch", "--config_file", os.path.join(REPO, "accelerate_configs/deepspeed_zero3.yaml"),
                         "--config", "text_classification"])
    assert line == ("hftune: error: this launch config uses DeepSpeed, which is not installed: "
                    "bash scripts/install.sh deepspeed (or pip install 'hftune[deepspeed]').")
    line = fail(capsys, ["launch", "--config_file", "nowhere.yaml"])
    assert "--config_file 'nowhere.yaml' does not exist" in line


@pytest.mark.slow
def test_launch_runs_accelerate_launch(tiny_bert, tweets_csv, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "hftune", "launch", "--config_file", "accelerate_configs/ddp.yaml",
         "--num_processes", "1", "--main_process_port", "0", "--model_name_or_path", tiny_bert,
         "--train_file", str(tweets_csv[0]), "--label_column", "sentiment", "--max_steps", "2",
         "--output_dir", str(out), "--do_eval", "false"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_json(out / "train_results.json")["train_samples"] > 0


def test_the_slurm_template_runs_one_launch_per_node_with_its_rank(tmp_path):
    """scripts/cluster/slurm.sbatch on a 2-node allocation (SLURM's commands stubbed: no SLURM here): one
    `accelerate launch` per node, its machine rank from SLURM_NODEID, the first host as main address."""
    import stat
    import subprocess

    bin_dir, venv_bin = tmp_path / "bin", tmp_path / ".venv" / "bin"
    bin_dir.mkdir()
    venv_bin.mkdir(parents=True)
    stubs = {
        # the pause lets a reader that stops at the first line go first: the second then meets a closed pipe
        bin_dir / "scontrol": 'echo gpu-node-07; sleep 0.3; echo gpu-node-08\n',
        bin_dir / "srun": 'shift; for id in 0 1; do SLURM_NODEID=$id "$@"; done\n',  # one task per node
        venv_bin / "accelerate": f'echo "$*" >> {tmp_path}/launches.txt\n',
    }
    for path, body in stubs.items():
        path.write_text("#!/usr/bin/env bash\n" + body)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "8",
           "SLURM_JOB_NODELIST": "gpu-node-[07-08]"}
    script = os.path.join(REPO, "scripts", "cluster", "slurm.sbatch")
    subprocess.run(["bash", script, "accelerate_configs/multi_node.yaml", "recipe.yaml", "--learning_rate", "1e-4"],
                   cwd=tmp_path, env=env, check=True)
    launches = (tmp_path / "launches.txt").read_text().splitlines()
    assert launches == [
        f"launch --config_file accelerate_configs/multi_node.yaml --num_machines 2 --num_processes 16 --machine_rank "
        f"{rank} --main_process_ip gpu-node-07 --main_process_port 29500 hftune/run.py --config recipe.yaml "
        "--learning_rate 1e-4" for rank in (0, 1)]
