"""What hftune already had, on the BERT-style tasks added after it: the NaN guard skips a step whose
gradient is not finite (its head's weights unchanged, the next step trains again), and the run
reports the throughput fields (tokens/s, MFU, peak memory) for extractive QA, multiple choice and
masked-LM alike."""

import logging

import pytest
import torch

from conftest import read_json, run_engine
from test_guards import InjectNaN
from test_masked_lm import mlm_args
from test_multiple_choice import mc_args, swag_rows
from test_multiple_choice import write_jsonl as write_rows
from test_question_answering import qa_args, rows as qa_rows


def qa_run(model, folder):
    return qa_args(model, write_rows(folder / "train.jsonl", qa_rows(24)), folder / "out"), "qa_outputs"


def mc_run(model, folder):
    return mc_args(model, write_rows(folder / "train.jsonl", swag_rows(24)), folder / "out", learning_rate=0.1), \
        "classifier"


def mlm_run(model, folder):
    (folder / "train.txt").write_text("\n".join(f"tweet number {i} says hello to the world" for i in range(48)))
    return mlm_args(model, str(folder / "train.txt"), None, folder / "out"), "cls.predictions.transform.dense"


RUNS = {"question-answering": qa_run, "multiple-choice": mc_run, "masked-lm": mlm_run}


@pytest.mark.parametrize("task", RUNS)
def test_nan_guard_and_throughput_fields(task, tiny_bert, tmp_path, caplog):
    args, head = RUNS[task](tiny_bert, tmp_path)
    injector = InjectNaN([2], layer=head)
    with caplog.at_level(logging.WARNING, logger="hftune"):
        run_engine(args + ["--max_steps=3"], callbacks=[injector])
    assert "non-finite gradient (NaN or inf) at step 2" in caplog.text
    assert torch.equal(injector.weights[2], injector.weights[1])  # step 2 changed nothing
    assert not torch.equal(injector.weights[3], injector.weights[2])  # step 3 trained again
    results = read_json(tmp_path / "out" / "all_results.json")
    assert results["train_real_tokens_per_second"] > 0 and 0 < results["train_mfu"] < 1
    assert results["train_peak_memory_mib"] > 0 and results["train_model_flops_per_token"] > 0
