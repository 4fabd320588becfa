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
