"""quantize: dynamic writes an int8 copy of the fine-tuned model beside it, smaller on disk, with
its eval metric before and after in the results; the copy reloads without unrestricted pickle."""

import os

import pytest
import torch
from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear
from transformers import AutoModelForSequenceClassification, AutoTokenizer, GPT2LMHeadModel

from conftest import fail, read_json, strategy_args
from hftune.compression.quantization import _conv1d_to_linear, load_quantized, quantize_dynamic_int8
from hftune.run import main


@pytest.mark.slow
def test_quantized_classifier_is_smaller_reports_its_metric_and_reloads(tiny_bert, tweets_csv, tmp_path):
    out = tmp_path / "out"
    main(strategy_args(tiny_bert, out, *tweets_csv, quantize="dynamic", do_eval="true", max_steps=20))
    results = read_json(out / "all_results.json")
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    # int8 instead of float32 weights saves 3 of every 4 bytes of each Linear weight, less about 1 KB of
    # packing per layer (measured 77% of 3 bytes/weight on this tiny model)
    saved = (results["quantize_before_size_mb"] - results["quantize_after_size_mb"]) * 2**20
    assert 0.6 * 3 * linear < saved < 3 * linear
    assert os.path.getsize(out / "quantized" / "quantized_model.pt") / 2**20 == results["quantize_after_size_mb"]
    # the float metric is the trained model's own (same data, same CPU)
    assert abs(results["quantize_before_eval_loss"] - results["eval_loss"]) < 1e-4
    assert abs(results["quantize_before_eval_accuracy"] - results["eval_accuracy"]) < 1e-6
    assert 0 <= results["quantize_after_eval_accuracy"] <= 1
    assert abs(results["quantize_after_eval_loss"] - results["eval_loss"]) < 0.05  # int8 stays close

    reloaded = load_quantized(out / "quantized")
    assert any(isinstance(m, DynamicInt8Linear) for m in reloaded.modules())
    tokenizer = AutoTokenizer.from_pretrained(out / "quantized")
    batch = tokenizer(["what a lovely day", "the flight was delayed again"], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = quantize_dynamic_int8(model)(**batch).logits
        float_logits = AutoModelForSequenceClassification.from_pretrained(out).eval()(**batch).logits
        got = reloaded(**batch).logits
    assert torch.equal(got, expected)  # the saved int8 state is what was quantized
    assert not torch.equal(got, float_logits) and torch.allclose(got, float_logits, atol=0.05)


def test_lora_run_is_quantized_with_its_adapter_merged(tiny_bert, tweets_csv, tmp_path):
    out = tmp_path / "out"
    main(strategy_args(tiny_bert, out, *tweets_csv, peft="lora", merge_adapter="true", quantize="dynamic",
                       do_eval="true"))
    results = read_json(out / "all_results.json")
    assert abs(results["quantize_before_eval_loss"] - results["eval_loss"]) < 1e-4
    merged = AutoModelForSequenceClassification.from_pretrained(out / "merged").eval()
    tokenizer = AutoTokenizer.from_pretrained(out / "quantized")
    batch = tokenizer(["what a lovely day", "the flight was delayed again"], return_tensors="pt", padding=True)
    with torch.no_grad():
        got = load_quantized(out / "quantized")(**batch).logits
        assert torch.allclose(got, quantize_dynamic_int8(merged)(**batch).logits, atol=1e-4)


@pytest.mark.slow
def test_gpt2_conv1d_layers_are_quantized_and_perplexity_is_reported(tiny_gpt, tweets_csv, tmp_path):
    model_dir = tiny_gpt
    model = GPT2LMHeadModel.from_pretrained(model_dir).eval()
    ids = torch.randint(0, 1000, (2, 12))
    with torch.no_grad():
        before = model(ids).logits
        assert torch.allclose(_conv1d_to_linear(model)(ids).logits, before, atol=1e-5)  # same function
    out = tmp_path / "out"
    main(["--task", "causal-lm", "--model_name_or_path", str(model_dir), "--train_file", str(tweets_csv[0]),
          "--validation_file", str(tweets_csv[1]), "--output_dir", str(out), "--max_steps", "4",
          "--max_seq_length", "32", "--per_device_train_batch_size", "8", "--report_to", "none",
          "--disable_tqdm", "true", "--save_strategy", "no", "--quantize", "dynamic"])
    results = read_json(out / "all_results.json")
    assert results["quantize_after_size_mb"] < results["quantize_before_size_mb"]
    # Trainer's eval loss is GPT-2's own (it used to count GPT-2's label tokens unshifted: (n-1)/n of it)
    assert abs(results["quantize_before_eval_loss"] - results["eval_loss"]) < 1e-4
    assert results["quantize_after_eval_perplexity"] > 1
    reloaded = load_quantized(out / "quantized")
    linear_names = [n for n, m in reloaded.named_modules() if isinstance(m, DynamicInt8Linear)]
    assert any("c_attn" in n for n in linear_names)  # GPT-2's Conv1D attention was quantized too


def test_bad_quantize_settings(tiny_bert, tweets_csv, tmp_path, capsys, monkeypatch):
    args = strategy_args(tiny_bert, tmp_path / "out", *tweets_csv)
    assert "unknown quantize 'static'" in fail(capsys, args + ["--quantize", "static"])
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", os.path.abspath("deepspeed_configs/zero3.json"))
    assert "quantize needs the whole trained model" in fail(capsys, args + ["--quantize", "dynamic"])
    assert not (tmp_path / "out").exists()
