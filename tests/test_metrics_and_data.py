"""Offline metric modules against scikit-learn, the evaluate fallback, and data loading/caching."""

import evaluate
import numpy as np
import pytest
from datasets import ClassLabel, Dataset, DatasetDict
from huggingface_hub import constants
from sklearn.metrics import accuracy_score, f1_score

from hftune import metrics
from hftune.config import DataArguments, ModelArguments
from hftune.classes import class_names
from hftune.data import load_raw_datasets
from hftune.errors import HftuneError
from hftune.metrics import load_metric, local_metric_path
from hftune.tasks import text_classification

rng = np.random.default_rng(0)
PREDICTIONS, REFERENCES = rng.integers(0, 4, 300), rng.integers(0, 4, 300)


def test_local_accuracy_matches_sklearn():
    accuracy = evaluate.load(local_metric_path("accuracy"))
    result = accuracy.compute(predictions=PREDICTIONS, references=REFERENCES)["accuracy"]
    assert result == pytest.approx(accuracy_score(REFERENCES, PREDICTIONS))


@pytest.mark.parametrize("average", ["macro", "micro", "weighted"])
def test_local_f1_matches_sklearn(average):
    f1 = evaluate.load(local_metric_path("f1"))
    result = f1.compute(predictions=PREDICTIONS, references=REFERENCES, average=average)["f1"]
    assert result == pytest.approx(f1_score(REFERENCES, PREDICTIONS, average=average))


def test_local_binary_f1_matches_sklearn():
    predictions, references = PREDICTIONS % 2, REFERENCES % 2
    result = evaluate.load(local_metric_path("f1")).compute(predictions=predictions, references=references)
    assert result["f1"] == pytest.approx(f1_score(references, predictions))


def test_hub_failure_falls_back_to_local_module(monkeypatch):
    """With the Hub allowed but unreachable, load_metric still gives a working accuracy module."""
    real_load = evaluate.load
    attempted = []

    def no_network(path, *args, **kwargs):
        if not path.endswith(".py"):
            attempted.append(path)
            raise ConnectionError("no network")
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(metrics.evaluate, "load", no_network)
    load_metric.cache_clear()
    try:
        result = load_metric("accuracy").compute(predictions=[1, 1, 0], references=[1, 0, 0])
    finally:
        load_metric.cache_clear()
    assert attempted == ["accuracy"] and result["accuracy"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("suffix", ["csv", "jsonl", "parquet"])
def test_local_formats_and_carved_validation(tmp_path, tweets, suffix):
    frame = tweets.sample(n=200, random_state=0)[["text", "sentiment"]]
    path = tmp_path / f"train.{suffix}"
    {"csv": lambda: frame.to_csv(path, index=False),
     "jsonl": lambda: frame.to_json(path, orient="records", lines=True),
     "parquet": lambda: frame.to_parquet(path)}[suffix]()
    raw = load_raw_datasets(DataArguments(train_file=str(path), validation_split_percentage=10), seed=1)
    assert (len(raw["train"]), len(raw["validation"])) == (180, 20)
    carved = set(raw["train"]["text"]) | set(raw["validation"]["text"])
    assert carved == set(frame.text) and not set(raw["train"]["text"]) & set(raw["validation"]["text"]) - {None}


def test_text_file_is_read_line_by_line(tmp_path):
    (tmp_path / "corpus.txt").write_text("first line\nsecond line\nthird line\n")
    raw = load_raw_datasets(DataArguments(train_file=str(tmp_path / "corpus.txt"), validation_split_percentage=0))
    assert raw["train"]["text"] == ["first line", "second line", "third line"]


def test_preprocessing_is_cached_and_reused(tiny_bert, tweets_csv):
    """A second run maps nothing: it opens the same cache files (what other ranks do after rank 0)."""
    train, validation = tweets_csv
    data_args = DataArguments(train_file=str(train), validation_file=str(validation), label_column="sentiment")
    model_args = ModelArguments(model_name_or_path=tiny_bert)
    first = text_classification.build(model_args, data_args, load_raw_datasets(data_args))
    second = text_classification.build(model_args, data_args, load_raw_datasets(data_args))
    files = [f["filename"] for f in first.train_dataset.cache_files]
    assert files and files == [f["filename"] for f in second.train_dataset.cache_files]
    assert first.train_dataset[0] == second.train_dataset[0]


def test_integer_and_classlabel_labels_map_to_the_same_ids():
    raw = DatasetDict({"train": Dataset.from_dict({"text": ["a", "b", "c", "d"], "label": [2, 0, 1, 2]})})
    assert class_names(raw, "label") == ["0", "1", "2"]
    raw["train"] = raw["train"].class_encode_column("label")
    assert class_names(raw, "label") == ["0", "1", "2"]


def test_unlabelled_classlabel_rows_are_refused():
    """GLUE-style test splits mark missing labels with -1: never silently map them to a class."""
    feature = ClassLabel(names=["neg", "pos"])
    raw = DatasetDict({
        "train": Dataset.from_dict({"label": [0, 1]}).cast_column("label", feature),
        "validation": Dataset.from_dict({"label": [1, -1]}).cast_column("label", feature),
    })
    with pytest.raises(HftuneError, match="validation split has unlabelled rows"):
        class_names(raw, "label")
