"""Crash-safe checkpoints: kill -9 at any moment, rerun the same command, get the same model."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import fail, read_json, strategy_args

from hftune.training.checkpoints import MANIFEST, is_complete, latest_complete, rotate, seal
from hftune.run import main

PROBE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kill_probe.py")


def sealed_folder(root, step, payload=b"weights"):
    folder = root / f"checkpoint-{step}"
    (folder / "engine_state").mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(payload)
    (folder / "engine_state" / "optimizer.bin").write_bytes(payload * 2)
    seal(folder)
    return folder


def test_a_checkpoint_counts_only_while_every_file_is_whole(tmp_path):
    folder = sealed_folder(tmp_path, 4)
    assert is_complete(folder)
    (folder / "engine_state" / "optimizer.bin").write_bytes(b"trunc")  # a file cut short
    assert not is_complete(folder)
    folder = sealed_folder(tmp_path, 6)
    (folder / "model.safetensors").unlink()
    assert not is_complete(folder)
    folder = sealed_folder(tmp_path, 8)
    (folder / MANIFEST).write_text('{"files": {"model.safe')  # a manifest cut short
    assert not is_complete(folder)


def test_resume_skips_newer_incomplete_checkpoints(tmp_path, caplog):
    sealed_folder(tmp_path, 2)
    (tmp_path / "checkpoint-4").mkdir()  # killed before it was sealed
    sealed_folder(tmp_path, 6).joinpath(MANIFEST).unlink()
    assert latest_complete(str(tmp_path)) == str(tmp_path / "checkpoint-2")
    skipped = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert len(skipped) == 2 and "checkpoint-6: incomplete" in skipped[0]


def test_rotation_keeps_the_latest_complete_and_the_best(tmp_path):
    for step in (2, 4, 6, 8):
        sealed_folder(tmp_path, step)
    (tmp_path / "checkpoint-10").mkdir()  # an interrupted save is newer than every sealed one
    rotate(str(tmp_path), 1, best=str(tmp_path / "checkpoint-4"))
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-10", "checkpoint-4", "checkpoint-8"]


@pytest.mark.slow
def test_trainer_rotation_keeps_best_and_latest(tiny_bert, tweets_csv, tmp_path):
    train, validation = tweets_csv
    out = tmp_path / "out"
    # greater_is_better on the loss: the best checkpoint is the worst one, an early one, not the latest
    main(strategy_args(tiny_bert, out, train, validation, max_steps=8, eval_strategy="steps", eval_steps=2,
                       save_strategy="steps", save_steps=2, save_total_limit=1, do_eval="true",
                       metric_for_best_model="eval_loss", greater_is_better="true"))
    best = read_json(out / "trainer_state.json")["best_model_checkpoint"]
    kept = sorted(p for p in os.listdir(out) if p.startswith("checkpoint-"))
    assert best.endswith("checkpoint-2") and kept == ["checkpoint-2", "checkpoint-8"]
    assert all(is_complete(out / name) for name in kept)


@pytest.fixture(scope="module")
def kill_command(tiny_bert, tmp_path_factory, tweets):
    from conftest import write_tweet_split

    folder = tmp_path_factory.mktemp("kill-data")
    train, validation = write_tweet_split(tweets, folder)

    def command(out):
        # dropout on and random sampling: only restored RNG states and data order give the same model
        return [sys.executable, PROBE, *strategy_args(
            tiny_bert, out, train, validation, max_steps=8, save_strategy="steps", save_steps=2,
            save_total_limit=1, eval_strategy="steps", eval_steps=3, do_eval="true", per_device_eval_batch_size=16,
            hidden_dropout=0.1, resume_from_checkpoint="auto")]
    return command


def run(command, kill_at=None):
    env = {**os.environ, "HFTUNE_KILL_AT": kill_at or ""}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def uninterrupted(kill_command, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "out"
    result = run(kill_command(out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.slow
def test_kill_9_mid_eval_mid_save_mid_step_then_the_same_command_gives_a_bit_identical_model(
        kill_command, uninterrupted, tmp_path):
    """One run killed three times, each rerun of the same command resuming where the last sealed checkpoint is."""
    out = tmp_path / "out"
    for kill_at, resumes_from in [("eval:3", None), ("save:4", "checkpoint-2"), ("step:7", "checkpoint-2"),
                                  (None, "checkpoint-6")]:
        result = run(kill_command(out), kill_at)
        logs = result.stdout + result.stderr
        assert result.returncode == (-9 if kill_at else 0), logs[-3000:]
        if resumes_from:
            assert f"resuming from {out / resumes_from}, the latest complete checkpoint" in logs, kill_at
        # only the rerun after the killed save meets an unsealed folder (the save of step 4 seals it)
        assert ("checkpoint-4: incomplete" in logs) == (kill_at == "step:7"), kill_at

    expected, got = load_file(uninterrupted / "model.safetensors"), load_file(out / "model.safetensors")
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[name], got[name]) for name in expected)
    histories = [read_json(path / "trainer_state.json")["log_history"] for path in (uninterrupted, out)]
    assert [e["loss"] for e in histories[0] if "loss" in e] == [e["loss"] for e in histories[1] if "loss" in e]
    assert [e["eval_loss"] for e in histories[0] if "eval_loss" in e] == \
        [e["eval_loss"] for e in histories[1] if "eval_loss" in e]


@pytest.mark.slow
def test_resume_refuses_another_model_or_layout_and_allows_another_world_size(
        tiny_bert, tweets_csv, tmp_path, capsys, caplog):
    train, validation = tweets_csv
    out = tmp_path / "out"
    args = strategy_args(tiny_bert, out, train, validation, max_steps=2, save_strategy="steps", save_steps=2)
    main(args)
    manifest = out / "checkpoint-2" / MANIFEST
    record = read_json(manifest)
    assert record["run"] == {"world_size": 1, "zero_stage": None, "fsdp": False}
    assert (out / "checkpoint-2" / "hftune_config.yaml").is_file()

    resume = ["--max_steps=4", "--resume_from_checkpoint=auto"]
    other_model = tmp_path / "other-model"
    shutil.copytree(tiny_bert, other_model)
    for change, named in [([f"--model_name_or_path={other_model}"], "model_name_or_path"),
                          (["--peft=lora"], "peft None -> 'lora'")]:
        line = fail(capsys, args + resume + change)
        assert line.startswith(f"hftune: error: cannot resume from {out / 'checkpoint-2'}: ") and named in line, line

    def rewrite_run(**run):
        manifest.write_text(json.dumps({**record, "run": {**record["run"], **run}}))

    rewrite_run(zero_stage=2)  # as a DeepSpeed ZeRO-2 launch writes it
    assert "zero_stage 2 -> None" in fail(capsys, args + resume)
    rewrite_run(world_size=2)  # a 2-process DDP checkpoint: whole optimizer state on every process
    main(args + resume)
    assert read_json(out / "trainer_state.json")["global_step"] == 4
    assert any("written by 2 processes) with 1" in r.getMessage() for r in caplog.records)
