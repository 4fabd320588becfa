"""Shared fixtures: tiny real-format checkpoints and small slices of the real tweet corpus."""

import os

# Before any HF import: the tests never reach for the Hub (this machine has none).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

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


@pytest.fixture(scope="session")
def tiny_gpt(tmp_path_factory):
    """A 2-layer GPT-2 (its output head tied to the token embedding) with the real MiniLM tokenizer."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    path = tmp_path_factory.mktemp("tiny-gpt")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("asset:all-MiniLM-L6-v2"))
    tokenizer.eos_token = "[SEP]"
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=128,
                        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.cls_token_id)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def write_tweet_split(tweets, folder, rows=400, train_rows=320):
    """folder/train.csv and folder/validation.csv: `rows` tweets (text, sentiment), the first
    `train_rows` for training; returns both paths."""
    sample = tweets.sample(n=rows, random_state=0)[["text", "sentiment"]]
    sample.iloc[:train_rows].to_csv(folder / "train.csv", index=False)
    sample.iloc[train_rows:].to_csv(folder / "validation.csv", index=False)
    return folder / "train.csv", folder / "validation.csv"


@pytest.fixture
def tweets_csv(tmp_path, tweets):
    """train.csv / validation.csv with 3 string labels drawn from the real corpus."""
    return write_tweet_split(tweets, tmp_path)


CLASSES = {0: "zero", 1: "one", 2: "two"}  # digit classes used by the image tests
SIZE = 32  # the tiny image processor's input size


@pytest.fixture(scope="session")
def tiny_resnet(tmp_path_factory):
    """A 2-stage ResNet with a 5-class head (so the data's 3 classes force a new head), saved
    with its image processor so the real from_pretrained path runs."""
    import torch
    from transformers import ConvNextImageProcessorPil, ResNetConfig, ResNetForImageClassification

    path = tmp_path_factory.mktemp("tiny-resnet")
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=5)
    torch.manual_seed(0)
    ResNetForImageClassification(config).save_pretrained(path)
    ConvNextImageProcessorPil(size={"shortest_edge": SIZE}).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def digits():
    """Real grayscale scans of the digits 0-2 as (PIL image, class name) pairs, upscaled to 24 px."""
    from sklearn.datasets import load_digits

    data = load_digits()
    keep = np.isin(data.target, list(CLASSES))
    images = (data.images[keep] * (255 / 16)).astype(np.uint8)
    return [(Image.fromarray(a).resize((24, 24)), CLASSES[t]) for a, t in zip(images, data.target[keep])]


@pytest.fixture(scope="session")
def digit_folders(digits, tmp_path_factory):
    """train/<class>/*.png (150 images) and validation/<class>/*.png (60 images)."""
    root = tmp_path_factory.mktemp("digits")
    for i, (image, name) in enumerate(digits[:210]):
        split = "train" if i < 150 else "validation"
        (root / split / name).mkdir(parents=True, exist_ok=True)
        image.save(root / split / name / f"{i}.png")
    return root / "train", root / "validation"



def aborted_at_exit(result):
    """DeepSpeed on CPU sometimes aborts a process at interpreter exit, after the run finished and
    saved (ENVIRONMENT.md: about 1 in 20): such a launch is run again once."""
    output = result.stdout + result.stderr
    return result.returncode != 0 and "terminate called without an active exception" in output


def fail(capsys, argv):
    """Run hftune, expect exit 2, return the single error line."""
    from hftune.run import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("hftune: error:")]
    assert len(errors) == 1, errors
    return errors[0]


def read_json(path):
    return json.loads(open(path).read())


def logged_losses(output_dir):
    """Training losses in log order from trainer_state.json."""
    state = read_json(os.path.join(output_dir, "trainer_state.json"))
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


def cli_flags(defaults, overrides):
    """`--key=value` flags from defaults updated by overrides; an override of None drops the key."""
    settings = {**defaults, **overrides}
    return [f"--{key}={value}" for key, value in settings.items() if value is not None]


def strategy_args(model, out, train, validation, **overrides):
    """CLI args for a short, logged-every-step run on the tiny BERT; overrides win."""
    settings = dict(
        model_name_or_path=model, output_dir=out, train_file=train, validation_file=validation,
        label_column="sentiment", report_to="none", disable_tqdm="true", max_seq_length=48,
        per_device_train_batch_size=16, learning_rate=3e-3, max_steps=12, logging_steps=1,
        train_sampling_strategy="random", eval_strategy="no", save_strategy="no", do_eval="false",
    )
    if "warmup_ratio" not in overrides:
        settings["warmup_steps"] = 0
    return cli_flags(settings, overrides)


def run_engine(args, callbacks=()):
    """parse -> setup -> train as `hftune` does, with extra callbacks; returns (engine, log_history)."""
    from hftune.config import parse_config
    from hftune.run import setup, train

    model_args, data_args, training_args = parse_config(args)
    engine, bundle, checkpoint = setup(model_args, data_args, training_args)
    for callback in callbacks:
        engine.add_callback(callback)
    train(engine, bundle, training_args, checkpoint)
    return engine, engine.state.log_history


def step_logs(history, key):
    """[value of `key` at each logged training step]."""
    return [entry[key] for entry in history if "loss" in entry and key in entry]
