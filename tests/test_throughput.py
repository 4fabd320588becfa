"""Throughput, MFU and peak memory in every run's results (hftune/results/throughput.py): the fields land in
all_results.json for a BERT-, a GPT- and a ResNet-style run, and each counted quantity matches an
independent count on the same data. No timings are asserted."""

import json

import pandas as pd
import pytest
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    AutoImageProcessor, AutoModelForCausalLM, AutoModelForImageClassification, AutoModelForSequenceClassification,
    AutoTokenizer,
)

from conftest import cli_flags, read_json, run_engine, strategy_args

STEPS, BATCH = 4, 16
COMMON = ("train_measured_steps", "train_measured_seconds", "train_measured_samples_per_second",
          "train_model_flops_per_second", "train_peak_flops", "train_peak_flops_source", "train_mfu",
          "train_peak_memory_mib", "train_peak_memory_kind")


def check_common(results, batch=BATCH, steps=STEPS):
    """Fields every run writes, MFU recomputed from them, a plausible CPU peak and memory."""
    assert set(COMMON) <= set(results), set(COMMON) - set(results)
    assert results["train_measured_steps"] == steps - 1  # the first step is warm-up
    assert results["train_mfu"] == pytest.approx(results["train_model_flops_per_second"] / results["train_peak_flops"])
    assert "measured float32 matmul peak on cpu" in results["train_peak_flops_source"]
    assert results["train_peak_flops"] > max(1e8, results["train_model_flops_per_second"])
    assert 0 < results["train_mfu"] < 1
    assert results["train_peak_memory_kind"] == "process peak RSS"
    assert 100 < results["train_peak_memory_mib"] < 64 * 1024  # python + torch alone hold > 100 MiB
    samples = results["train_measured_samples_per_second"] * results["train_measured_seconds"]
    assert samples == pytest.approx(batch * (steps - 1))


def counted(results, rate):
    return results[rate] * results["train_measured_seconds"]


@pytest.mark.parametrize("engine", [pytest.param("trainer", marks=pytest.mark.slow), "accelerate"])
def test_text_classification_counts_the_real_tokens_it_trained_on(tmp_path, tiny_bert, tweets_csv, engine):
    train, validation = tweets_csv
    out = tmp_path / "out"
    run_engine(strategy_args(tiny_bert, out, train, validation, max_steps=STEPS, per_device_train_batch_size=BATCH,
                             train_sampling_strategy="sequential", engine=engine))
    results = read_json(out / "all_results.json")
    check_common(results)
    assert json.loads((out / "train_results.json").read_text())["train_mfu"] == results["train_mfu"]

    # independent count: rows BATCH .. STEPS*BATCH of train.csv (steps 2..STEPS), tokenized as the task does
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    texts = pd.read_csv(train)["text"].fillna("").tolist()[BATCH:STEPS * BATCH]
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=48)["input_ids"]]
    real_tokens = sum(lengths)
    assert counted(results, "train_real_tokens_per_second") == pytest.approx(real_tokens)
    padded = sum(BATCH * max(lengths[i:i + BATCH]) for i in range(0, len(lengths), BATCH))
    assert real_tokens < padded  # what counting the collator's padded batches would have given

    model = AutoModelForSequenceClassification.from_pretrained(out)  # no tied head: Trainer's own count
    assert results["train_model_flops_per_token"] == 6 * model.num_parameters(exclude_embeddings=True)
    assert results["train_model_flops_per_second"] == pytest.approx(
        results["train_model_flops_per_token"] * results["train_real_tokens_per_second"])


def test_causal_lm_packed_blocks_and_tied_head(tmp_path, tiny_gpt, tweets):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in tweets["text"].head(300)))
    out = tmp_path / "out"
    run_engine(cli_flags(dict(task="causal-lm", model_name_or_path=tiny_gpt, train_file=data, text_column="text",
                              output_dir=out, max_steps=STEPS, per_device_train_batch_size=4, block_size=32,
                              learning_rate=1e-3, report_to="none", disable_tqdm="true", eval_strategy="no",
                              save_strategy="no", do_eval="false"), {}))
    results = read_json(out / "all_results.json")
    check_common(results, batch=4)
    # packed blocks carry no padding: every position of every block is a real token
    assert counted(results, "train_real_tokens_per_second") == pytest.approx((STEPS - 1) * 4 * 32)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight is model.transformer.wte.weight
    # the tied head's matmul runs on every token: its weight counts although it is the embedding's
    expected = model.num_parameters(exclude_embeddings=True) + model.transformer.wte.weight.numel()
    assert results["train_model_flops_per_token"] == 6 * expected


@pytest.mark.slow
def test_image_classification_flops_from_the_flop_counter(tmp_path, tiny_resnet, digit_folders):
    train, validation = digit_folders
    out = tmp_path / "out"
    run_engine(cli_flags(dict(config="image_classification", model_name_or_path=tiny_resnet, output_dir=out,
                              train_file=train, validation_file=validation, max_steps=STEPS,
                              per_device_train_batch_size=BATCH, report_to="none", disable_tqdm="true",
                              eval_strategy="no", save_strategy="no", do_eval="false"), {}))
    results = read_json(out / "all_results.json")
    check_common(results)
    assert "train_real_tokens_per_second" not in results and "train_model_flops_per_token" not in results

    model = AutoModelForImageClassification.from_pretrained(out)
    processor = AutoImageProcessor.from_pretrained(out)
    image = Image.open(next((train / "zero").iterdir())).convert("RGB")
    pixels = processor([image] * BATCH, return_tensors="pt")["pixel_values"]
    with FlopCounterMode(display=False) as counter:
        model(pixel_values=pixels)
    per_sample = 3 * counter.get_total_flops() / BATCH  # forward + backward (twice the forward)
    assert results["train_model_flops_per_sample"] == pytest.approx(per_sample)
    assert results["train_model_flops_per_second"] == pytest.approx(
        per_sample * results["train_measured_samples_per_second"])


def test_frozen_weights_count_only_the_passes_they_take_part_in(tmp_path, tiny_bert, tweets_csv):
    """Full fine-tuning 6N per token; LoRA on every layer ~4N (forward, and gradients back through every
    layer, no weight gradients); LoRA on the upper layer only: less, as its backward stops there."""
    from safetensors.torch import load_file

    per_token = {}
    for name, extra in (("full", {}), ("lora", {"peft": "lora", "lora_r": 2}),
                        ("upper", {"peft": "lora", "lora_r": 2, "lora_layers_to_transform": "1"})):
        run_engine(strategy_args(tiny_bert, tmp_path / name, *tweets_csv, max_steps=2, **extra))
        per_token[name] = read_json(tmp_path / name / "all_results.json")["train_model_flops_per_token"]
    n = AutoModelForSequenceClassification.from_pretrained(tmp_path / "full").num_parameters(exclude_embeddings=True)
    trained = sum(t.numel() for t in load_file(tmp_path / "lora" / "adapter_model.safetensors").values())
    assert per_token["full"] == 6 * n
    assert 4 * n < per_token["lora"] <= 4 * n + 6 * trained  # the adapters and the trained head: 6 each
    assert 2.5 * n < per_token["upper"] < per_token["lora"] - 0.5 * n
