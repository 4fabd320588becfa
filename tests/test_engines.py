"""The Trainer and Accelerate engines run the same strategy: same losses, same learning rates."""

import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import read_json, run_engine, step_logs, strategy_args

STRATEGIES = {
    "defaults": {},
    "sgd-cosine-accumulation-penalties-clipping": dict(
        optim="sgd", optim_args="momentum=0.9,nesterov=True", learning_rate=0.05, lr_scheduler_type="cosine",
        lr_scheduler_kwargs='{"min_lr": 0.005}', warmup_steps=4, gradient_accumulation_steps=2,
        per_device_train_batch_size=8, l1_lambda=1e-4, l2_lambda=1e-3, max_grad_value=0.05,
        max_grad_norm=0.5, max_grad_norm_type="inf", label_smoothing_factor=0.1, weight_decay=0.01,
    ),
    "bf16-autocast": dict(bf16="true", optim="adamw", lr_scheduler_type="exponential",
                          lr_scheduler_kwargs='{"gamma": 0.9}'),
}
STRATEGY_LINES = [  # what the heavy strategy logs at start, in both engines
    "optimizer: sgd (SGD) {'lr': 0.05, 'momentum': 0.9, 'dampening': 0.0, 'nesterov': True}",
    "parameter groups: 17 tensors/998,368 params with weight_decay 0.01, 24 tensors/803 params with weight_decay 0.0;"
    " frozen: 0 tensors/0 params",
    "lr schedule: cosine {'min_lr': 0.005}, warmup 4 steps",
    "gradient clipping: norm 0.5 (p=inf), value 0.05",
    "penalties: l1 lambda 0.0001, l2 lambda 0.001 on 17 tensors/998,368 params (regularize: weights)",
]


@pytest.mark.parametrize("strategy", [s if s == "defaults" else pytest.param(s, marks=pytest.mark.slow)
                                      for s in STRATEGIES])
def test_engines_log_the_same_losses_and_learning_rates(strategy, tiny_bert, tweets_csv, tmp_path, caplog):
    histories = {}
    for engine in ("trainer", "accelerate"):
        args = strategy_args(tiny_bert, tmp_path / engine, *tweets_csv, engine=engine, max_steps=20,
                             **STRATEGIES[strategy])
        caplog.clear()
        histories[engine] = run_engine(args)[1]
        if strategy.startswith("sgd"):
            logged = "\n".join(r.getMessage() for r in caplog.records if r.name == "hftune")
            assert all(line in logged for line in STRATEGY_LINES), logged
    losses = {engine: step_logs(history, "loss") for engine, history in histories.items()}
    assert len(losses["trainer"]) == 20 and len(losses["accelerate"]) == 20
    assert losses["trainer"] == pytest.approx(losses["accelerate"], abs=1e-4)
    assert step_logs(histories["trainer"], "learning_rate") == step_logs(histories["accelerate"], "learning_rate")
    assert step_logs(histories["trainer"], "grad_norm") == pytest.approx(
        step_logs(histories["accelerate"], "grad_norm"), rel=1e-3)
    if strategy.startswith("sgd"):  # the penalties are logged, and the same, in both
        for key in ("l1_penalty", "l2_penalty"):
            assert len(step_logs(histories["trainer"], key)) == 20
            assert step_logs(histories["trainer"], key) == pytest.approx(step_logs(histories["accelerate"], key), rel=1e-4)


@pytest.mark.parametrize("engine", [pytest.param("trainer", marks=pytest.mark.slow), "accelerate"])
def test_resume_from_a_checkpoint_gives_the_uninterrupted_weights(engine, tiny_bert, tweets_csv, tmp_path):
    settings = dict(engine=engine, max_steps=6, save_strategy="steps", save_steps=3, optim="sgd",
                    optim_args="momentum=0.9", learning_rate=0.05, lr_scheduler_type="cosine")
    run_engine(strategy_args(tiny_bert, tmp_path / "full", *tweets_csv, **settings))
    # A run that died after its step-3 checkpoint: only that checkpoint is left in its output_dir.
    shutil.copytree(tmp_path / "full" / "checkpoint-3", tmp_path / "resumed" / "checkpoint-3")
    _, history = run_engine(strategy_args(tiny_bert, tmp_path / "resumed", *tweets_csv,
                                          resume_from_checkpoint="true", **settings))
    assert [entry["step"] for entry in history if "loss" in entry] == list(range(1, 7))
    full, resumed = load_file(tmp_path / "full/model.safetensors"), load_file(tmp_path / "resumed/model.safetensors")
    assert all(torch.equal(full[name], resumed[name]) for name in full)


@pytest.mark.parametrize("engine", ["trainer", "accelerate"])
@pytest.mark.slow
def test_save_total_limit_keeps_the_latest_checkpoints(engine, tiny_bert, tweets_csv, tmp_path):
    run_engine(strategy_args(tiny_bert, tmp_path / "out", *tweets_csv, engine=engine, max_steps=6,
                             save_strategy="steps", save_steps=2, save_total_limit=2))
    assert sorted(p.name for p in (tmp_path / "out").glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]


@pytest.mark.slow
def test_train_loss_counts_the_steps_after_the_last_log_line(tiny_bert, tweets_csv, tmp_path):
    train_loss = {}
    for engine in ("trainer", "accelerate"):
        engine_, history = run_engine(strategy_args(tiny_bert, tmp_path / engine, *tweets_csv, engine=engine,
                                                    max_steps=12, logging_steps=5))
        train_loss[engine] = history[-1]["train_loss"]
    assert train_loss["trainer"] == pytest.approx(train_loss["accelerate"], abs=1e-5)


@pytest.mark.slow
def test_evaluate_and_predict_without_training_agree(tiny_bert, tweets_csv, tmp_path):
    train, validation = tweets_csv
    run_engine(strategy_args(tiny_bert, tmp_path / "trained", *tweets_csv, max_steps=4))
    results = {}
    for engine in ("trainer", "accelerate"):
        out = tmp_path / engine
        run_engine(strategy_args(str(tmp_path / "trained"), out, train, validation, engine=engine,
                                 do_train="false", do_eval="true", do_predict="true", test_file=validation))
        results[engine] = read_json(out / "all_results.json")
    for key in ("eval_loss", "eval_accuracy", "test_loss", "test_accuracy", "test_f1_macro"):
        assert results["trainer"][key] == pytest.approx(results["accelerate"][key], abs=1e-6), key
