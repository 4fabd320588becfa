"""Shared fixtures: tiny real-format checkpoints and small slices of the real tweet corpus."""

import os

# Before any HF import: the tests never reach for the Hub (this machine has none).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json

import pandas as pd
import pytest

from hftune.assets import get_asset, resolve_model


@pytest.fixture(scope="session")
def tweets():
    """The real tweet-sentiment corpus as a DataFrame (sentiment, confidence, text)."""
    path = get_asset("asset:tweet-sentiment", "dataset").locate()
    frame = pd.read_csv(path, encoding_errors="replace").dropna(subset=["text"])
    # Some tweets hold bare carriage returns, which pandas' to_csv does not quote.
    frame["text"] = frame["text"].str.replace(r"\s+", " ", regex=True)
    return frame


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    """A 2-layer BERT (dropout off) with the real MiniLM tokenizer, saved so the from_pretrained path runs."""
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    path = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("asset:all-MiniLM-L6-v2"))
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,  # deterministic: runs can be compared
    )
    BertForMaskedLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture
def tweets_csv(tmp_path, tweets):
    """train.csv / validation.csv with 3 string labels drawn from the real corpus."""
    sample = tweets.sample(n=400, random_state=0)[["text", "sentiment"]]
    sample.iloc[:320].to_csv(tmp_path / "train.csv", index=False)
    sample.iloc[320:].to_csv(tmp_path / "validation.csv", index=False)
    return tmp_path / "train.csv", tmp_path / "validation.csv"


def read_json(path):
    return json.loads(open(path).read())


def logged_losses(output_dir):
    """Training losses in log order from trainer_state.json."""
    state = read_json(os.path.join(output_dir, "trainer_state.json"))
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]
