"""Runs do what the command line says: a recipe only when named (or for the demo), fields without
effect refused, the HF example scripts' commands accepted as written (their argument names, their
column detection, task inference from the checkpoint and the data, training from scratch)."""

import pandas as pd
import pytest
import yaml

from conftest import fail, read_json
from hftune.config import parse_config
from hftune.data import load_raw_datasets
from hftune.errors import HftuneError


def parse(*argv):
    return parse_config([*argv, "--output_dir", "/tmp/hftune-unused"])


@pytest.fixture
def pairs_csv(tmp_path, tweets):
    """An MRPC-shaped file: sentence1, sentence2, label (whether the pair shares a sentiment)."""
    rows = tweets.sample(n=120, random_state=1).reset_index(drop=True)
    first, second = rows.iloc[:60].reset_index(drop=True), rows.iloc[60:].reset_index(drop=True)
    frame = pd.DataFrame({"idx": range(60), "sentence1": first["text"], "sentence2": second["text"],
                          "label": (first["sentiment"] == second["sentiment"]).astype(int)})
    folder = tmp_path / "mrpc"
    folder.mkdir()
    frame.iloc[:48].to_csv(folder / "train.csv", index=False)
    frame.iloc[48:].to_csv(folder / "validation.csv", index=False)
    return folder / "train.csv", folder / "validation.csv"


@pytest.fixture
def corpus_txt(tmp_path, tweets):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(tweets["text"].head(300)) + "\n")
    return path


# ---- the base a run is built on ----

def test_the_demo_is_the_base_only_without_model_data_or_task(tiny_bert, tweets_csv):
    _, data, args = parse("--max_steps", "10")
    assert data.max_train_samples == 8000 and args.learning_rate == 1e-4 and args.save_strategy == "no"
    assert args.config_base.startswith("the demo recipe text_classification")

    train, validation = tweets_csv
    model, data, args = parse("--model_name_or_path", tiny_bert, "--train_file", str(train),
                              "--validation_file", str(validation))
    assert data.max_train_samples is None and data.max_eval_samples is None  # every row
    assert args.save_strategy == "steps" and args.save_steps == 500  # TrainingArguments' checkpointing
    assert args.warmup_steps == 0 and args.weight_decay == 0 and args.learning_rate == 5e-5
    assert args.train_sampling_strategy == "random" and args.logging_steps == 500
    assert "TrainingArguments' defaults" in args.config_base and "model_name_or_path, train_file" in args.config_base

    _, data, args = parse("--config", "text_classification", "--model_name_or_path", tiny_bert)
    assert data.max_train_samples == 8000 and args.config_base.startswith("recipe text_classification")


def test_a_run_naming_its_own_data_uses_every_row_and_checkpoints(tiny_bert, tweets_csv, tmp_path, caplog):
    from hftune.run import main

    train, validation = tweets_csv
    out = tmp_path / "out"
    main(["--model_name_or_path", tiny_bert, "--train_file", str(train), "--validation_file", str(validation),
          "--label_column", "sentiment", "--output_dir", str(out), "--max_steps", "4", "--save_steps", "2",
          "--per_device_train_batch_size", "4", "--disable_tqdm", "true"])
    assert read_json(out / "train_results.json")["train_samples"] == 320  # all of them (the demo keeps 8000)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    resolved = yaml.safe_load((out / "hftune_config.yaml").read_text())
    assert resolved["task"] == "text-classification" and resolved["text_column"] == "text"
    printed = caplog.text
    assert "config: TrainingArguments' defaults + the command line" in printed
    assert "task text-classification, inferred from the checkpoint's architecture" in printed


@pytest.mark.parametrize("argv, error", [
    (["--save_steps", "10"], "save_steps has no effect with save_strategy 'no'; set save_strategy: steps"),
    (["--eval_steps", "10"], "eval_steps has no effect with eval_strategy 'no'; set eval_strategy: steps"),
    (["--logging_strategy", "epoch", "--logging_steps", "3"], "logging_steps has no effect with logging_strategy"),
    (["--save_strategy", "no", "--save_total_limit", "2"], "save_total_limit has no effect with save_strategy 'no'"),
    (["--eval_delay", "2"], "eval_delay has no effect with eval_strategy 'no'"),
])
def test_a_field_without_effect_is_refused(argv, error):
    with pytest.raises(HftuneError, match=error):
        parse(*argv)


# ---- task inference ----

def test_task_is_inferred_from_checkpoint_and_data(tiny_bert, tiny_gpt, tiny_resnet, corpus_txt, tweets_csv,
                                                   digit_folders):
    train, _ = tweets_csv
    cases = [
        ((tiny_bert, str(train)), "text-classification"),
        ((tiny_gpt, str(corpus_txt)), "causal-lm"),
        ((tiny_gpt, str(train)), "causal-lm"),  # the checkpoint alone decides
        ((tiny_bert, str(corpus_txt)), "masked-lm"),  # an encoder and a raw corpus: run_mlm.py's case
        ((tiny_resnet, str(digit_folders[0])), "image-classification"),
    ]
    for (model, data), task in cases:
        _, data_args, args = parse("--model_name_or_path", model, "--train_file", data)
        assert data_args.task == task and f"task {task}, inferred from" in args.config_base
    _, data_args, _ = parse("--model_name_or_path", tiny_gpt, "--train_file", str(train), "--task",
                            "text-classification")
    assert data_args.task == "text-classification"  # an explicit task wins


def test_task_inference_refuses_disagreement(tiny_bert, tiny_gpt, corpus_txt, digit_folders):
    with pytest.raises(HftuneError, match=r"BertForMaskedLM suggests text-classification while train_file .* "
                                          r"\(a folder\) suggests image-classification; set task"):
        parse("--model_name_or_path", tiny_bert, "--train_file", str(digit_folders[0]))
    with pytest.raises(HftuneError, match="suggests causal-lm while .* suggests image-classification; set task"):
        parse("--model_name_or_path", tiny_gpt, "--train_file", str(digit_folders[0]))


# ---- the example scripts' names ----

def test_example_script_names_are_aliases(tiny_bert, tweets_csv):
    train, validation = tweets_csv
    _, data, _ = parse("--model_name_or_path", tiny_bert, "--train_dir", str(train), "--train_val_split", "0.2",
                       "--label_column_name", "sentiment", "--text_column_names", "text")
    assert (data.train_file, data.validation_split_percentage, data.label_column, data.text_column) == \
        (str(train), pytest.approx(20.0), "sentiment", "text")
    with pytest.raises(HftuneError, match="label_column_name and label_column both set label_column"):
        parse("--label_column", "a", "--label_column_name", "b")
    with pytest.raises(HftuneError, match="overwrite_cache is an HF example-script option hftune does not support"):
        parse("--overwrite_cache")


def test_recipe_keys_take_the_script_names_too(tiny_bert, tweets_csv, tmp_path):
    train, _ = tweets_csv
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model_name_or_path": tiny_bert, "train_file": str(train),
                                      "label_column_name": "sentiment", "train_val_split": 0.1}))
    _, data, _ = parse("--config", str(recipe))
    assert data.label_column == "sentiment" and data.validation_split_percentage == pytest.approx(10.0)


# ---- column detection ----

def test_glue_pairs_labels_and_text_columns_are_detected(pairs_csv, tweets_csv, tmp_path):
    from hftune.config import DataArguments

    data = DataArguments(task="text-classification", train_file=str(pairs_csv[0]))
    raw = load_raw_datasets(data)
    assert (data.text_column, data.text_pair_column, data.label_column) == ("sentence1", "sentence2", "label")
    assert set(raw["train"].column_names) >= {"sentence1", "sentence2", "label"}

    data = DataArguments(task="text-classification", train_file=str(tweets_csv[0]), label_column="sentiment")
    load_raw_datasets(data)
    assert (data.text_column, data.text_pair_column) == ("text", None)

    data = DataArguments(task="text-classification", train_file=str(pairs_csv[0]), text_column="sentence1")
    load_raw_datasets(data)
    assert data.text_pair_column is None  # an explicit text column: no pair guessed around it

    two = tmp_path / "two.csv"
    pd.DataFrame({"title": ["a b", "c"], "body": ["d", "e f"], "label": [0, 1]}).to_csv(two, index=False)
    with pytest.raises(HftuneError, match=r"several text columns \['title', 'body'\].*'title,body' to join"):
        load_raw_datasets(DataArguments(task="text-classification", train_file=str(two)))
    data = DataArguments(task="text-classification", train_file=str(two), text_column="title,body",
                         validation_split_percentage=0)
    raw = load_raw_datasets(data)
    assert raw["train"]["title,body"] == ["a b d", "c e f"]

    nolabel = tmp_path / "nolabel.csv"
    pd.DataFrame({"text": ["a", "b"], "y": [0, 1]}).to_csv(nolabel, index=False)
    with pytest.raises(HftuneError, match=r"no label column \(label or labels\).*set label_column"):
        load_raw_datasets(DataArguments(task="text-classification", train_file=str(nolabel)))


def test_run_glue_mrpc_command_runs_as_written(tiny_bert, pairs_csv, tmp_path):
    """run_glue.py's test command shape, with hftune/run.py in place of the script."""
    from hftune.run import main

    out = tmp_path / "mrpc-run"
    main(["--model_name_or_path", tiny_bert, "--train_file", str(pairs_csv[0]), "--validation_file",
          str(pairs_csv[1]), "--do_train", "--do_eval", "--per_device_train_batch_size", "8", "--learning_rate",
          "5e-4", "--max_steps", "6", "--output_dir", str(out), "--max_seq_length", "64", "--disable_tqdm", "true"])
    results = read_json(out / "all_results.json")
    assert 0 <= results["eval_accuracy"] <= 1 and results["eval_samples"] == 12
    resolved = yaml.safe_load((out / "hftune_config.yaml").read_text())
    assert (resolved["text_column"], resolved["text_pair_column"]) == ("sentence1", "sentence2")


def test_run_image_classification_command_runs_as_written(tiny_resnet, digit_folders, tmp_path):
    """run_image_classification.py's test command shape (an image folder, --train_val_split,
    --label_column_name, the Trainer flags it passes), with hftune/run.py in place of the script."""
    from hftune.run import main

    out = tmp_path / "image-run"
    main(["--model_name_or_path", tiny_resnet, "--train_dir", str(digit_folders[0]), "--do_train", "--do_eval",
          "--learning_rate", "1e-3", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "4",
          "--remove_unused_columns", "False", "--dataloader_num_workers", "0", "--metric_for_best_model", "accuracy",
          "--max_steps", "4", "--train_val_split", "0.2", "--seed", "42", "--label_column_name", "label",
          "--image_column_name", "image", "--output_dir", str(out), "--disable_tqdm", "true"])
    results = read_json(out / "all_results.json")
    assert results["eval_samples"] == 30 and results["train_samples"] == 120  # 150 images, 20% held out
    assert 0 <= results["eval_accuracy"] <= 1
    resolved = yaml.safe_load((out / "hftune_config.yaml").read_text())
    assert (resolved["task"], resolved["validation_split_percentage"], resolved["label_column"]) == \
        ("image-classification", 20, "label")


def test_run_clm_from_scratch_with_block_size_runs_as_written(tiny_gpt, corpus_txt, tmp_path):
    """run_clm.py's command for a model trained from scratch: model_type + config_overrides + tokenizer_name,
    a .txt corpus, block_size; the task is inferred, perplexity reported as run_clm.py does."""
    from transformers import AutoModelForCausalLM

    from hftune.run import main

    out = tmp_path / "clm"
    main(["--model_type", "gpt2", "--tokenizer_name", tiny_gpt, "--config_overrides",
          "n_embd=32,n_layer=2,n_head=2,n_positions=64", "--train_file", str(corpus_txt), "--block_size", "32",
          "--do_train", "--do_eval", "--per_device_train_batch_size", "4", "--max_steps", "8", "--output_dir",
          str(out), "--disable_tqdm", "true", "--validation_split_percentage", "10"])
    results = read_json(out / "eval_results.json")
    assert results["perplexity"] == pytest.approx(results["eval_perplexity"]) and results["perplexity"] > 1
    model = AutoModelForCausalLM.from_pretrained(out)
    assert (model.config.n_embd, model.config.n_layer) == (32, 2)
    assert yaml.safe_load((out / "hftune_config.yaml").read_text())["task"] == "causal-lm"


def test_run_mlm_command_runs_as_written(tiny_bert, corpus_txt, tmp_path):
    """run_mlm.py's test command (the task inferred from an encoder and a .txt corpus) with its data
    flags: line_by_line, mlm_probability, max_seq_length, pad_to_max_length, max_train_samples."""
    from transformers import AutoModelForMaskedLM

    from hftune.run import main

    out = tmp_path / "mlm"
    main(["--model_name_or_path", tiny_bert, "--train_file", str(corpus_txt), "--validation_file", str(corpus_txt),
          "--output_dir", str(out), "--do_train", "--do_eval", "--prediction_loss_only", "--num_train_epochs=1",
          "--line_by_line", "--pad_to_max_length", "--mlm_probability", "0.2", "--max_seq_length", "32",
          "--max_train_samples", "40", "--max_eval_samples", "20", "--per_device_train_batch_size", "8",
          "--preprocessing_num_workers", "1", "--seed", "42", "--disable_tqdm", "true"])
    results = read_json(out / "eval_results.json")
    assert results["perplexity"] == pytest.approx(results["eval_perplexity"]) and results["eval_samples"] == 20
    assert read_json(out / "train_results.json")["train_samples"] == 40
    resolved = yaml.safe_load((out / "hftune_config.yaml").read_text())
    assert (resolved["task"], resolved["line_by_line"], resolved["mlm_probability"]) == ("masked-lm", True, 0.2)
    assert AutoModelForMaskedLM.from_pretrained(out).config.model_type == "bert"


@pytest.mark.parametrize("argv, error", [
    (["--model_type", "gpt2"], "model_type gpt2 starts without a tokenizer; set tokenizer_name"),
    (["--model_type", "gtp2", "--tokenizer_name", "x"], "unknown model_type 'gtp2'"),
    (["--model_name_or_path", "x", "--model_type", "gpt2", "--tokenizer_name", "x"], "keep one"),
    (["--config_overrides", "n_embd=4"], "config_overrides changes the config of a model trained from scratch"),
    (["--model_type", "gpt2", "--tokenizer_name", "x", "--peft", "lora", "--task", "causal-lm"],
     "peft lora adapts a pretrained checkpoint"),
])
def test_training_from_scratch_refusals(capsys, argv, error):
    assert error in fail(capsys, argv + ["--output_dir", "/tmp/hftune-unused"])



def test_pad_to_max_length_keep_linebreaks_and_shuffle_train_dataset(tiny_bert, corpus_txt, tweets_csv):
    from transformers import AutoTokenizer

    from hftune.config import DataArguments
    from hftune.tasks.text_classification import collator

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    rows = [tokenizer("short"), tokenizer("a somewhat longer text than that")]
    for pad, width in ((False, len(rows[1]["input_ids"])), (True, 48)):
        data = DataArguments(task="text-classification", max_seq_length=48, pad_to_max_length=pad)
        assert collator(tokenizer, data)(rows)["input_ids"].shape == (2, width)

    for keep in (True, False):
        raw = load_raw_datasets(DataArguments(task="causal-lm", train_file=str(corpus_txt), keep_linebreaks=keep,
                                              validation_split_percentage=0))
        assert raw["train"][0]["text"].endswith("\n") == keep

    train = str(tweets_csv[0])
    plain = load_raw_datasets(DataArguments(train_file=train, label_column="sentiment", validation_split_percentage=0))
    mixed = load_raw_datasets(DataArguments(train_file=train, label_column="sentiment", validation_split_percentage=0,
                                            shuffle_train_dataset=True))
    assert plain["train"]["text"] != mixed["train"]["text"]
    assert sorted(plain["train"]["text"]) == sorted(mixed["train"]["text"])


def test_metric_name_is_refused_with_what_to_use():
    with pytest.raises(HftuneError, match="metric_name is an HF example-script option .* metric_for_best_model"):
        parse("--metric_name", "accuracy")
