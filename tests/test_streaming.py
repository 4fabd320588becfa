"""`streaming: true`: the train split is read lazily as a datasets IterableDataset, preprocessed
batch by batch, shuffled through a seeded buffer, and split across processes so that each one
reads its own rows; validation stays map-style. Also: map-style data under a 2-process launch."""

import hashlib

import pandas as pd
import pytest
import torch
from accelerate.data_loader import prepare_data_loader
from datasets import load_dataset
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from conftest import RANK_PROBE, cli_flags, fail, launch, logged_losses, read_json, tiny_model
from hftune.config import DataArguments, HftuneTrainingArguments, ModelArguments, parse_config
from hftune.data import is_stream, load_raw_datasets, shuffle_stream
from hftune.run import main, setup
from hftune.tasks import causal_lm, image_classification, text_classification
from test_causal_lm import tweet_jsonl, tweet_texts  # noqa: F401 (fixtures)


def row_fingerprint(example):
    """tests/rank_probe.py's fingerprint of a row (importing the probe would patch hftune.run)."""
    return hashlib.sha1(torch.as_tensor(example["input_ids"]).numpy().tobytes()).hexdigest()[:16]


def run_args(model, out, train, validation=None, **extra):
    settings = dict(model_name_or_path=model, output_dir=out, train_file=train, validation_file=validation,
                    label_column="sentiment", report_to="none", disable_tqdm="true", max_seq_length=32,
                    per_device_train_batch_size=16, learning_rate=3e-3, warmup_steps=0, logging_steps=1,
                    save_strategy="no", streaming="true", max_steps=24, seed=7, train_sampling_strategy="random")
    return cli_flags(settings, extra)


def fingerprints(model, csv, max_length=32):
    """The probe's fingerprint of every row of a CSV, in file order, tokenized as the task does."""
    tokenizer = AutoTokenizer.from_pretrained(model)
    return [row_fingerprint(tokenizer(text, truncation=True, max_length=max_length))
            for text in pd.read_csv(csv)["text"]]


@pytest.fixture
def small_train(tweets_csv, tmp_path):
    """The first 64 training tweets: 24 steps of 16 read the stream six times over."""
    path = tmp_path / "small_train.csv"
    pd.read_csv(tweets_csv[0]).iloc[:64].to_csv(path, index=False)
    return path


# ---- one process ----

@pytest.mark.slow
def test_streamed_csv_trains_and_evaluates(small_train, tweets_csv, tmp_path):
    # a seeded tiny BERT: the session's (whatever the RNG held) learned these rows too slowly for some inits
    model = tiny_model(tmp_path / "tiny-bert", "bert", seed=0)
    out = tmp_path / "out"
    main(run_args(model, out, small_train, tweets_csv[1], learning_rate=1e-2))

    losses = logged_losses(out)
    assert len(losses) == 24  # max_steps, over six passes through the 64-row stream
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.2, losses  # it learned the rows it re-read (~0.5 here)
    results = read_json(out / "all_results.json")
    assert results["eval_samples"] == 80 and "train_samples" not in results  # a stream has no length
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.label2id == {"negative": 0, "neutral": 1, "positive": 2}  # read from validation


def test_stream_rows_and_labels_follow_the_file(tiny_bert, tweets_csv):
    """Lazily tokenized rows arrive in file order with their labels mapped to the model's ids;
    max_train_samples takes the first rows of the stream; validation is map-style."""
    train, validation = tweets_csv
    data_args = DataArguments(train_file=str(train), validation_file=str(validation), label_column="sentiment",
                              max_seq_length=32, streaming=True, max_train_samples=50)
    raw = load_raw_datasets(data_args)
    assert is_stream(raw["train"]) and not is_stream(raw["validation"])
    bundle = text_classification.build(ModelArguments(model_name_or_path=tiny_bert), data_args, raw)

    rows = list(bundle.train_dataset)
    frame = pd.read_csv(train).iloc[:50]
    label2id = bundle.model.config.label2id
    assert [row["labels"] for row in rows] == [label2id[s] for s in frame["sentiment"]]
    assert [row_fingerprint(row) for row in rows] == fingerprints(tiny_bert, train)[:50]
    assert len(bundle.eval_dataset) == 80 and set(bundle.eval_dataset["labels"]) == {0, 1, 2}


def test_shuffled_stream_gives_each_process_distinct_rows(tmp_path):
    """What a launch does to the stream, for both of accelerate's ways of splitting it (with
    dispatch_batches false): its own files to each process when there are enough (a Hub data set
    in shards), else its own slice of every global batch. The seeded shuffle is the same on every
    process, so the rows stay distinct and together cover the data."""
    for i in range(2):
        pd.DataFrame({"n": range(i * 48, i * 48 + 48)}).to_csv(tmp_path / f"part{i}.csv", index=False)
    args = HftuneTrainingArguments(output_dir=str(tmp_path), train_sampling_strategy="random", seed=3)
    for files in ([tmp_path / "part0.csv"], [tmp_path / "part0.csv", tmp_path / "part1.csv"]):
        stream = shuffle_stream(load_dataset("csv", data_files=[str(f) for f in files], split="train",
                                             streaming=True), args)
        seen = []
        for rank in range(2):
            loader = prepare_data_loader(torch.utils.data.DataLoader(stream, batch_size=4), num_processes=2,
                                         process_index=rank, put_on_device=False, dispatch_batches=False)
            seen.append([n for batch in loader for n in batch["n"].tolist()])
        total = 48 * len(files)  # whole global batches: accelerate pads a last partial one with early rows
        assert not set(seen[0]) & set(seen[1]), files
        assert set(seen[0]) | set(seen[1]) == set(range(total)), files
        assert seen[0] != sorted(seen[0])  # shuffled: unshuffled, each process's rows would ascend


# ---- what a stream cannot do: refused with one line ----

def test_streaming_needs_max_steps(capsys, tiny_bert, tweets_csv, tmp_path):
    line = fail(capsys, run_args(tiny_bert, tmp_path / "out", *tweets_csv, max_steps=None))
    assert "streaming: true needs max_steps > 0" in line


def test_streaming_cannot_carve_validation(capsys, tiny_bert, tweets_csv, tmp_path):
    line = fail(capsys, run_args(tiny_bert, tmp_path / "out", tweets_csv[0]))  # default percentage: 5
    assert "cannot carve a validation split out of a stream" in line and "validation_file" in line


def test_streaming_needs_the_classes_up_front(capsys, tiny_bert, tweets_csv, tmp_path):
    line = fail(capsys, run_args(tiny_bert, tmp_path / "out", tweets_csv[0], validation_split_percentage=0))
    assert "cannot read the whole train stream to learn the classes of label_column 'sentiment'" in line


def test_stream_label_outside_the_classes_stops_training(capsys, tiny_bert, tmp_path):
    pd.DataFrame({"text": ["good", "bad", "meh"] * 4, "sentiment": ["pos", "neg", "mid"] * 4}).to_csv(
        tmp_path / "t.csv", index=False)
    pd.DataFrame({"text": ["fine", "awful"], "sentiment": ["pos", "neg"]}).to_csv(tmp_path / "v.csv", index=False)
    line = fail(capsys, run_args(tiny_bert, tmp_path / "out", tmp_path / "t.csv", tmp_path / "v.csv", max_steps=2))
    assert "the train split has label 'mid', not one of the classes ['neg', 'pos']" in line


def test_streaming_needs_the_trainer_engine(capsys, tiny_bert, tweets_csv, tmp_path):
    line = fail(capsys, run_args(tiny_bert, tmp_path / "out", *tweets_csv, engine="accelerate"))
    assert "streaming: true needs engine: trainer" in line


# ---- two processes ----

def one_process_rows(args):
    """The rows one process collates for these args: hftune run in-process, recording as the probe does."""
    model_args, data_args, training_args = parse_config(args)
    engine, _, _ = setup(model_args, data_args, training_args)
    rows, collate = [], engine.data_collator

    def collate_and_record(examples):
        rows.extend(row_fingerprint(example) for example in examples)
        return collate(examples)

    engine.data_collator = collate_and_record
    engine.train()
    return rows


@pytest.mark.parametrize("streaming", [False, True], ids=["map-style", "streaming"])
@pytest.mark.slow
def test_two_processes_read_distinct_rows(streaming, tiny_bert, tweets_csv, tmp_path):
    """Each rank collates its own rows, and together they are the rows one process reads with the
    same global batch and steps (random sampling; for a stream, the same seeded shuffle)."""
    train, validation = tweets_csv
    common = run_args(tiny_bert, None, train, validation, streaming=str(streaming).lower(), max_steps=4,
                      do_eval="false", eval_strategy="no", validation_split_percentage=0, learning_rate=1e-3)
    probes = launch("ddp.yaml", 2, common + [f"--output_dir={tmp_path / 'two'}", "--per_device_train_batch_size=8"],
                    script=RANK_PROBE, probe_dir=tmp_path / "probe").probes
    two = [probes[rank] for rank in range(2)]
    one = one_process_rows(common + [f"--output_dir={tmp_path / 'one'}"])  # per_device_train_batch_size 16

    assert [record["world_size"] for record in two] == [2, 2]
    rank0, rank1 = (set(record["rows"]) for record in two)
    assert len(rank0) == len(two[0]["rows"]) and len(rank1) == len(two[1]["rows"])  # no row twice on a rank
    assert not rank0 & rank1
    assert len(rank0) >= 4 * 8 and len(rank1) >= 4 * 8  # at least max_steps batches each
    assert rank0 | rank1 == set(one)
    file_order = fingerprints(tiny_bert, train)
    assert rank0 | rank1 <= set(file_order)
    assert rank0 | rank1 != set(file_order[: len(rank0 | rank1)])  # sampled at random, not the file's head


# ---- the other task families stream the same examples they would load ----

@pytest.mark.parametrize("concatenate", [True, False], ids=["packed", "per-example"])
def test_streamed_causal_lm_examples_match_map_style(concatenate, tiny_llama, tweet_jsonl):
    """Under 1,000 texts, a stream packs exactly the blocks of the map-style split."""
    def train_rows(streaming):
        data_args = DataArguments(task="causal-lm", train_file=str(tweet_jsonl[0]), validation_file=str(tweet_jsonl[1]),
                                  concatenate_texts=concatenate, max_seq_length=48, streaming=streaming)
        bundle = causal_lm.build(ModelArguments(model_name_or_path=tiny_llama), data_args, load_raw_datasets(data_args))
        return [(row["input_ids"], row["labels"]) for row in bundle.train_dataset], len(bundle.eval_dataset)

    (streamed, streamed_eval), (loaded, loaded_eval) = train_rows(True), train_rows(False)
    assert streamed == loaded and len(streamed) > 10
    assert streamed_eval == loaded_eval


def test_streamed_image_folder_matches_map_style(tiny_resnet, digit_folders):
    def bundle(streaming):
        data_args = DataArguments(task="image-classification", train_file=str(digit_folders[0]),
                                  validation_file=str(digit_folders[1]), streaming=streaming)
        return image_classification.build(ModelArguments(model_name_or_path=tiny_resnet), data_args,
                                          load_raw_datasets(data_args))

    streamed, loaded = bundle(True), bundle(False)
    assert streamed.model.config.label2id == loaded.model.config.label2id == {"one": 0, "two": 1, "zero": 2}
    rows = list(streamed.train_dataset)
    assert len(rows) == len(loaded.train_dataset) == 150
    for i in (0, 77, 149):
        assert rows[i]["labels"] == loaded.train_dataset[i]["labels"]
        assert torch.equal(torch.as_tensor(rows[i]["pixel_values"]), loaded.train_dataset[i]["pixel_values"])
