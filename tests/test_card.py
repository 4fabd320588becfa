"""The model card and training curves of a real tiny run: what the card says is what the run did."""

import re

import numpy as np
import pytest
from huggingface_hub import ModelCard, metadata_load
from PIL import Image
from transformers import AutoTokenizer

from conftest import read_json, strategy_args, write_tweet_split
from hftune.results.card import base_model_facts
from hftune.config import ModelArguments
from hftune.run import main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FAKE_TOKEN = "hf_cardtestSECRETtoken0123456789"
CARD_RUN = dict(optim="sgd", optim_args="momentum=0.9", learning_rate=0.004, weight_decay=0.01, max_steps=8,
                logging_steps=2, eval_strategy="steps", eval_steps=2, do_eval="true")


@pytest.fixture(scope="module")
def data(tweets, tmp_path_factory):
    return write_tweet_split(tweets, tmp_path_factory.mktemp("card-data"), rows=240, train_rows=160)


@pytest.fixture(scope="module")
def trained(tiny_bert, data, tmp_path_factory):
    """One 8-step run, evaluated and logged every 2 steps: its output_dir and its eval results."""
    out = tmp_path_factory.mktemp("card") / "tweets-bert"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("HF_TOKEN", FAKE_TOKEN)  # a token the run can see must not reach the card
        main(strategy_args(tiny_bert, out, *data, **CARD_RUN))
    return out, read_json(out / "eval_results.json")


def eval_numbers(results):
    return {k: v for k, v in results.items() if k not in ("eval_runtime", "eval_samples_per_second",
                                                           "eval_steps_per_second", "eval_samples", "epoch")}


def test_card_metadata_carries_this_runs_metrics(trained):
    out, results = trained
    card = ModelCard.load(out / "README.md")  # parses model-index: raises on a malformed entry
    data = card.data
    assert data.pipeline_tag == "text-classification" and data.library_name == "transformers"
    assert "hftune" in data.tags and data.base_model is None  # a local folder is no Hub id
    parsed = {r.metric_type: r.metric_value for r in data.eval_results}
    expected = {k.removeprefix("eval_"): v for k, v in eval_numbers(results).items()}
    assert parsed == expected and {"accuracy", "loss"} <= set(parsed)
    assert {(r.task_type, r.dataset_split, r.dataset_type) for r in data.eval_results} == {
        ("text-classification", "validation", "csv")}
    raw = metadata_load(out / "README.md")
    assert raw["model-index"][0]["name"] == "tweets-bert"


def test_card_text_shows_metrics_strategy_and_setup(trained):
    out, results = trained
    text = (out / "README.md").read_text()
    for key, value in eval_numbers(results).items():  # the results table holds this run's numbers
        assert f"| validation | {key.removeprefix('eval_')} | {value:.4f} |" in text
    assert "optimizer: `sgd` (torch.optim.sgd.SGD): lr=0.004, momentum=0.9" in text
    assert "learning rate 0.004, schedule `linear`, no warmup" in text
    assert "16 per device x 1 gradient accumulation x 1 data-parallel process = 16 examples" in text
    assert "max_steps 8; trained 8 optimizer steps" in text and "weight_decay 0.01" in text
    assert "engine: `trainer`" in text and "distribution: none (one process)" in text
    assert "precision: fp32" in text and "`train.csv`, `validation.csv`" in text
    assert re.search(r"- transformers \d+\.\d+", text) and re.search(r"- torch \d", text)
    assert FAKE_TOKEN not in text


def test_card_links_resolve_to_files(trained):
    out, _ = trained
    links = re.findall(r"\]\(([^)]+)\)", (out / "README.md").read_text())
    local = [link for link in links if not link.startswith("http")]
    assert {"loss.png", "learning_rate.png", "grad_norm.png", "hftune_config.yaml"} <= set(local)
    for link in local:
        assert (out / link).is_file(), link


def test_curves_are_real_pngs(trained):
    out, _ = trained
    for name in ("loss.png", "learning_rate.png", "grad_norm.png"):
        assert (out / name).read_bytes()[:8] == PNG_SIGNATURE
        with Image.open(out / name) as image:
            image.verify()
        with Image.open(out / name) as image:
            assert image.size == (640, 400)
            pixels = np.asarray(image.convert("L"), dtype=float)
        assert pixels.std() > 5, name  # axes and curves drawn, not a blank canvas
    # the loss figure holds two curves: train (blue) and eval (orange) are both drawn
    rgb = np.asarray(Image.open(out / "loss.png").convert("RGB")).astype(int)
    orange = (rgb[..., 0] > 200) & (rgb[..., 1] > 100) & (rgb[..., 1] < 160) & (rgb[..., 2] < 60)
    blue = (rgb[..., 2] > 150) & (rgb[..., 0] < 60)
    assert orange.sum() > 50 and blue.sum() > 50


def test_card_snippet_loads_the_model(trained):
    out, _ = trained
    code = re.search(r"```python\n(.*?)```", (out / "README.md").read_text(), re.S).group(1)
    assert str(out) in code
    scope = {}
    exec(code, scope)
    prediction = scope["pipe"]("what a lovely day")[0]
    assert prediction["label"] in {"negative", "neutral", "positive"}


def test_evaluation_only_run_keeps_the_card(trained, data):
    out, _ = trained
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.suffix in (".md", ".png")}
    main(strategy_args(str(out), out, *data, do_train="false", do_eval="true", overwrite_output_dir="true"))
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.suffix in (".md", ".png")}
    assert after == before


@pytest.mark.slow
def test_accelerate_engine_peft_card_and_adapter_snippet(tiny_bert, data, tmp_path):
    out = tmp_path / "acc"
    main(strategy_args(tiny_bert, out, *data, engine="accelerate", peft="lora", max_steps=4, logging_steps=2,
                       do_eval="true"))
    card = ModelCard.load(out / "README.md")
    results = read_json(out / "eval_results.json")
    assert {r.metric_type: r.metric_value for r in card.data.eval_results}["accuracy"] == results["eval_accuracy"]
    assert card.data.library_name == "peft" and "lora" in card.data.tags
    assert "engine: `accelerate`" in card.text and "PEFT LoRA (r=16" in card.text and (out / "loss.png").is_file()
    scope = {}
    exec(re.search(r"```python\n(.*?)```", card.text, re.S).group(1), scope)  # the adapter loads as the card says
    tokenizer = AutoTokenizer.from_pretrained(out)
    logits = scope["model"](**tokenizer(["what a lovely day"], return_tensors="pt")).logits
    assert logits.shape == (1, 3) and scope["model"].config.id2label[2] == "positive"


def test_base_model_metadata_only_for_hub_ids():
    assert base_model_facts(ModelArguments(model_name_or_path="google-bert/bert-base-uncased"))[1] == \
        "google-bert/bert-base-uncased"
    text, hub_id = base_model_facts(ModelArguments(model_name_or_path="asset:all-MiniLM-L6-v2"))
    assert hub_id is None and "22M-parameter BERT-style encoder" in text
