"""No unrestricted pickle, no remote code by default, no files outside output_dir and the caches."""

import logging
import os
import subprocess
import sys

import pytest
import torch

from conftest import run_engine, strategy_args
from hftune.config import ModelArguments, parse_config
from hftune.tasks.common import pretrained_source


@pytest.mark.parametrize("engine", [pytest.param("trainer", marks=pytest.mark.slow), "accelerate"])
def test_train_and_resume_load_nothing_with_unrestricted_pickle(engine, tiny_bert, tweets_csv, tmp_path, monkeypatch):
    """Every torch.load of a save-then-resume cycle (optimizer, scheduler, RNG states, ...) is
    weights_only; model weights are safetensors and never reach torch.load at all."""
    calls = []
    real_load = torch.load

    def recording_load(f, *args, **kwargs):
        calls.append((os.path.basename(str(f)), kwargs.get("weights_only")))
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    out = tmp_path / "out"
    common = dict(engine=engine, max_train_samples=32, save_strategy="steps", save_steps=2)
    run_engine(strategy_args(tiny_bert, out, *tweets_csv, max_steps=2, **common))
    run_engine(strategy_args(tiny_bert, out, *tweets_csv, max_steps=3, resume_from_checkpoint="true", **common))
    assert calls, "resume read no state at all"
    assert {"optimizer.bin" if engine == "accelerate" else "optimizer.pt"} <= {name for name, _ in calls}
    assert all(weights_only is True for _, weights_only in calls), calls
    assert not any(name.endswith((".bin", ".pt")) and "model" in name for name, _ in calls), calls


def test_trust_remote_code_is_off_by_default_and_warns_when_on(caplog):
    model_args, _, _ = parse_config([])
    assert model_args.trust_remote_code is False
    with caplog.at_level(logging.WARNING, logger="hftune"):
        _, common = pretrained_source(ModelArguments("someone/model", trust_remote_code=True))
    assert common["trust_remote_code"] is True
    assert "trust_remote_code: true runs the Python code shipped with 'someone/model'" in caplog.text


def files_under(root, skip=()):
    found = set()
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if os.path.join(folder, d) not in skip]
        found |= {os.path.relpath(os.path.join(folder, n), root) for n in names}
    return found


@pytest.mark.slow
def test_a_run_writes_only_to_output_dir_and_the_caches(tiny_bert, tweets_csv, tmp_path):
    """HOME, the working directory and TMPDIR hold nothing new after a run; HF and other caches
    go where their environment variables point."""
    home, cwd, tmp, caches = (tmp_path / name for name in ("home", "cwd", "tmp", "caches"))
    for folder in (home, cwd, tmp, caches):
        folder.mkdir()
    (home / ".bashrc").write_text("# the user's own\n")
    before = {root: files_under(root) for root in (home, cwd, tmp)}
    env = {**os.environ, "HOME": str(home), "TMPDIR": str(tmp), "HF_HOME": str(caches / "hf"),
           "XDG_CACHE_HOME": str(caches / "xdg"), "MPLCONFIGDIR": str(caches / "matplotlib"),
           "HFTUNE_ASSETS_CACHE": str(caches / "hftune")}
    env.pop("HF_DATASETS_CACHE", None)
    train, validation = tweets_csv
    result = subprocess.run(
        [sys.executable, "-m", "hftune", "--model_name_or_path", tiny_bert, "--train_file", str(train),
         "--validation_file", str(validation), "--label_column", "sentiment", "--output_dir", "out",
         "--max_steps", "2", "--save_steps", "1", "--max_train_samples", "32", "--max_eval_samples", "16",
         "--report_to", "none", "--disable_tqdm", "true"],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (cwd / "out" / "model.safetensors").exists()
    for root in (home, tmp):
        assert files_under(root) == before[root], root
    assert files_under(cwd, skip={str(cwd / "out")}) == before[cwd]
    assert (caches / "hf").exists()  # the data set cache went where HF_HOME says
