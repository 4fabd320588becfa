"""Penalties, clipping, early stopping, BatchNorm freezing and dropout overrides have their real effect."""

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, TrainerCallback

from conftest import cli_flags, run_engine, step_logs, strategy_args
from hftune.training.regularization import Penalties

ENGINES = ["trainer", "accelerate"]


class GradientRecorder(TrainerCallback):
    """Records, just before each optimizer step, the largest gradient element and the total p-norm."""

    def __init__(self, p=2.0):
        self.p, self.max_abs, self.norms = p, [], []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        grads = [param.grad for param in model.parameters() if param.grad is not None]
        self.max_abs.append(max(g.abs().max().item() for g in grads))
        self.norms.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, self.p) for g in grads]),
                                                   self.p).item())


def recorded_run(tiny_bert, tweets_csv, out, p=2.0, **overrides):
    recorder = GradientRecorder(p)
    run_engine(strategy_args(tiny_bert, out, *tweets_csv, max_steps=6, max_train_samples=64, **overrides),
               callbacks=[recorder])
    return recorder


@pytest.mark.parametrize("engine", [pytest.param("trainer", marks=pytest.mark.slow), "accelerate"])
def test_clip_by_value_bounds_every_gradient_element(engine, tiny_bert, tweets_csv, tmp_path):
    free = recorded_run(tiny_bert, tweets_csv, tmp_path / "free", engine=engine, max_grad_norm=0)
    clipped = recorded_run(tiny_bert, tweets_csv, tmp_path / "clipped", engine=engine, max_grad_norm=0,
                           max_grad_value=0.01, gradient_accumulation_steps=2, per_device_train_batch_size=8)
    assert max(free.max_abs) > 0.05  # without clipping, elements exceed the bound
    assert max(clipped.max_abs) <= 0.01 + 1e-9


@pytest.mark.parametrize("p", [pytest.param(2.0, marks=pytest.mark.slow), pytest.param(1.0, marks=pytest.mark.slow),
                               float("inf")])
@pytest.mark.parametrize("engine", [pytest.param("trainer", marks=pytest.mark.slow), "accelerate"])
def test_clip_by_norm_bounds_the_accumulated_p_norm(engine, p, tiny_bert, tweets_csv, tmp_path):
    bound = {2.0: 0.03, 1.0: 0.6, float("inf"): 0.02}[p]
    free = recorded_run(tiny_bert, tweets_csv, tmp_path / "free", p, engine=engine, max_grad_norm=0)
    # Clipped once, on the gradient accumulated over 2 micro-batches.
    clipped = recorded_run(tiny_bert, tweets_csv, tmp_path / "clipped", p, engine=engine, max_grad_norm=bound,
                           max_grad_norm_type=p, gradient_accumulation_steps=2, per_device_train_batch_size=8)
    assert min(free.norms) > 1.5 * bound  # without clipping, every step exceeds the bound
    assert max(clipped.norms) <= bound * (1 + 1e-4)


@pytest.mark.slow
def test_l1_drives_more_weights_to_zero_than_no_l1(tiny_bert, tweets_csv, tmp_path):
    def near_zero_fraction(out, **penalty):
        run_engine(strategy_args(tiny_bert, out, *tweets_csv, optim="sgd", learning_rate=0.5, max_steps=30,
                                 max_train_samples=64, weight_decay=0, **penalty))
        weights = [w for name, w in load_file(out / "model.safetensors").items()
                   if name.endswith("weight") and "LayerNorm" not in name]
        values = torch.cat([w.flatten() for w in weights])
        return (values.abs() < 1e-3).float().mean().item()

    plain, l1 = near_zero_fraction(tmp_path / "plain"), near_zero_fraction(tmp_path / "l1", l1_lambda=2e-3)
    assert l1 > plain + 0.2, (plain, l1)


def test_penalties_are_logged_and_select_weights_by_default(tiny_bert, tweets_csv, tmp_path):
    history = run_engine(strategy_args(tiny_bert, tmp_path / "out", *tweets_csv, l1_lambda=1e-4, l2_lambda=1e-2,
                                       max_steps=3, max_train_samples=48))[1]
    assert len(step_logs(history, "l1_penalty")) == 3 and all(v > 0 for v in step_logs(history, "l2_penalty"))
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2))
    assert len(Penalties(model, 1.0, 0.0, "weights").params) == 1  # only the Linear weight
    assert len(Penalties(model, 1.0, 0.0, "all").params) == 4
    assert len(Penalties(model, 1.0, 0.0, r"^1\.").params) == 2  # a regex over parameter names


@pytest.mark.parametrize("engine", [pytest.param("trainer", marks=pytest.mark.slow), "accelerate"])
def test_early_stopping_stops_after_patience_flat_evaluations(engine, tiny_bert, tweets_csv, tmp_path):
    # learning_rate 0: eval_loss never improves. Evals at steps 2 (sets the best), 4 and 6 (2 flat) -> stop at 6.
    engine_, _ = run_engine(strategy_args(
        tiny_bert, tmp_path / "out", *tweets_csv, engine=engine, learning_rate=0, max_steps=20,
        eval_strategy="steps", eval_steps=2, do_eval="true", max_eval_samples=16, max_train_samples=64,
        early_stopping_patience=2,
    ))
    assert engine_.state.global_step == 6


def image_args(model, folders, out, **extra):
    train, validation = folders
    return cli_flags(dict(config="image_classification", model_name_or_path=model, output_dir=out, train_file=train,
                          validation_file=validation, report_to="none", disable_tqdm="true", max_steps=5,
                          per_device_train_batch_size=16, learning_rate=5e-3, warmup_steps=0, do_eval="false"), extra)


def bn_tensors(path, suffix):
    return {n: t for n, t in load_file(f"{path}/model.safetensors").items()
            if "normalization" in n and n.endswith(suffix)}


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.slow
def test_frozen_batchnorm_keeps_its_running_stats_and_affine(engine, tiny_resnet, digit_folders, tmp_path):
    before_stats, before_weight = bn_tensors(tiny_resnet, "running_mean"), bn_tensors(tiny_resnet, "weight")
    run_engine(image_args(tiny_resnet, digit_folders, tmp_path / "free", engine=engine))
    run_engine(image_args(tiny_resnet, digit_folders, tmp_path / "frozen", engine=engine,
                          freeze_bn_stats="true", freeze_bn_affine="true"))
    free_stats, frozen_stats = bn_tensors(tmp_path / "free", "running_mean"), bn_tensors(tmp_path / "frozen", "running_mean")
    assert before_stats and all(not torch.equal(free_stats[n], before_stats[n]) for n in before_stats)
    assert all(torch.equal(frozen_stats[n], before_stats[n]) for n in before_stats)
    frozen_weight = bn_tensors(tmp_path / "frozen", "weight")
    assert all(torch.equal(frozen_weight[n], before_weight[n]) for n in before_weight)
    assert not all(torch.equal(bn_tensors(tmp_path / "free", "weight")[n], before_weight[n]) for n in before_weight)


def test_dropout_overrides_reach_the_checkpoint_config(tiny_bert, tweets_csv, tmp_path):
    run_engine(strategy_args(tiny_bert, tmp_path / "out", *tweets_csv, max_steps=1, max_train_samples=16,
                             hidden_dropout=0.2, attention_dropout=0.15, classifier_dropout=0.3))
    config = AutoConfig.from_pretrained(tmp_path / "out")
    assert (config.hidden_dropout_prob, config.attention_probs_dropout_prob, config.classifier_dropout) == (0.2, 0.15, 0.3)
    assert AutoConfig.from_pretrained(tiny_bert).hidden_dropout_prob == 0.0


@pytest.mark.slow
def test_label_smoothing_changes_the_loss_like_the_formula(tiny_bert, tweets_csv, tmp_path):
    plain = step_logs(run_engine(strategy_args(tiny_bert, tmp_path / "a", *tweets_csv, max_steps=8,
                                               max_train_samples=16, engine="accelerate"))[1], "loss")
    smooth = step_logs(run_engine(strategy_args(tiny_bert, tmp_path / "b", *tweets_csv, max_steps=8, max_train_samples=16,
                                                engine="accelerate", label_smoothing_factor=0.5))[1], "loss")
    assert plain[0] == pytest.approx(smooth[0], abs=0.05)  # near-uniform predictions: both ~ln 3
    assert smooth[-1] > plain[-1] + 0.01  # confident predictions pay for the smoothed targets
