"""question-answering: long contexts split into features that keep the answer's span, the n-best span
choice across features, SQuAD's exact match and F1, a run that learns (and its SQuAD v2 form), the
saved model answering through hftune's loader, run_qa.py's command, DDP and resume, bad input."""

import json
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from conftest import cli_flags, fail, launch, logged_losses, read_json, run_engine
from hftune.data import load_raw_datasets
from hftune.errors import HftuneError
from hftune.metrics import load_metric
from hftune.tasks import question_answering
from hftune.tasks.question_answering import DataFields, QAFeatures, answer, best_answers, encode_split
from test_sft import trained_weights

CITIES = ["Paris", "Kathmandu", "Lima", "Oslo", "Nairobi", "Hanoi", "Quito", "Dakar"]
FILLER = "the weather was mild and people walked along the river while shops opened slowly".split()
QUESTION = "Which city did she visit?"


def rows(n, seed=0, unanswerable=0.0):
    """Contexts of 20 to 110 words, the answer (a city) anywhere in them; some with none (SQuAD v2)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        before = " ".join(rng.choice(FILLER) for _ in range(rng.randint(5, 60)))
        after = " ".join(rng.choice(FILLER) for _ in range(rng.randint(5, 40)))
        city = rng.choice(CITIES)
        if rng.random() < unanswerable:
            out.append({"id": str(i), "question": QUESTION, "context": f"{before}. {after}.",
                        "answers": {"text": [], "answer_start": []}})
            continue
        context = f"{before}. She visited {city} in May. {after}."
        out.append({"id": str(i), "question": QUESTION, "context": context,
                    "answers": {"text": [city], "answer_start": [context.index("visited ") + len("visited ")]}})
    return out


def write_jsonl(path, data):
    path.write_text("".join(json.dumps(r) + "\n" for r in data))
    return str(path)


def qa_args(model, train, out, **overrides):
    settings = dict(model_name_or_path=model, train_file=train, validation_split_percentage=0, do_eval="false",
                    output_dir=out, max_steps=4, per_device_train_batch_size=8, learning_rate=5e-3, warmup_steps=0,
                    logging_steps=1, save_strategy="no", train_sampling_strategy="sequential", report_to="none",
                    disable_tqdm="true", seed=0, max_seq_length=48, doc_stride=16)
    return cli_flags(settings, overrides)


def test_long_contexts_become_features_that_keep_the_answer_span(tiny_bert):
    from datasets import Dataset

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    data = rows(40)
    features, spans = encode_split(Dataset.from_list(data), tokenizer, DataFields(max_seq_length=48, doc_stride=16),
                                   labelled=True)
    assert max(np.bincount(spans.example)) >= 3  # long contexts: several features each
    holding = set()
    for i, e in enumerate(spans.example):
        start, end = features[i]["start_positions"], features[i]["end_positions"]
        if start == 0:
            assert end == 0  # a feature without the whole answer points at [CLS]
            continue
        offsets = spans.offsets[i]
        assert data[e]["context"][offsets[start][0]:offsets[end][1]] == data[e]["answers"]["text"][0]
        holding.add(e)
    assert holding == set(range(40))  # every answer is whole in some feature (the stride overlaps windows)
    assert any(spans.example.count(e) > 1 and features[spans.example.index(e)]["start_positions"] == 0
               for e in holding)  # ... not always the first


def test_the_best_span_is_chosen_across_features():
    context = "Ada Lovelace wrote notes in 1843 about the engine"
    spans = QAFeatures(example=[0, 0], offsets=[
        [None, None, (0, 3), (4, 12), (13, 18), None],  # [CLS] question [Ada] [Lovelace] [wrote] [SEP]
        [None, None, (19, 24), (25, 27), (28, 32), (33, 38), None],  # ... notes in 1843 about
    ])
    starts = np.full((2, 7), -10.0)
    ends = np.full((2, 7), -10.0)
    starts[0, 1], ends[0, 1] = 9, 9  # the question's token: not in the context, never an answer
    starts[0, 2], ends[0, 3] = 3, 3  # "Ada Lovelace": 6
    starts[1, 4], ends[1, 4] = 4, 4  # "1843": 8, the best
    ends[1, 3] = 20  # ends before the best start: never paired with it
    settings = dict(n_best=3, max_length=30, allow_null=False, threshold=0.0)
    assert best_answers(spans, [context], (starts, ends), **settings) == ["1843"]
    # only each feature's top start and end: the question token and an end before its start, nothing valid
    assert best_answers(spans, [context], (starts, ends), **{**settings, "n_best": 1}) == [""]
    starts[1, 4] = -10.0  # "1843" gone: the first feature's span wins
    assert best_answers(spans, [context], (starts, ends), **settings) == ["Ada Lovelace"]
    assert best_answers(spans, [context], (starts, ends), **{**settings, "max_length": 1}) != ["Ada Lovelace"]
    starts[1, 0], ends[1, 0] = 5, 5  # one feature's [CLS] scores 10 > 6, the other's -20: the lowest counts
    assert best_answers(spans, [context], (starts, ends), **{**settings, "allow_null": True}) == ["Ada Lovelace"]
    starts[0, 0], ends[0, 0] = 5, 5  # null score 10 in every feature
    assert best_answers(spans, [context], (starts, ends), **{**settings, "allow_null": True}) == [""]
    assert best_answers(spans, [context], (starts, ends), **{**settings, "allow_null": True, "threshold": 5.0}) == \
        ["Ada Lovelace"]


def test_exact_match_and_f1_follow_squad_s_definition():
    squad = load_metric("squad")
    # normalised: case, punctuation and articles do not count; the best reference counts
    assert squad.compute(predictions=["The Eiffel Tower!"], references=[["Eiffel tower", "Paris"]]) == \
        {"exact_match": 100.0, "f1": 100.0}
    # 2 shared words of 3 predicted and 2 wanted: precision 2/3, recall 1, F1 0.8
    scores = squad.compute(predictions=["Denver Broncos team", "Lima"], references=[["Denver Broncos"], ["Oslo"]])
    assert scores["exact_match"] == 0.0 and scores["f1"] == pytest.approx(40.0)
    # SQuAD v2: an unanswerable question is right only with "", and scored apart
    scores = squad.compute(predictions=["", "x", "Lima"], references=[[], [], ["Lima"]])
    assert scores["exact_match"] == pytest.approx(200 / 3) and scores["no_answer_exact_match"] == 50.0
    assert scores["has_answer_exact_match"] == 100.0


def test_a_run_learns_to_answer_and_answers_per_question(tiny_bert, tmp_path):
    from hftune.run import main

    out = tmp_path / "out"
    test = rows(12, seed=2)
    main(qa_args(tiny_bert, write_jsonl(tmp_path / "train.jsonl", rows(160)), out, max_steps=None,
                 num_train_epochs=3, per_device_train_batch_size=16, eval_strategy="epoch", eval_on_start="true",
                 do_eval="true", validation_file=write_jsonl(tmp_path / "validation.jsonl", rows(48, seed=1)),
                 do_predict="true", test_file=write_jsonl(tmp_path / "test.jsonl", test), logging_steps=10))
    assert "task: question-answering" in (out / "hftune_config.yaml").read_text()  # inferred from the columns
    history = read_json(out / "trainer_state.json")["log_history"]
    f1 = [e["eval_f1"] for e in history if "eval_f1" in e]
    losses = [e["loss"] for e in history if "loss" in e]
    assert losses[-1] < 0.3 * losses[0] and f1[0] < 30 and f1[-1] > 90, (losses, f1)
    assert read_json(out / "all_results.json")["eval_samples"] == 48  # questions, not features
    predicted = [json.loads(line) for line in (out / "predictions_test.jsonl").read_text().splitlines()]
    assert [p["question"] for p in predicted] == [r["question"] for r in test]
    assert [p["true_answers"] for p in predicted] == [r["answers"]["text"] for r in test]  # in row order
    assert sum(p["answer"] == p["true_answers"][0] for p in predicted) >= 11
    long_context = ". ".join(["the river was mild and shops opened slowly"] * 12) + ". She visited Lima in May."
    assert answer(str(out), QUESTION, long_context, max_seq_length=48, doc_stride=16) == "Lima"  # in a later feature
    assert 'answer("' in (out / "README.md").read_text()  # the card's usage: transformers 5 has no QA pipeline
    main(["evaluate", "--model_name_or_path", str(out), "--train_file", str(tmp_path / "train.jsonl"),
          "--validation_file", str(tmp_path / "validation.jsonl"),
          "--output_dir", str(tmp_path / "evaluated"), "--max_seq_length", "48", "--doc_stride", "16"])
    assert read_json(tmp_path / "evaluated" / "all_results.json")["eval_f1"] == pytest.approx(f1[-1])


def test_unanswerable_questions_are_learned_with_version_2(tiny_bert, tmp_path):
    from hftune.run import main

    out = tmp_path / "v2"
    main(qa_args(tiny_bert, write_jsonl(tmp_path / "train.jsonl", rows(192, unanswerable=0.3)), out, max_steps=None,
                 num_train_epochs=3, per_device_train_batch_size=16, do_eval="true", version_2_with_negative="true",
                 validation_file=write_jsonl(tmp_path / "validation.jsonl", rows(48, seed=1, unanswerable=0.3))))
    results = read_json(out / "all_results.json")
    assert results["eval_no_answer_exact_match"] > 80 and results["eval_has_answer_f1"] > 80, results


def test_run_qa_command_runs_as_written(tiny_bert, tmp_path):
    """run_qa.py's test command: a SQuAD-format JSON file (rows under "data"), SQuAD v2."""
    from hftune.run import main

    squad = tmp_path / "sample.json"
    squad.write_text(json.dumps({"version": "v2.0", "data": rows(12, unanswerable=0.3)}, indent=1))
    out = tmp_path / "run_qa"
    main(["--model_name_or_path", tiny_bert, "--version_2_with_negative", "--train_file", str(squad),
          "--validation_file", str(squad), "--output_dir", str(out), "--max_steps=10", "--warmup_steps=2",
          "--do_train", "--do_eval", "--learning_rate=2e-4", "--per_device_train_batch_size=2",
          "--per_device_eval_batch_size=1"])
    results = read_json(out / "all_results.json")
    assert results["eval_samples"] == 12 and 0 <= results["eval_f1"] <= 100
    assert "max_seq_length: 384" in (out / "hftune_config.yaml").read_text()  # run_qa.py's default, not 128


def test_a_student_learns_the_spans_from_its_teacher_alone(tiny_bert, tmp_path):
    """Span distillation with distill_alpha 0: the student sees only the teacher's start and end
    distributions over each feature's positions, and still learns to answer."""
    from hftune.run import main

    train = write_jsonl(tmp_path / "train.jsonl", rows(128))
    common = dict(max_steps=None, num_train_epochs=3, per_device_train_batch_size=16, do_eval="true",
                  validation_file=write_jsonl(tmp_path / "validation.jsonl", rows(32, seed=1)), logging_steps=4)
    main(qa_args(tiny_bert, train, tmp_path / "teacher", **common))
    main(qa_args(tiny_bert, train, tmp_path / "student", teacher_model_name_or_path=tmp_path / "teacher",
                 distill_alpha=0, **common))
    teacher, student = (read_json(tmp_path / name / "all_results.json")["eval_f1"] for name in ("teacher", "student"))
    assert teacher > 80 and student > 60, (teacher, student)
    distilled = [e["distill_loss"] for e in read_json(tmp_path / "student" / "trainer_state.json")["log_history"]
                 if "distill_loss" in e]
    assert distilled and distilled[-1] < 0.5 * distilled[0], distilled


def test_lora_saves_the_span_head(tiny_bert, tmp_path):
    from safetensors.torch import load_file

    from hftune.run import main

    out = tmp_path / "lora"
    main(qa_args(tiny_bert, write_jsonl(tmp_path / "train.jsonl", rows(16)), out, peft="lora"))
    saved = load_file(out / "adapter_model.safetensors")
    assert any("qa_outputs" in k for k in saved) and any("lora_A" in k for k in saved)


def test_bad_input_is_one_line_before_training(tiny_bert, tmp_path, capsys):
    train = tmp_path / "train.jsonl"
    args = qa_args(tiny_bert, str(train), tmp_path / "out", task="question-answering")
    data = rows(8)
    data[5]["answers"]["answer_start"] = [3]
    write_jsonl(train, data)
    line = fail(capsys, args)
    assert "train row 5: answer 'Nairobi' is not at answer_start 3" in line and "fix answer_start" in line
    write_jsonl(train, rows(8, unanswerable=0.5))
    assert "set version_2_with_negative: true" in fail(capsys, args)
    write_jsonl(train, rows(8))
    assert "doc_stride (48) must be smaller than max_seq_length (48)" in fail(capsys, args + ["--doc_stride=48"])
    with pytest.raises(HftuneError, match="does not run on engine: pipeline"):  # past the launch's own check
        question_answering.check_config(None, DataFields(), SimpleNamespace(engine="pipeline"))
    write_jsonl(train, [{**r, "question": "Which of the many cities " * 8 + "?"} for r in rows(8)])
    assert "a question of 41 tokens leaves 4 tokens of context per feature in max_seq_length 48" in fail(capsys, args)
    write_jsonl(train, rows(8))
    write_jsonl(train, [{"question": r["question"], "passage": r["context"], "answers": r["answers"]} for r in rows(8)])
    assert "context_column 'context' is not a column of the train split" in fail(capsys, args)


def test_resume_continues_exactly(tiny_bert, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", rows(32))
    flags = dict(train_sampling_strategy="random", save_strategy="steps", save_steps=2)
    run_engine(qa_args(tiny_bert, train, tmp_path / "whole", **flags))
    run_engine(qa_args(tiny_bert, train, tmp_path / "resumed", **flags,
                       resume_from_checkpoint=tmp_path / "whole" / "checkpoint-2"))
    whole, resumed = trained_weights(tmp_path / "whole"), trained_weights(tmp_path / "resumed")
    checkpoint = trained_weights(tmp_path / "whole" / "checkpoint-2")
    assert max((whole[k] - checkpoint[k]).abs().max().item() for k in whole) > 1e-3  # steps 3-4 changed weights
    assert max((whole[k] - resumed[k]).abs().max().item() for k in whole) < 1e-6


@pytest.mark.parametrize("config", ["ddp.yaml", "deepspeed_zero3.yaml"])  # FSDP: test_encoder_tasks_engines.py
@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU (gloo) launch")
def test_two_processes_equal_one_process(config, tiny_bert, tmp_path):
    """2 processes of 4 features each step give the 1-process losses (8 features) and weights (SGD: Adam
    would turn the all-reduce's rounding in near-zero gradients into whole-learning-rate steps)."""
    train = write_jsonl(tmp_path / "train.jsonl", rows(24))
    sgd = dict(optim="sgd", learning_rate=0.5)
    launch(config, 2, qa_args(tiny_bert, train, tmp_path / "two", per_device_train_batch_size=4, **sgd))
    run_engine(qa_args(tiny_bert, train, tmp_path / "one", **sgd))
    assert logged_losses(tmp_path / "two") == pytest.approx(logged_losses(tmp_path / "one"), abs=1e-4)
    two, one = trained_weights(tmp_path / "two"), trained_weights(tmp_path / "one")
    assert max((two[k] - one[k]).abs().max().item() for k in one) < 1e-4


def test_squad_asset_rows_hold_their_answers():
    from hftune.config import parse_config

    _, data_args, _ = parse_config(["--task", "question-answering", "--dataset_name", "asset:squad-1000",
                                    "--model_name_or_path", "asset:all-MiniLM-L6-v2", "--output_dir", "/tmp/unused"])
    raw = load_raw_datasets(data_args)
    assert (len(raw["train"]), len(raw["validation"])) == (751, 249)
    assert not set(raw["train"]["title"]) & set(raw["validation"]["title"])  # split by article
    for row in raw["validation"]:
        for text, start in zip(row["answers"]["text"], row["answers"]["answer_start"]):
            assert row["context"][start:start + len(text)] == text
