"""Checkpoints verify their content, and a model loads as its files say or not at all: a file changed
after a checkpoint's seal is found by its checksum (auto skips that checkpoint, an explicit path is
refused), a plain transformers Trainer checkpoint resumes, only the task head may change shape, and
tokenizer_name is the tokenizer every text task uses."""

import json
import logging
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import fail, read_json, strategy_args

from hftune.outputs import CONFIG_FILE
from hftune.run import main
from hftune.training.checkpoints import MANIFEST, is_complete, seal, unusable

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def flip_last_bytes(path):
    """Same size, other content: what a bad disk or a broken copy leaves, invisible to a size check."""
    data = bytearray(path.read_bytes())
    data[-8:] = bytes(255 - b for b in data[-8:])
    path.write_bytes(bytes(data))


def test_a_file_changed_after_the_seal_is_named(tmp_path):
    folder = tmp_path / "checkpoint-2"
    (folder / "state").mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights" * 100)
    (folder / "state" / "optimizer.pt").write_bytes(b"moments" * 100)
    seal(folder)
    assert unusable(folder) is None
    flip_last_bytes(folder / "state" / "optimizer.pt")
    assert is_complete(folder)  # sizes alone cannot tell
    assert unusable(folder) == ("damaged: its state/optimizer.pt no longer matches the checksum recorded when it "
                                "was saved")


@pytest.fixture(scope="module")
def four_steps(tiny_bert, tmp_path_factory, tweets):
    """A 4-step run saving at steps 2 and 4 (dropout on, random order: only an exact resume equals it)."""
    from conftest import write_tweet_split

    folder = tmp_path_factory.mktemp("four-steps")
    train, validation = write_tweet_split(tweets, folder, rows=160, train_rows=128)

    def args(out, **overrides):
        return strategy_args(tiny_bert, out, train, validation, max_steps=4, save_strategy="steps", save_steps=2,
                             hidden_dropout=0.1, **overrides)

    out = folder / "uninterrupted"
    main(args(out))
    return args, out


def same_weights(a, b):
    first, second = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_auto_skips_a_changed_checkpoint_and_an_explicit_path_to_it_is_refused(four_steps, tmp_path, caplog, capsys):
    args, uninterrupted = four_steps
    out = tmp_path / "out"
    shutil.copytree(uninterrupted, out)
    flip_last_bytes(out / "checkpoint-4" / "model.safetensors")
    error = fail(capsys, args(out, resume_from_checkpoint=str(out / "checkpoint-4")))
    assert error.endswith("checkpoint-4' is damaged: its model.safetensors no longer matches the checksum recorded "
                          "when it was saved; pass an earlier checkpoint, or auto (which skips such checkpoints).")
    with caplog.at_level(logging.INFO, logger="hftune"):
        main(args(out, resume_from_checkpoint="auto", overwrite_output_dir="true"))
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith(f"skipping {out / 'checkpoint-4'}: damaged: its model.safetensors") for m in messages)
    assert f"resuming from {out / 'checkpoint-2'}, the latest complete checkpoint" in messages
    assert same_weights(out, uninterrupted)  # steps 3-4 trained again from checkpoint-2, exactly


def test_a_plain_trainer_checkpoint_resumes_exactly(four_steps, tmp_path, caplog):
    args, uninterrupted = four_steps
    out = tmp_path / "out"
    plain = tmp_path / "plain-checkpoint-2"
    shutil.copytree(uninterrupted / "checkpoint-2", plain)
    for name in (MANIFEST, CONFIG_FILE):  # what transformers' own Trainer does not write
        os.remove(plain / name)
    with caplog.at_level(logging.WARNING, logger="hftune"):
        main(args(out, resume_from_checkpoint=str(plain)))
    assert any("is a plain transformers Trainer checkpoint" in r.getMessage() for r in caplog.records)
    assert read_json(out / "trainer_state.json")["global_step"] == 4
    assert same_weights(out, uninterrupted)


def test_a_plain_trainer_checkpoint_without_weights_is_refused(four_steps, tmp_path, capsys):
    args, uninterrupted = four_steps
    plain = tmp_path / "plain"
    shutil.copytree(uninterrupted / "checkpoint-2", plain)
    for name in (MANIFEST, CONFIG_FILE, "model.safetensors"):
        os.remove(plain / name)
    error = fail(capsys, args(tmp_path / "out", resume_from_checkpoint=str(plain)))
    assert "holds no model weights (model.safetensors" in error


def edited_copy(source, folder, **changes):
    shutil.copytree(source, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def test_only_the_task_head_may_change_shape(four_steps, tiny_bert, tweets_csv, tmp_path, capsys, caplog):
    args, uninterrupted = four_steps  # a 3-class classifier
    train, validation = tweets_csv
    two = tmp_path / "two.csv"
    two.write_text("text,sentiment\n" + "".join(f"text {i},{'ab'[i % 2]}\n" for i in range(32)))
    main(strategy_args(str(uninterrupted), tmp_path / "head", two, None, max_steps=1,
                       validation_split_percentage=0))  # a new 2-class head: allowed
    assert load_file(tmp_path / "head" / "model.safetensors")["classifier.weight"].shape[0] == 2
    wider = edited_copy(tiny_bert, tmp_path / "wider", intermediate_size=96)
    error = fail(capsys, strategy_args(wider, tmp_path / "refused", train, validation, max_steps=1))
    assert "intermediate.dense.bias has shape [64] in the weights but [96] in the config (6 tensors disagree)" in error
    assert not (tmp_path / "refused").exists()
    with caplog.at_level(logging.WARNING, logger="hftune"):
        main(strategy_args(wider, tmp_path / "opted-in", train, validation, max_steps=1,
                           reinit_mismatched_backbone="true"))
    assert any("6 backbone tensors re-initialised" in r.getMessage() for r in caplog.records)


def test_tokenizer_name_is_the_tokenizer_a_text_task_uses(tiny_bert, tweets_csv, tmp_path, capsys):
    train, validation = tweets_csv
    bare = tmp_path / "weights-only"
    shutil.copytree(tiny_bert, bare, ignore=shutil.ignore_patterns("tokenizer*", "vocab*", "special*"))
    error = fail(capsys, strategy_args(str(bare), tmp_path / "refused", train, validation, max_steps=1))
    assert "holds no tokenizer files" in error and "set tokenizer_name" in error
    main(strategy_args(str(bare), tmp_path / "out", train, validation, max_steps=1, tokenizer_name=tiny_bert))
    assert json.loads((tmp_path / "out" / "tokenizer.json").read_text())["model"]["vocab"] == \
        json.loads(open(os.path.join(tiny_bert, "tokenizer.json")).read())["model"]["vocab"]
