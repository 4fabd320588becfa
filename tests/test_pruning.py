"""Gradual magnitude pruning: the schedule's formula, masks from torch.nn.utils.prune, the target
sparsity reached on a tiny BERT and kept through save/load, whole channels (ResNet) and heads (BERT,
Llama with grouped-query attention), resume mid-pruning, and bad input refused before training."""

import json
import os

import pytest
import torch
from transformers import (
    AutoModelForImageClassification, AutoModelForSequenceClassification, LlamaConfig, LlamaForCausalLM,
    TrainerCallback,
)

from conftest import cli_flags, fail, read_json, run_engine, strategy_args
from hftune.compression.pruning import Pruner, Window, scheduled_sparsity
from test_bad_input import base  # noqa: F401  (fixture)

TARGET = 0.6


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a busy machine they lose much to them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_schedule_follows_its_formula():
    # Zhu & Gupta 2017: s_t = s_f * (1 - (1 - (t - t0) / (n dt))^3); here s_f 0.8, t0 2, n dt 8.
    expected = {
        "cubic": {0: 0.0, 2: 0.0, 4: 0.8 * (1 - 0.75 ** 3), 6: 0.8 * (1 - 0.5 ** 3), 10: 0.8, 12: 0.8},
        "linear": {0: 0.0, 2: 0.0, 4: 0.2, 6: 0.4, 10: 0.8, 12: 0.8},
        "one_shot": {0: 0.0, 1: 0.0, 2: 0.8, 6: 0.8, 12: 0.8},
    }
    for schedule, values in expected.items():
        for step, value in values.items():
            assert scheduled_sparsity(step, 0.8, 2, 10, schedule) == pytest.approx(value), (schedule, step)
    window = Window(start=2, end=10, frequency=3)
    assert [t for t in range(13) if window.is_update(t)] == [2, 5, 8, 10]
    assert [window.last_update(t) for t in (1, 2, 4, 7, 9, 10, 12)] == [None, 2, 2, 5, 8, 10, 10]


def test_global_scope_uses_one_threshold_layer_scope_prunes_each_layer():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 10), torch.nn.Linear(10, 10))
    with torch.no_grad():
        model[0].weight.abs_().add_(1)  # every weight of layer 0 outweighs every weight of layer 1 (|w| < 0.32)
    pruner = Pruner(model, "unstructured", "global")
    pruner.update(0.5)
    assert pruner.achieved() == (0.5, {"0.weight": 0.0, "1.weight": 1.0})
    pruner = Pruner(model, "unstructured", "layer")
    pruner.update(0.3)
    assert pruner.achieved() == (0.65, {"0.weight": 0.3, "1.weight": 1.0})  # layer 1 was zero already
    assert (model[0].bias != 0).all() and (model[1].bias != 0).all()  # biases are never pruned


def test_heads_under_grouped_query_attention_keep_shared_key_value_heads():
    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    pruner = Pruner(model, "heads", "layer")
    pruner.update(0.5)
    overall, layers = pruner.achieved()
    assert overall == 0.5 and set(layers) == {f"model.layers.{i}.self_attn.{p}.weight" for i in (0, 1)
                                              for p in ("q_proj", "o_proj")}
    for layer in model.model.layers:
        attention = layer.self_attn
        q_heads = attention.q_proj.weight.view(4, 8, 32).abs().sum(dim=(1, 2))
        o_heads = attention.o_proj.weight.view(32, 4, 8).abs().sum(dim=(0, 2))
        assert ((q_heads == 0) == (o_heads == 0)).all() and int((q_heads == 0).sum()) == 2
        assert (attention.k_proj.weight != 0).all() and (attention.v_proj.weight != 0).all()
    assert (model.lm_head.weight != 0).all() and (model.model.embed_tokens.weight != 0).all()


def zero_fraction(weights):
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


class SparsityProbe(TrainerCallback):
    """Zeros among the backbone's Linear weights after every optimizer step (after the pruning callback)."""

    def __init__(self):
        self.by_step = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        body = getattr(model, "module", model).bert
        weights = [m.weight for m in body.modules() if isinstance(m, torch.nn.Linear)]
        self.by_step[state.global_step] = zero_fraction(weights)


@pytest.mark.parametrize("scope, engine", [("global", "trainer"), ("layer", "trainer"), ("global", "accelerate")])
def test_reaches_target_sparsity_and_keeps_it_through_save_and_load(scope, engine, tiny_bert, tweets_csv, tmp_path):
    out = tmp_path / "out"
    probe = SparsityProbe()
    run_engine(strategy_args(tiny_bert, out, *tweets_csv, prune_sparsity=TARGET, prune_scope=scope, engine=engine),
               callbacks=[probe])

    # Gradual: the default window is steps 0..9 of 12 (3/4), one update per step; then it holds.
    window = Window(start=0, end=9, frequency=1)
    for step, achieved in probe.by_step.items():
        assert achieved == pytest.approx(scheduled_sparsity(window.last_update(step), TARGET, 0, 9, "cubic"),
                                         abs=0.005), step
    assert probe.by_step[3] < probe.by_step[6] < probe.by_step[9] == probe.by_step[12]

    results, report = read_json(out / "all_results.json"), read_json(out / "sparsity.json")
    assert results["train_sparsity"] == report["overall"] == pytest.approx(TARGET, abs=0.01)
    model = AutoModelForSequenceClassification.from_pretrained(out)
    state = model.state_dict()
    assert len(report["layers"]) == 13  # 2 layers x (q, k, v, attention output, intermediate, output) + pooler
    for name, fraction in report["layers"].items():
        assert zero_fraction([state[name]]) == pytest.approx(fraction, abs=1e-6), name
        if scope == "layer":
            assert fraction == pytest.approx(TARGET, abs=0.01), name
    assert zero_fraction([state[name] for name in report["layers"]]) == pytest.approx(TARGET, abs=0.01)
    dense = ["classifier.weight", "bert.embeddings.position_embeddings.weight",
             "bert.encoder.layer.0.output.LayerNorm.weight", "bert.encoder.layer.0.attention.self.query.bias"]
    assert all(zero_fraction([state[name]]) == 0 for name in dense)


def test_channels_zero_whole_output_channels_of_a_resnet(tiny_resnet, digit_folders, tmp_path):
    out = tmp_path / "out"
    train, validation = digit_folders
    run_engine(cli_flags(dict(config="image_classification", model_name_or_path=tiny_resnet, output_dir=out,
                              train_file=train, validation_file=validation, report_to="none", disable_tqdm="true",
                              max_steps=8, per_device_train_batch_size=16, learning_rate=5e-3, warmup_steps=0,
                              logging_steps=1),
                         dict(prune_sparsity=0.5, prune_structure="channels")))
    model = AutoModelForImageClassification.from_pretrained(out)
    convs = [m for m in model.resnet.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 6  # the stem, 2 per stage and one shortcut
    for conv in convs:
        channel_norms = conv.weight.flatten(1).norm(dim=1)
        assert int((channel_norms == 0).sum()) == conv.out_channels // 2  # whole channels, half of each layer
        assert zero_fraction([conv.weight]) == 0.5  # and no stray zeros elsewhere
    assert (model.classifier[1].weight != 0).all()
    assert read_json(out / "sparsity.json")["overall"] == read_json(out / "all_results.json")["train_sparsity"] == 0.5


def test_heads_zero_whole_bert_attention_heads(tiny_bert, tweets_csv, tmp_path):
    out = tmp_path / "out"
    run_engine(strategy_args(tiny_bert, out, *tweets_csv, prune_sparsity=0.5, prune_structure="heads"))
    model = AutoModelForSequenceClassification.from_pretrained(out)
    pruned = 0
    for layer in model.bert.encoder.layer:
        attention = layer.attention
        q, k, v = attention.self.query, attention.self.key, attention.self.value
        per_head = [torch.cat([w.weight.view(2, -1) for w in (q, k, v)] + [w.bias.view(2, -1) for w in (q, k, v)], 1),
                    attention.output.dense.weight.view(32, 2, 16).transpose(0, 1).reshape(2, -1)]
        zero_rows = [(part == 0).all(dim=1) for part in per_head]
        nonzero_rows = [(part != 0).all(dim=1) for part in per_head]
        for head in range(2):  # each head is wholly gone or wholly kept, in q, k, v and the output projection
            assert all(z[head] for z in zero_rows) or all(n[head] for n in nonzero_rows), head
        pruned += int(zero_rows[0].sum())
    assert pruned == 2  # half of the 4 heads, ranked across both layers
    assert read_json(out / "all_results.json")["train_sparsity"] == 0.5


def test_resume_mid_pruning_matches_an_uninterrupted_run(tiny_bert, tweets_csv, tmp_path):
    # Updates at steps 0, 3, 6, 9: a checkpoint at step 4 lies between two, so its masks must be rebuilt.
    flags = dict(prune_sparsity=TARGET, prune_frequency=3, save_strategy="steps", save_steps=4)
    run_engine(strategy_args(tiny_bert, tmp_path / "whole", *tweets_csv, **flags))
    run_engine(strategy_args(tiny_bert, tmp_path / "resumed", *tweets_csv, **flags,
                             resume_from_checkpoint=tmp_path / "whole" / "checkpoint-4"))
    whole = AutoModelForSequenceClassification.from_pretrained(tmp_path / "whole").state_dict()
    resumed = AutoModelForSequenceClassification.from_pretrained(tmp_path / "resumed").state_dict()
    layers = read_json(tmp_path / "whole" / "sparsity.json")["layers"]
    for name in layers:
        assert torch.equal(whole[name] == 0, resumed[name] == 0), name
    for name in whole:
        torch.testing.assert_close(whole[name], resumed[name], rtol=0, atol=1e-5)
    assert read_json(tmp_path / "resumed" / "all_results.json")["train_sparsity"] == pytest.approx(TARGET, abs=0.01)


ZERO2 = {"zero_optimization": {"stage": 2}, "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
         "gradient_accumulation_steps": "auto"}
# case: (flags, environment, expected fragment of the error line)
BAD = {
    "sparsity 1": (["--prune_sparsity", "1.0"], {}, "prune_sparsity must be in [0, 1)"),
    "negative sparsity": (["--prune_sparsity", "-0.1"], {}, "prune_sparsity must be in [0, 1)"),
    "schedule": (["--prune_sparsity", "0.5", "--prune_schedule", "cubik"], {},
                 "unknown prune_schedule 'cubik'; choose one of ['cubic', 'linear', 'one_shot']. "
                 "Did you mean 'cubic'?"),
    "scope": (["--prune_sparsity", "0.5", "--prune_scope", "row"], {}, "choose one of ['global', 'layer']"),
    "structure": (["--prune_sparsity", "0.5", "--prune_structure", "filters"], {},
                  "unknown prune_structure 'filters'; choose one of ['unstructured', 'channels', 'heads']"),
    "global channels": (["--prune_sparsity", "0.5", "--prune_structure", "channels", "--prune_scope", "global"], {},
                        "set prune_scope: layer"),
    "start >= end": (["--prune_sparsity", "0.5", "--prune_start_step", "5", "--prune_end_step", "5"], {},
                     "prune_start_step (5) must be < prune_end_step (5)"),
    "end beyond max_steps": (["--prune_sparsity", "0.5", "--prune_end_step", "20", "--max_steps", "10"], {},
                             "prune_end_step (20) is beyond max_steps (10)"),
    # 320 rows at batch 8, a tenth of an epoch: 4 steps, known only when training starts
    "default end before start": (["--prune_sparsity", "0.5", "--prune_start_step", "3", "--num_train_epochs", "0.1"],
                                 {}, "prune_start_step < prune_end_step <= the 4 training steps; got prune_start_step "
                                     "3, prune_end_step 3 (default: 3/4 of the training steps)"),
    "setting without sparsity": (["--prune_schedule", "linear"], {}, "prune_schedule applies only with prune_sparsity"),
    "DeepSpeed": (["--prune_sparsity", "0.5"], {"ACCELERATE_DEEPSPEED_CONFIG_FILE": "ZERO2"},
                  "prune_sparsity cannot run under DeepSpeed"),
    "FSDP": (["--prune_sparsity", "0.5"], {"ACCELERATE_USE_FSDP": "true"}, "FSDP shards them"),
    "pipeline": (["--prune_sparsity", "0.5", "--engine", "pipeline"], {}, "not supported by engine: pipeline"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_refused(case, capsys, base, tmp_path, monkeypatch):  # noqa: F811
    flags, env, fragment = BAD[case]
    for name, value in env.items():
        if value == "ZERO2":
            (tmp_path / "ds.json").write_text(json.dumps(ZERO2))
            value = str(tmp_path / "ds.json")
        monkeypatch.setenv(name, value)
    assert fragment in fail(capsys, base + flags + ["--per_device_train_batch_size", "8"])
    assert not os.path.exists(tmp_path / "out" / "model.safetensors")


def test_a_structure_the_model_lacks_is_refused(capsys, tiny_resnet, digit_folders, tmp_path):
    train, validation = digit_folders
    line = fail(capsys, ["--config", "image_classification", "--model_name_or_path", tiny_resnet, "--train_file",
                         str(train), "--validation_file", str(validation), "--output_dir", str(tmp_path / "out"),
                         "--prune_sparsity", "0.5", "--prune_structure", "heads"])
    assert "prune_structure: heads found no BERT- or Llama-style attention heads in ResNetForImage" in line
