"""engine: accelerate on the BERT-style tasks. With the same recipe and seed it gives engine: trainer's
losses and evaluation metrics: token tags and span logits come in batches of other lengths (padded
with -100 as Trainer pads them), a span model has two logits and two label columns. And extractive
QA trains under a 2-process FSDP launch (which always runs engine: accelerate) as one process does."""

import pytest
import torch

from conftest import launch, logged_losses, read_json, run_engine
from test_multiple_choice import mc_args, swag_rows
from test_multiple_choice import write_jsonl as write_rows
from test_question_answering import qa_args, rows as qa_rows
from test_token_classification import sentences

# Two evaluations, in batches of 5 rows: the last one partial, each padded to its own longest row.
EVALUATED = dict(do_eval="true", eval_strategy="steps", eval_steps=2, max_steps=4, per_device_eval_batch_size=5)


def tagging(model, folder, **overrides):
    train, validation = written(folder, "train.jsonl", sentences(24)), written(folder, "val.jsonl", sentences(12, 1))
    # qa_args' run settings without QA's own fields (None drops a key)
    return qa_args(model, train, folder / "out", validation_file=validation, max_seq_length=None, doc_stride=None,
                   learning_rate=5e-3, **overrides)


def answering(model, folder, **overrides):
    train, validation = written(folder, "train.jsonl", qa_rows(24)), written(folder, "val.jsonl", qa_rows(12, 1))
    return qa_args(model, train, folder / "out", validation_file=validation, **overrides)


def choosing(model, folder, **overrides):
    train, validation = written(folder, "train.jsonl", swag_rows(24)), written(folder, "val.jsonl", swag_rows(12, 1))
    return mc_args(model, train, folder / "out", validation_file=validation, learning_rate=5e-3, optim="adamw_torch",
                   max_grad_norm=1.0, **overrides)


TASKS = {"token-classification": (tagging, "eval_f1"), "question-answering": (answering, "eval_f1"),
         "multiple-choice": (choosing, "eval_accuracy")}


def written(folder, name, rows):
    folder.mkdir(parents=True, exist_ok=True)
    return write_rows(folder / name, rows)


def evaluations(folder):
    return [e for e in read_json(folder / "out" / "trainer_state.json")["log_history"] if "eval_loss" in e]


@pytest.mark.parametrize("task", TASKS)
def test_the_accelerate_engine_scores_as_trainer_does(task, tiny_bert, tmp_path):
    build, metric = TASKS[task]
    for engine in ("trainer", "accelerate"):
        run_engine(build(tiny_bert, tmp_path / engine, engine=engine, **EVALUATED))
    trainer, accelerate = evaluations(tmp_path / "trainer"), evaluations(tmp_path / "accelerate")
    assert len(trainer) == len(accelerate) == 2
    for ours, theirs in zip(accelerate, trainer):
        assert ours["eval_loss"] == pytest.approx(theirs["eval_loss"], abs=1e-5)
        assert ours[metric] == pytest.approx(theirs[metric], abs=1e-6)
    assert logged_losses(tmp_path / "accelerate" / "out") == pytest.approx(logged_losses(tmp_path / "trainer" / "out"),
                                                                          abs=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(torch.accelerator.is_available(), reason="CPU-process launches")
def test_question_answering_under_fsdp_equals_one_process(tiny_bert, tmp_path):
    """Each process evaluates its own features; gathered back in order, they score as one process's.
    (eval_loss is not compared: a process's last batch is topped up with repeated features, and a batch's
    mean loss depends on its padding, as under Trainer.)"""
    sgd = dict(optim="sgd", learning_rate=0.5, **EVALUATED)
    two = launch("fsdp.yaml", 2, answering(tiny_bert, tmp_path / "two", per_device_train_batch_size=4, **sgd))
    assert "using engine: accelerate" in two.stderr + two.stdout
    run_engine(answering(tiny_bert, tmp_path / "one", **sgd))
    assert logged_losses(tmp_path / "two" / "out") == pytest.approx(logged_losses(tmp_path / "one" / "out"), abs=1e-4)
    assert len(evaluations(tmp_path / "two")) == 2
    for ours, theirs in zip(evaluations(tmp_path / "two"), evaluations(tmp_path / "one")):
        assert ours["eval_f1"] == pytest.approx(theirs["eval_f1"], abs=1e-6)
