"""text-classification end to end on a tiny BERT saved locally and real tweets."""


import pandas as pd
import pytest
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from conftest import cli_flags, logged_losses, read_json
from hftune.config import DataArguments, ModelArguments, parse_config
from hftune.data import load_raw_datasets
from hftune.run import main
from hftune.tasks import text_classification

OUTPUT_FILES = [
    "model.safetensors", "config.json", "tokenizer.json", "all_results.json", "train_results.json",
    "eval_results.json", "trainer_state.json", "hftune_config.yaml",
]


def run_args(model, out, **extra):
    return cli_flags(dict(model_name_or_path=model, output_dir=out, report_to="none", learning_rate=3e-3,
                          num_train_epochs=4, per_device_train_batch_size=16, disable_tqdm="true",
                          logging_steps=1, max_seq_length=48, warmup_steps=0), extra)


@pytest.mark.slow
def test_string_labels_train_save_and_reload(tiny_bert, tweets_csv, tmp_path):
    train, validation = tweets_csv
    out = tmp_path / "out"
    main(run_args(tiny_bert, out, train_file=train, validation_file=validation, label_column="sentiment"))

    losses = logged_losses(out)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.05, losses  # it learned something
    for name in OUTPUT_FILES:
        assert (out / name).is_file(), name
    results = read_json(out / "all_results.json")
    assert 0 <= results["eval_accuracy"] <= 1 and 0 <= results["eval_f1_macro"] <= 1
    assert results["eval_samples"] == 80

    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.id2label == {0: "negative", 1: "neutral", 2: "positive"}
    assert model.config.label2id == {"negative": 0, "neutral": 1, "positive": 2}
    tokenizer = AutoTokenizer.from_pretrained(out)
    logits = model(**tokenizer(["what a day"], return_tensors="pt")).logits
    assert logits.shape == (1, 3)


def test_resolved_config_reproduces_the_run(tiny_bert, tweets_csv, tmp_path):
    train, validation = tweets_csv
    out = tmp_path / "out"
    argv = run_args(tiny_bert, out, train_file=train, validation_file=validation, label_column="sentiment",
                    max_steps=2, optim="sgd", optim_args="momentum=0.9", lr_scheduler_type="step",
                    lr_scheduler_kwargs='{"step_size": 1}', warmup_steps=None, warmup_ratio=0.5, l2_lambda=0.01)
    main(argv)
    model_args, data_args, args = parse_config(["--config", str(out / "hftune_config.yaml")])
    assert (args.max_steps, args.learning_rate, data_args.label_column) == (2, 3e-3, "sentiment")
    assert model_args.model_name_or_path == tiny_bert and data_args.train_file == str(train)
    assert (args.optim, args.optim_args, args.lr_scheduler_type) == ("sgd", "momentum=0.9", "step")
    assert (args.lr_scheduler_kwargs, args.warmup_ratio, args.l2_lambda) == ({"step_size": 1}, 0.5, 0.01)



@pytest.mark.slow
def test_text_pairs_with_integer_labels(tiny_bert, tweets, tmp_path):
    # Pair task built from real tweets: label 1 when both tweets share a sentiment.
    rows = tweets.sample(n=480, random_state=1).reset_index(drop=True)
    pairs = pd.DataFrame({
        "premise": rows.text[:240].values, "hypothesis": rows.text[240:].values,
        "label": (rows.sentiment[:240].values == rows.sentiment[240:].values).astype(int),
    })
    pairs.to_json(tmp_path / "pairs.jsonl", orient="records", lines=True)
    out = tmp_path / "out"
    main(run_args(tiny_bert, out, train_file=tmp_path / "pairs.jsonl", text_column="premise",
                  text_pair_column="hypothesis", label_column="label", max_steps=6, validation_split_percentage=20))
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.id2label == {0: "0", 1: "1"}
    results = read_json(out / "all_results.json")
    assert results["eval_samples"] == 48  # 20% of 240 carved from train
    # The pair really reached the model's inputs: the second segment has token_type_id 1.
    data_args = DataArguments(train_file=str(tmp_path / "pairs.jsonl"), text_column="premise",
                              text_pair_column="hypothesis", max_seq_length=48)
    bundle = text_classification.build(ModelArguments(tiny_bert), data_args, load_raw_datasets(data_args))
    example = bundle.train_dataset[0]
    assert 0 in example["token_type_ids"] and 1 in example["token_type_ids"]
    assert example["input_ids"].count(102) == 2  # [SEP] after each segment


@pytest.mark.slow
def test_default_recipe_runs_offline_with_real_weights(tmp_path, capsys):
    """The main job's recipe (real all-MiniLM-L6-v2, real tweets), cut to a few steps: accuracy rises."""
    out = tmp_path / "default"
    main(["--output_dir", str(out), "--max_steps", "16", "--max_train_samples", "512", "--max_eval_samples", "96",
          "--eval_strategy", "steps", "--eval_steps", "16", "--eval_on_start", "true", "--disable_tqdm", "true"])
    summary = capsys.readouterr().out
    assert "eval_accuracy =" in summary and str(out) in summary
    evals = [e["eval_accuracy"] for e in read_json(out / "trainer_state.json")["log_history"] if "eval_accuracy" in e]
    assert evals[-1] > evals[0] + 0.1, evals  # untrained head vs 16 steps
    results = read_json(out / "all_results.json")
    assert results["eval_samples"] == 96 and results["eval_accuracy"] == evals[-1]
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.id2label == {0: "negative", 1: "neutral", 2: "positive"}


@pytest.mark.slow
def test_resume_from_latest_checkpoint(tiny_bert, tweets_csv, tmp_path):
    train, validation = tweets_csv
    out = tmp_path / "out"
    first = run_args(tiny_bert, out, train_file=train, validation_file=validation, label_column="sentiment",
                     save_strategy="steps", save_steps=4)
    main(first + ["--max_steps", "4"])
    assert (out / "checkpoint-4").is_dir()
    main(first + ["--max_steps", "6", "--resume_from_checkpoint", "true"])
    history = read_json(out / "trainer_state.json")["log_history"]
    steps = [e["step"] for e in history if "loss" in e]
    assert steps == [1, 2, 3, 4, 5, 6]  # the first 4 come from the checkpoint's state, then 5 and 6
    assert read_json(out / "trainer_state.json")["global_step"] == 6


def test_dataset_name_loads_through_load_dataset(tiny_bert, tweets_csv, tmp_path):
    """dataset_name goes straight to datasets.load_dataset (a Hub id there; a local folder here)."""
    train, validation = tweets_csv
    out = tmp_path / "out"
    main(run_args(tiny_bert, out, dataset_name=train.parent, label_column="sentiment", max_steps=2))
    assert read_json(out / "all_results.json")["eval_samples"] == 80  # validation.csv found by name


@pytest.mark.slow
def test_do_predict_evaluates_the_test_split(tiny_bert, tweets_csv, tmp_path):
    train, validation = tweets_csv
    out = tmp_path / "out"
    main(run_args(tiny_bert, out, train_file=train, validation_file=validation, test_file=validation,
                  label_column="sentiment", max_steps=2, do_predict="true"))
    results = read_json(out / "all_results.json")
    assert results["test_samples"] == 80 and results["test_accuracy"] == results["eval_accuracy"]  # same rows
    assert (out / "test_results.json").is_file()
