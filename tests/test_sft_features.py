"""sft through what hftune has for causal LMs: exact resume (packed rows), the NaN guard, pruning,
LoRA on chosen layers and distillation in-process; ZeRO-1/2/3, FSDP and pipeline launches equal one
process (slow tier; DDP: test_sft.py)."""

import logging

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import cli_flags, launch, logged_losses, read_json, run_engine, tiny_model
from test_guards import InjectNaN
from test_sft import answer_rows, color_rows, trained_weights, write_jsonl


def sft_args(model, train, out, **overrides):
    settings = dict(model_name_or_path=model, train_file=train, validation_split_percentage=0, do_eval="false",
                    output_dir=out, max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2, warmup_steps=0,
                    logging_steps=1, save_strategy="no", train_sampling_strategy="sequential", report_to="none",
                    disable_tqdm="true", seed=0)
    return cli_flags(settings, overrides)


@pytest.fixture(scope="module")
def colors(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("sft-features") / "train.jsonl", color_rows(32))


def test_resume_of_packed_rows_continues_exactly(tiny_chat_llama, colors, tmp_path):
    flags = dict(packing="true", train_sampling_strategy="random", save_strategy="steps", save_steps=2)
    run_engine(sft_args(tiny_chat_llama, colors, tmp_path / "whole", **flags))
    run_engine(sft_args(tiny_chat_llama, colors, tmp_path / "resumed", **flags,
                        resume_from_checkpoint=tmp_path / "whole" / "checkpoint-2"))
    whole, resumed = trained_weights(tmp_path / "whole"), trained_weights(tmp_path / "resumed")
    checkpoint = trained_weights(tmp_path / "whole" / "checkpoint-2")
    assert max((whole[k] - checkpoint[k]).abs().max().item() for k in whole) > 1e-3  # steps 3-4 changed weights
    assert max((whole[k] - resumed[k]).abs().max().item() for k in whole) < 1e-6


def test_a_nan_step_is_skipped(tiny_chat_llama, colors, tmp_path, caplog):
    injector = InjectNaN([3], layer="lm_head")
    with caplog.at_level(logging.WARNING, logger="hftune"):
        run_engine(sft_args(tiny_chat_llama, colors, tmp_path / "out", engine="accelerate", max_steps=4),
                   callbacks=[injector])
    assert "non-finite gradient (NaN or inf) at step 3" in caplog.text
    assert torch.equal(injector.weights[3], injector.weights[2])
    assert not torch.equal(injector.weights[4], injector.weights[3])


def test_pruning_reaches_its_sparsity(tiny_chat_llama, colors, tmp_path):
    out = tmp_path / "out"
    run_engine(sft_args(tiny_chat_llama, colors, out, prune_sparsity=0.5, max_steps=4))
    report = read_json(out / "sparsity.json")
    assert read_json(out / "all_results.json")["train_sparsity"] == pytest.approx(0.5, abs=0.01)
    state = AutoModelForCausalLM.from_pretrained(out).state_dict()
    zeros = sum((state[name] == 0).sum().item() for name in report["layers"])
    assert zeros / sum(state[name].numel() for name in report["layers"]) == pytest.approx(0.5, abs=0.01)


def test_lora_on_the_upper_layers_only(tiny_chat_llama, colors, tmp_path):
    """lora_layers_to_transform: adapters in layer 1 only, and they train."""
    from safetensors.torch import load_file

    out = tmp_path / "out"
    _, history = run_engine(sft_args(tiny_chat_llama, colors, out, peft="lora", lora_layers_to_transform="1",
                                     lora_target_modules="all-linear", learning_rate=5e-2, max_steps=6))
    adapters = load_file(out / "adapter_model.safetensors")
    assert adapters and all(".layers.1." in name for name in adapters)
    assert any("mlp.down_proj" in name for name in adapters) and not any("lm_head" in name for name in adapters)
    losses = [e["loss"] for e in history if "loss" in e]
    assert losses[-1] < losses[0]


def answer_kl(teacher, student, tokenizer, rows):
    """KL(teacher || student) of the first answer token after each row's prompt: a trained position."""
    prompts = [tokenizer.apply_chat_template(r["messages"][:1], add_generation_prompt=True, tokenize=False)
               for r in rows]
    total = 0.0
    for prompt in prompts:
        ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            t, s = (m(ids).logits[0, -1].log_softmax(-1) for m in (teacher, student))
        total += torch.sum(t.exp() * (t - s)).item()
    return total / len(prompts)


def test_distilled_student_is_closer_to_its_teacher(tiny_chat_llama, smol_tokenizer_path, colors, tmp_path):
    """The teacher: a wider Llama from another initialisation that learned to answer "blue" to everything;
    the students train on the true colors with and without it, from the same start."""
    tiny_model(tmp_path / "wide", "llama", tokenizer=smol_tokenizer_path, hidden_size=48, intermediate_size=96, seed=1)
    blue = [{"messages": [r["messages"][0], {"role": "assistant", "content": "blue"}]} for r in color_rows(32)]
    run_engine(sft_args(tmp_path / "wide", write_jsonl(tmp_path / "blue.jsonl", blue), tmp_path / "teacher",
                        max_steps=16, learning_rate=5e-2))
    for name, extra in (("plain", {}), ("distilled", {"teacher_model_name_or_path": tmp_path / "teacher"})):
        run_engine(sft_args(tiny_chat_llama, colors, tmp_path / name, max_steps=8, learning_rate=5e-2, **extra))
    teacher = AutoModelForCausalLM.from_pretrained(tmp_path / "teacher").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "teacher")
    held_out = color_rows(16, seed=5)
    plain, distilled = (answer_kl(teacher, AutoModelForCausalLM.from_pretrained(tmp_path / n).eval(), tokenizer,
                                  held_out) for n in ("plain", "distilled"))
    print(f"KL(teacher || student) at the answer: plain {plain:.3f}, distilled {distilled:.3f}")
    assert distilled < 0.75 * plain, (plain, distilled)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU (gloo) launches")
@pytest.mark.parametrize("config, extra", [("deepspeed_zero1.yaml", []), ("deepspeed_zero2.yaml", []),
                                           ("deepspeed_zero3.yaml", []), ("fsdp.yaml", []),
                                           ("deepspeed_pipeline.yaml", ["--engine", "pipeline"])])
def test_launches_equal_one_process(config, extra, tiny_chat_llama, tmp_path):
    """Rows with 3 to 13 trained tokens: 2 processes (2 data shards, or 2 pipeline stages on one batch)
    give the one-process losses and a model that loads with from_pretrained."""
    train = write_jsonl(tmp_path / "train.jsonl", answer_rows(16))
    batch = 8 if "pipeline" in config else 4
    launch(config, 2, sft_args(tiny_chat_llama, train, tmp_path / "two", per_device_train_batch_size=batch) + extra)
    run_engine(sft_args(tiny_chat_llama, train, tmp_path / "one", per_device_train_batch_size=8))
    assert logged_losses(tmp_path / "two") == pytest.approx(logged_losses(tmp_path / "one"), abs=1e-4)
    two, one = trained_weights(tmp_path / "two"), trained_weights(tmp_path / "one")
    assert max((two[k] - one[k]).abs().max().item() for k in one) < 1e-4
