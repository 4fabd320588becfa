"""GPU speed defaults (hftune.launch.gpu_defaults): bf16 only where no precision was chosen, channels-last
CNNs. This machine has no GPU: the tests make hftune believe it has one (gpu_supports_bf16 /
on_gpu) and check what that decides and that the run really trains that way (bf16 autocast runs on
the CPU too)."""

import json
import logging

import pytest
import torch
import yaml

import hftune.launch.gpu_defaults as gpu_defaults
from conftest import run_engine, strategy_args
from hftune.config import CONFIG_FILE, parse_config


@pytest.fixture
def bf16_gpu(monkeypatch):
    monkeypatch.setattr(gpu_defaults, "gpu_supports_bf16", lambda: True)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", raising=False)


def training_args(tiny_bert, tweets_csv, tmp_path, **overrides):
    return parse_config(strategy_args(tiny_bert, tmp_path / "out", *tweets_csv, **overrides))[2]


def test_no_gpu_no_bf16(tiny_bert, tweets_csv, tmp_path):
    args = training_args(tiny_bert, tweets_csv, tmp_path)
    assert not args.bf16 and args.machine_defaults == ()


@pytest.mark.parametrize("native", [True, False])
def test_bf16_on_a_cpu_without_native_bf16_warns(native, tiny_bert, tweets_csv, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: native)
    with caplog.at_level(logging.WARNING, logger="hftune"):
        gpu_defaults.warn_slow_cpu_bf16(training_args(tiny_bert, tweets_csv, tmp_path, bf16="true"))
        gpu_defaults.warn_slow_cpu_bf16(training_args(tiny_bert, tweets_csv, tmp_path))  # fp32: nothing to say
    assert ["without native bf16" in r.message for r in caplog.records] == ([] if native else [True])


@pytest.mark.parametrize("given", [{"bf16": "false"}, {"bf16": "true"}])
def test_a_precision_in_the_config_wins(given, bf16_gpu, tiny_bert, tweets_csv, tmp_path):
    args = training_args(tiny_bert, tweets_csv, tmp_path, **given)
    assert args.bf16 == (given["bf16"] == "true") and args.machine_defaults == ()


@pytest.mark.parametrize("flags, env, chosen", [
    ({}, {}, False),
    ({"fp16": "true"}, {}, True),
    ({"bf16": True}, {}, True),  # a bare --bf16
    ({}, {"ACCELERATE_MIXED_PRECISION": "fp16"}, True),
    ({}, {"ACCELERATE_MIXED_PRECISION": "no"}, False),  # the shipped accelerate configs' value: nothing chosen
])
def test_what_counts_as_a_chosen_precision(flags, env, chosen, bf16_gpu, monkeypatch):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert gpu_defaults.precision_chosen(flags) is chosen
    assert gpu_defaults.bf16_by_default(flags) is not chosen


@pytest.mark.parametrize("fp16, chosen", [("auto", False), (True, True), (False, True)])
def test_an_explicit_deepspeed_precision_counts(fp16, chosen, bf16_gpu, tmp_path, monkeypatch):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"fp16": {"enabled": fp16}, "bf16": {"enabled": "auto"}}))
    assert gpu_defaults.precision_chosen({"deepspeed": str(path)}) is chosen
    assert gpu_defaults.precision_chosen({"deepspeed": path.read_text()}) is chosen  # a recipe's inline mapping
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(path))  # a DeepSpeed JSON named by the accelerate config
    assert gpu_defaults.precision_chosen({}) is chosen


@pytest.mark.slow
def test_bf16_by_default_trains_in_bf16_and_is_logged(bf16_gpu, tiny_bert, tweets_csv, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="hftune")
    engine, history = run_engine(strategy_args(tiny_bert, tmp_path / "out", *tweets_csv, max_steps=2))
    assert engine.args.bf16 and engine.args.machine_defaults == ("bf16",)
    assert engine.accelerator.mixed_precision == "bf16"
    assert "bf16 mixed precision (hftune's default on a bf16-capable GPU; bf16: false trains in fp32)" in caplog.text
    assert len([e for e in history if "loss" in e]) == 2
    # the resolved config leaves the machine's choice out: a re-run on a CPU does not force bf16
    assert "bf16" not in yaml.safe_load((tmp_path / "out" / CONFIG_FILE).read_text())


def test_channels_last_cnn_on_a_gpu_computes_the_same(monkeypatch, tiny_resnet):
    from transformers import AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(tiny_resnet).eval()
    pixels = torch.randn(2, 3, 32, 32)
    expected = model(pixel_values=pixels).logits
    monkeypatch.setattr(gpu_defaults, "on_gpu", lambda: False)
    assert model.resnet.embedder.embedder.convolution.weight.is_contiguous()  # no GPU: left as it is
    gpu_defaults.channels_last(model)
    assert model.resnet.embedder.embedder.convolution.weight.is_contiguous()
    monkeypatch.setattr(gpu_defaults, "on_gpu", lambda: True)
    gpu_defaults.channels_last(model)
    weight = model.resnet.embedder.embedder.convolution.weight
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    assert (model(pixel_values=pixels).logits - expected).abs().max() < 1e-5


def test_image_task_trains_a_cnn_channels_last_on_a_gpu(monkeypatch, tiny_resnet, digit_folders, tmp_path, caplog):
    """Through the image task's own loader: the weights it trains are channels-last, and it says so."""
    monkeypatch.setattr(gpu_defaults, "on_gpu", lambda: True)
    args = [f"--{key}={value}" for key, value in dict(
        config="image_classification", model_name_or_path=tiny_resnet, output_dir=tmp_path / "out",
        train_file=digit_folders[0], validation_file=digit_folders[1], report_to="none", disable_tqdm="true",
        per_device_train_batch_size=8, max_steps=2, logging_steps=1, do_eval="false", save_strategy="no").items()]
    with caplog.at_level(logging.INFO, logger="hftune"):
        engine, history = run_engine(args)
    assert "memory format: channels-last" in caplog.text
    convolution = engine.model.resnet.embedder.embedder.convolution.weight
    assert convolution.is_contiguous(memory_format=torch.channels_last) and not convolution.is_contiguous()
    assert len([e for e in history if "loss" in e]) == 2
