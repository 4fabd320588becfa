"""multiple-choice: each ending paired with its context in order, a run that learns (task inferred from the
columns), run_swag.py's command, predictions in row order, bad input in one line, distillation, the loss
weighed alike under accumulation, exact resume; 2 processes equal 1 (slow)."""

import json
import random

import pytest
from transformers import AutoTokenizer

from conftest import cli_flags, fail, launch, read_json, tiny_model
from hftune.config import DataArguments
from hftune.tasks.multiple_choice import ChoicesCollator, encoder

WORDS = ["red", "cat", "apple", "river"]


def toy_rows(n, seed=0):
    """Learnable rows in HellaSwag's form (ctx_a, ctx_b, endings, label as a string): the endings name the
    4 keywords in a random order, the right one repeats the context's (an ending alone tells nothing)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        endings = rng.sample(WORDS, 4)
        label = rng.randrange(4)
        rows.append({"ctx_a": endings[label], "ctx_b": "",
                     "endings": endings, "label": str(label)})
    return rows


def swag_rows(n, seed=0):
    """The same rows in run_swag.py's form: sent1, sent2, ending0..ending3, an integer label."""
    return [{"sent1": r["ctx_a"], "sent2": r["ctx_b"], **{f"ending{i}": e for i, e in enumerate(r["endings"])},
             "label": int(r["label"])} for r in toy_rows(n, seed)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def mc_args(model, train, out, **overrides):
    settings = dict(model_name_or_path=model, train_file=train, validation_split_percentage=0, do_eval="false",
                    output_dir=out, max_steps=1, optim="sgd", learning_rate=1.0, per_device_train_batch_size=8,
                    train_sampling_strategy="sequential", save_strategy="no", max_grad_norm=0, logging_steps=1,
                    report_to="none", disable_tqdm="true", seed=0)
    return cli_flags(settings, overrides)


def weights(path):
    from safetensors.torch import load_file

    return load_file(f"{path}/model.safetensors")


def max_difference(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """conftest's tiny BERT, seeded: from some initialisations its 2 layers of 32 never learn to match the
    keywords within the test's budget (from this one it does: chance to 1.0 in 4 epochs)."""
    return tiny_model(tmp_path_factory.mktemp("tiny-bert-mc"), "bert", seed=1)


def test_each_ending_is_paired_with_its_context_in_order(tiny_bert):
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    data = DataArguments(task="multiple-choice", first_sentence_column="ctx_a", question_header_column="ctx_b",
                         ending_columns="endings", label_column="label", max_seq_length=128)
    batch = {"ctx_a": ["A man sits on a roof.", "A lady walks to a barbell."], "ctx_b": ["he", ""],
             "endings": [["is using wrap.", "rips tiles off.", "holds a cube."], ["swings.", "lifts it.", "sits."]],
             "label": ["2", 0]}
    encoded = encoder(tokenizer, data, 3, "train")(batch, [0, 1])
    assert encoded["labels"] == [2, 0]
    decoded = [[tokenizer.decode(ids) for ids in row] for row in encoded["input_ids"]]
    assert decoded == [[f"[CLS] a man sits on a roof. [SEP] he {e} [SEP]" for e in ("is using wrap.", "rips tiles off.",
                                                                                 "holds a cube.")],
                       [f"[CLS] a lady walks to a barbell. [SEP] {e} [SEP]" for e in ("swings.", "lifts it.", "sits.")]]
    # the second sentence's segment ids start right after the first [SEP]
    first = encoded["token_type_ids"][0][1]
    assert first.index(1) == encoded["input_ids"][0][1].index(tokenizer.sep_token_id) + 1

    examples = [{k: v[i] for k, v in encoded.items()} for i in range(2)]
    padded = ChoicesCollator(tokenizer)(examples)
    longest = max(len(ids) for row in encoded["input_ids"] for ids in row)
    assert tuple(padded["input_ids"].shape) == (2, 3, longest) and padded["labels"].tolist() == [2, 0]
    assert padded["input_ids"][1, 1, :len(encoded["input_ids"][1][1])].tolist() == encoded["input_ids"][1][1]
    unlabelled = ChoicesCollator(tokenizer, padding="max_length", max_length=40)(
        [{k: v for k, v in e.items() if k != "labels"} for e in examples])
    assert "labels" not in unlabelled and tuple(unlabelled["input_ids"].shape) == (2, 3, 40)


@pytest.fixture(scope="module")
def trained(tiny_bert, tmp_path_factory):
    """A run on HellaSwag-form rows, task inferred; evaluated at the start and after each epoch, test predicted."""
    from hftune.run import main

    folder = tmp_path_factory.mktemp("mc")
    out = folder / "out"
    main(["--model_name_or_path", tiny_bert, "--train_file", write_jsonl(folder / "train.jsonl", toy_rows(256)),
          "--validation_file", write_jsonl(folder / "validation.jsonl", toy_rows(64, seed=1)),
          "--test_file", write_jsonl(folder / "test.jsonl", toy_rows(24, seed=2)), "--do_predict", "true",
          "--output_dir", str(out), "--num_train_epochs", "6", "--learning_rate", "5e-3",
          "--per_device_train_batch_size", "16", "--eval_strategy", "epoch", "--eval_on_start", "true",
          "--logging_steps", "4", "--save_strategy", "no", "--report_to", "none", "--seed", "0", "--disable_tqdm", "true"])
    return out


def test_a_run_learns_to_choose(trained):
    resolved = (trained / "hftune_config.yaml").read_text()
    assert "task: multiple-choice" in resolved  # inferred from the endings column
    assert "first_sentence_column: ctx_a" in resolved and "ending_columns: endings" in resolved
    history = read_json(trained / "trainer_state.json")["log_history"]
    accuracy = [e["eval_accuracy"] for e in history if "eval_accuracy" in e]
    assert accuracy[0] < 0.4 and accuracy[-1] > 0.6, accuracy  # 4 endings: chance is 0.25
    assert read_json(trained / "all_results.json")["test_accuracy"] > 0.6
    card = (trained / "README.md").read_text()  # the model card: its Hub task, scores and usage
    assert "pipeline_tag: multiple-choice" in card and "| validation | accuracy |" in card
    assert f'AutoModelForMultipleChoice.from_pretrained("{trained}")' in card


def test_predictions_are_one_row_per_input_in_order(trained):
    predicted = [json.loads(line) for line in (trained / "predictions_test.jsonl").read_text().splitlines()]
    rows = toy_rows(24, seed=2)
    assert [p["index"] for p in predicted] == list(range(len(rows)))
    assert [p["true_choice"] for p in predicted] == [int(r["label"]) for r in rows]
    for p in predicted:
        assert len(p["probabilities"]) == 4 and sum(p["probabilities"]) == pytest.approx(1.0)
        assert p["score"] == max(p["probabilities"]) == p["probabilities"][p["choice"]]
    right = sum(p["choice"] == p["true_choice"] for p in predicted)
    assert right / len(rows) == pytest.approx(read_json(trained / "all_results.json")["test_accuracy"])


def test_run_swag_command_runs_as_written(tiny_bert, tmp_path):
    """run_swag.py's test command (its sample's sent1/sent2/ending0-3 columns), hftune/run.py in its place."""
    from hftune.run import main

    train = write_jsonl(tmp_path / "sample.json", swag_rows(24))
    out = tmp_path / "swag"
    main(["--model_name_or_path", tiny_bert, "--train_file", train, "--validation_file", train,
          "--output_dir", str(out), "--max_steps=4", "--warmup_steps=2", "--do_train", "--do_eval",
          "--learning_rate=2e-4", "--per_device_train_batch_size=2", "--per_device_eval_batch_size=1",
          "--report_to", "none", "--overwrite_output_dir", "--max_seq_length", "32", "--pad_to_max_length",
          "--max_train_samples", "16", "--max_eval_samples", "8", "--preprocessing_num_workers", "1"])
    results = read_json(out / "all_results.json")
    assert results["train_samples"] == 16 and results["eval_samples"] == 8 and 0 <= results["eval_accuracy"] <= 1
    resolved = (out / "hftune_config.yaml").read_text()
    assert "task: multiple-choice" in resolved and "ending_columns: ending0,ending1,ending2,ending3" in resolved
    assert "first_sentence_column: sent1" in resolved and "question_header_column: sent2" in resolved


def test_bad_input_is_one_line(tiny_bert, tmp_path, capsys):
    train, validation = tmp_path / "train.jsonl", tmp_path / "validation.jsonl"
    args = ["--model_name_or_path", tiny_bert, "--task", "multiple-choice", "--train_file", str(train),
            "--validation_file", str(validation), "--output_dir", str(tmp_path / "out")]
    write_jsonl(train, toy_rows(8))
    rows = toy_rows(8, seed=1)
    rows[5]["endings"] = rows[5]["endings"][:3]
    write_jsonl(validation, rows)
    assert "row 5 of the validation split has 3 endings, the train split's first row 4" in fail(capsys, args)
    write_jsonl(validation, toy_rows(8, seed=1))
    assert "ending_columns (ending) 'ending' is not a column of the train split. Did you mean 'endings'?" in \
        fail(capsys, args + ["--ending_columns", "ending"])
    write_jsonl(validation, [{**r, "label": "4" if i == 6 else r["label"]} for i, r in enumerate(toy_rows(8, seed=1))])
    assert "label_column 'label' is '4' at row 6 of the validation split; a label is the index of the right ending, " \
           "0 to 3" in fail(capsys, args)
    integers = [{**r, "label": int(r["label"])} for r in toy_rows(8)]
    write_jsonl(train, integers)
    write_jsonl(validation, [{**r, "label": -1 if i == 2 else r["label"]} for i, r in enumerate(integers)])
    assert "label_column 'label' is -1 at row 2 of the validation split" in fail(capsys, args)
    write_jsonl(train, [{"ctx_a": "a", "label": 0, "answer": "b"}] * 4)
    write_jsonl(validation, [{"ctx_a": "a", "label": 0, "answer": "b"}] * 4)
    assert "no ending columns (ending0, ending1, ... or endings / choices) among the train split's columns " \
           "['ctx_a', 'label', 'answer']; set ending_columns." in fail(capsys, args)


def test_distillation_teaches_the_student_without_labels(trained, tiny_bert, tmp_path):
    """distill_alpha 0: the student learns from the trained teacher's softmax over each row's endings alone,
    and so learns the labels it never trains on (task_loss is logged, not trained)."""
    from hftune.run import main

    out = tmp_path / "student"
    main(["--model_name_or_path", tiny_bert, "--teacher_model_name_or_path", str(trained), "--distill_alpha", "0",
          "--distill_temperature", "1", "--train_file", write_jsonl(tmp_path / "train.jsonl", toy_rows(256)),
          "--validation_split_percentage", "0", "--do_eval", "false", "--output_dir", str(out),
          "--num_train_epochs", "8", "--learning_rate", "5e-3", "--per_device_train_batch_size", "16",
          "--logging_steps", "4", "--save_strategy", "no", "--report_to", "none", "--seed", "0", "--disable_tqdm", "true"])
    history = [e for e in read_json(out / "trainer_state.json")["log_history"] if "distill_loss" in e]
    distill, task = [e["distill_loss"] for e in history], [e["task_loss"] for e in history]
    assert distill[-1] < 0.25 * distill[0] and task[-1] < 0.5 * task[0], (distill, task)


def test_accumulated_micro_batches_equal_one_batch(tiny_bert, tmp_path):
    """Batch 8 x 1 equals 4 x 2 accumulated: the per-micro-batch mean loss is divided by the accumulation
    steps (accepts_loss_kwargs off), not summed."""
    from hftune.run import main

    train = write_jsonl(tmp_path / "train.jsonl", toy_rows(8))
    main(mc_args(tiny_bert, train, tmp_path / "whole"))
    main(mc_args(tiny_bert, train, tmp_path / "accumulated", per_device_train_batch_size=4,
                 gradient_accumulation_steps=2))
    whole, accumulated = weights(tmp_path / "whole"), weights(tmp_path / "accumulated")
    start = weights(tiny_bert)  # the masked LM's encoder, under the same names
    assert max((whole[k] - start[k]).abs().max().item() for k in whole.keys() & start.keys()) > 5e-5
    assert max_difference(whole, accumulated) < 1e-6


def test_resume_continues_exactly(tiny_bert, tmp_path):
    from hftune.run import main

    train = write_jsonl(tmp_path / "train.jsonl", toy_rows(32))
    flags = dict(max_steps=4, optim="adamw_torch", learning_rate=1e-3, train_sampling_strategy="random",
                 per_device_train_batch_size=4, save_strategy="steps", save_steps=2)
    main(mc_args(tiny_bert, train, tmp_path / "whole", **flags))
    main(mc_args(tiny_bert, train, tmp_path / "resumed", **flags,
                 resume_from_checkpoint=tmp_path / "whole" / "checkpoint-2"))
    whole, resumed = weights(tmp_path / "whole"), weights(tmp_path / "resumed")
    assert max_difference(whole, weights(tmp_path / "whole" / "checkpoint-2")) > 1e-4  # steps 3-4 changed weights
    assert max_difference(whole, resumed) < 1e-6


@pytest.mark.parametrize("config", ["ddp.yaml", "deepspeed_zero3.yaml", "fsdp.yaml"])
@pytest.mark.slow
def test_two_processes_equal_one(config, tiny_bert, tmp_path):
    """Under DDP, ZeRO-3 and FSDP."""
    from hftune.run import main

    train = write_jsonl(tmp_path / "train.jsonl", toy_rows(16))
    main(mc_args(tiny_bert, train, tmp_path / "one", max_steps=2))
    launch(config, 2, mc_args(tiny_bert, train, tmp_path / "two", max_steps=2, per_device_train_batch_size=4))
    assert max_difference(weights(tmp_path / "one"), weights(tmp_path / "two")) < 1e-5
