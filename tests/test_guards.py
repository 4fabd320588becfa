"""A NaN injected at a known step is caught at that step: the update is skipped, and the run stops
after max_nonfinite_steps bad steps in a row, leaving only finite checkpoints behind."""

import logging

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from conftest import run_engine, strategy_args
from hftune.errors import HftuneError


class InjectNaN(TrainerCallback):
    """The model's `layer` (its classifier, or e.g. lm_head) outputs NaN during the given (1-based) optimizer
    steps; records its weight after each step."""

    def __init__(self, bad_steps, layer="classifier"):
        self.bad_steps, self.layer, self.active, self.hooked, self.weights = set(bad_steps), layer, False, False, {}

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        classifier = getattr(model, "module", model).get_submodule(self.layer)
        if not self.hooked:
            classifier.register_forward_hook(lambda module, inputs, out: out * float("nan") if self.active else out)
            self.hooked = True
        self.active = state.global_step + 1 in self.bad_steps

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.active = False
        self.weights[state.global_step] = \
            getattr(model, "module", model).get_submodule(self.layer).weight.detach().clone()


@pytest.mark.parametrize("engine", [pytest.param("trainer", marks=pytest.mark.slow), "accelerate"])
def test_a_nan_step_is_skipped_and_training_goes_on(engine, tiny_bert, tweets_csv, tmp_path, caplog):
    injector = InjectNaN([3])
    with caplog.at_level(logging.WARNING, logger="hftune"):
        run_engine(strategy_args(tiny_bert, tmp_path / "out", *tweets_csv, engine=engine, max_steps=5,
                                 max_train_samples=64), callbacks=[injector])
    assert "non-finite gradient (NaN or inf) at step 3" in caplog.text
    assert torch.equal(injector.weights[3], injector.weights[2])  # step 3 changed nothing
    assert not torch.equal(injector.weights[4], injector.weights[3])  # step 4 trained again
    assert all(torch.isfinite(w).all() for w in load_file(tmp_path / "out/model.safetensors").values())


@pytest.mark.parametrize("engine", ["trainer", "accelerate"])
@pytest.mark.slow
def test_too_many_nan_steps_in_a_row_stop_the_run(engine, tiny_bert, tweets_csv, tmp_path):
    with pytest.raises(HftuneError, match="at step 5.*Stopped after 3 such step"):
        run_engine(strategy_args(tiny_bert, tmp_path / "out", *tweets_csv, engine=engine, max_steps=10,
                                 max_train_samples=64, save_strategy="steps", save_steps=2),
                   callbacks=[InjectNaN([3, 4, 5])])
    checkpoints = sorted((tmp_path / "out").glob("checkpoint-*"))
    assert [c.name for c in checkpoints] == ["checkpoint-2", "checkpoint-4"]
    for checkpoint in checkpoints:
        assert all(torch.isfinite(w).all() for w in load_file(checkpoint / "model.safetensors").values())


def test_without_skipping_the_first_nan_step_stops_the_run(tiny_bert, tweets_csv, tmp_path):
    with pytest.raises(HftuneError, match="at step 2.*Stopped after 1 such step"):
        run_engine(strategy_args(tiny_bert, tmp_path / "out", *tweets_csv, max_steps=5, max_train_samples=64,
                                 skip_nonfinite_steps="false"), callbacks=[InjectNaN([2])])
