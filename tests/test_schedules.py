"""Every learning-rate schedule follows its closed-form formula at every logged step."""

import math

import pytest

from conftest import run_engine, step_logs, strategy_args

LR, WARMUP, STEPS, PER_EPOCH = 0.01, 3, 12, 4  # 16 examples / batch 4 = 4 steps per epoch


def warm(t):
    return t / WARMUP


def after(t):
    """Progress through the decay phase, 0 at the end of warmup, 1 at the last step."""
    return (t - WARMUP) / (STEPS - WARMUP)


# name -> (lr_scheduler_kwargs, lr used at 0-based step t after warmup)
SCHEDULES = {
    "constant": ({}, lambda t: LR),
    "linear": ({}, lambda t: LR * (1 - after(t))),
    "cosine": ({"min_lr": 0.002}, lambda t: 0.002 + (LR - 0.002) * 0.5 * (1 + math.cos(math.pi * after(t)))),
    "cosine_with_restarts": ({"num_cycles": 2},
                             lambda t: LR * 0.5 * (1 + math.cos(math.pi * ((2 * after(t)) % 1.0)))),
    "polynomial": ({"power": 2.0, "lr_end": 1e-4}, lambda t: 1e-4 + (LR - 1e-4) * (1 - after(t)) ** 2),
    "exponential": ({"gamma": 0.8}, lambda t: LR * 0.8 ** (t - WARMUP)),
    "exponential-per-epoch": ({"gamma": 0.5, "interval": "epoch"},
                              lambda t: LR * 0.5 ** ((t - WARMUP) // PER_EPOCH)),
    "step": ({"step_size": 2, "gamma": 0.5}, lambda t: LR * 0.5 ** ((t - WARMUP) // 2)),
}


def expected_rates(formula):
    return [LR * warm(t) if t < WARMUP else formula(t) for t in range(STEPS)]


# the fast tier keeps hftune's own exponential and step schedules; the rest run in the full suite
SLOW_SCHEDULES = ("constant", "linear", "cosine", "cosine_with_restarts", "polynomial", "exponential-per-epoch")


@pytest.mark.parametrize("schedule", [pytest.param(s, marks=pytest.mark.slow) if s in SLOW_SCHEDULES else s
                                      for s in SCHEDULES])
def test_logged_learning_rate_follows_the_formula(schedule, tiny_bert, tweets_csv, tmp_path):
    kwargs, formula = SCHEDULES[schedule]
    args = strategy_args(tiny_bert, tmp_path / "out", *tweets_csv, lr_scheduler_type=schedule.split("-")[0],
                         lr_scheduler_kwargs=str(kwargs).replace("'", '"'), learning_rate=LR,
                         warmup_steps=WARMUP, max_steps=STEPS, max_train_samples=16, per_device_train_batch_size=4)
    history = run_engine(args)[1]
    assert step_logs(history, "learning_rate") == pytest.approx(expected_rates(formula), rel=1e-6, abs=1e-12)
    losses = step_logs(history, "loss")  # and the 16 examples are learned: the last epoch beats the first
    assert sum(losses[-PER_EPOCH:]) < sum(losses[:PER_EPOCH]) - 0.05 * PER_EPOCH, losses


@pytest.mark.parametrize("engine", ["trainer", "accelerate"])
@pytest.mark.slow
def test_reduce_on_plateau_warms_up_then_halves_after_each_flat_evaluation(engine, tiny_bert, tweets_csv, tmp_path):
    # threshold 10 (relative): no evaluation ever counts as an improvement, so with patience 0 every
    # evaluation after warmup halves the rate.
    args = strategy_args(
        tiny_bert, tmp_path / "out", *tweets_csv, engine=engine, lr_scheduler_type="reduce_on_plateau",
        lr_scheduler_kwargs='{"factor": 0.5, "patience": 0, "threshold": 10}', learning_rate=LR, warmup_steps=2,
        max_steps=8, eval_strategy="steps", eval_steps=2, do_eval="true", max_train_samples=64, max_eval_samples=16,
    )
    logged = step_logs(run_engine(args)[1], "learning_rate")
    assert logged == pytest.approx([0.0, LR / 2] + [LR * 0.5 ** ((t - 1) // 2) for t in range(3, 9)], rel=1e-6)


@pytest.mark.slow
def test_warmup_ratio_is_a_fraction_of_the_training_steps(tiny_bert, tweets_csv, tmp_path):
    args = strategy_args(tiny_bert, tmp_path / "out", *tweets_csv, lr_scheduler_type="linear", learning_rate=LR,
                         warmup_ratio=WARMUP / STEPS, max_steps=STEPS, max_train_samples=16,
                         per_device_train_batch_size=4)
    logged = step_logs(run_engine(args)[1], "learning_rate")
    assert logged == pytest.approx(expected_rates(SCHEDULES["linear"][1]), rel=1e-6, abs=1e-12)
