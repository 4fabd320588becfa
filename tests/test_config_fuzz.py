"""Property: whatever values a recipe (or the command line) gives a handful of fields — valid ones,
edge values, NaN/inf, negatives, wrong types, nulls, lists — parsing plus hftune's pre-training
checks either return a config whose numbers are in range or stop with one clean HftuneError line.
Never another exception, never a multi-line message."""

import math

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hftune.config import parse_config
from hftune.errors import HftuneError
from hftune.run import check_inputs

junk = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**40), 2**40),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.lists(st.integers(-3, 3), max_size=2), st.dictionaries(st.sampled_from("ab"), st.integers(), max_size=1),
)
edge_numbers = st.sampled_from([0, 1, -1, 0.5, 1.0, 1.5, 2, 1e-5, -1e-5, 10**6])


def field(valid):
    """Mostly plausible values, often edge values, sometimes junk of any type."""
    return st.one_of(valid, valid, valid, edge_numbers, junk)


FIELDS = {
    "learning_rate": field(st.floats(0, 1)),
    "num_train_epochs": field(st.floats(0, 5)),
    "max_steps": field(st.integers(-2, 50)),
    "per_device_train_batch_size": field(st.integers(0, 64)),
    "gradient_accumulation_steps": field(st.integers(0, 8)),
    "warmup_ratio": field(st.floats(0, 1)),
    "warmup_steps": field(st.integers(0, 100)),
    "max_grad_norm": field(st.floats(-1, 10)),
    "label_smoothing_factor": field(st.floats(0, 1)),
    "weight_decay": field(st.floats(0, 0.5)),
    "adam_beta2": field(st.floats(0.9, 1)),
    "seed": field(st.integers(0, 2**32)),
    "logging_steps": field(st.integers(0, 100)),
    "save_total_limit": field(st.integers(-1, 5)),
    "max_seq_length": field(st.integers(0, 512)),
    "max_train_samples": field(st.integers(0, 1000)),
    "validation_split_percentage": field(st.floats(0, 100)),
    "eval_strategy": field(st.sampled_from(["no", "steps", "epoch", "sometimes"])),
    "save_strategy": field(st.sampled_from(["no", "steps", "epoch", "best"])),
    "load_best_model_at_end": field(st.booleans()),
    "fp16": field(st.booleans()),
    "bf16": field(st.booleans()),
    "do_train": field(st.booleans()),
    "do_eval": field(st.booleans()),
    "lr_scheduler_type": field(st.sampled_from(["linear", "cosine", "step", "reduce_on_plateau", "cosin"])),
    "optim": field(st.sampled_from(["adamw_torch", "sgd", "lbfgs", "adamx"])),
    "report_to": field(st.sampled_from(["none", ["none"], "tensorboard", "wandbx"])),
    "task": field(st.sampled_from(["text-classification", "causal-lm", "image-classification"])),
}

# Checked on every config that parses: the ranges a training run can work with.
IN_RANGE = {
    "learning_rate": lambda v: math.isfinite(v) and v >= 0,
    "num_train_epochs": lambda v: math.isfinite(v) and v >= 0,
    "per_device_train_batch_size": lambda v: v >= 1,
    "gradient_accumulation_steps": lambda v: v >= 1,
    "warmup_steps": lambda v: math.isfinite(v) and v >= 0,
    "max_grad_norm": lambda v: math.isfinite(v) and v >= 0,
    "label_smoothing_factor": lambda v: 0 <= v < 1,
    "weight_decay": lambda v: math.isfinite(v) and v >= 0,
    "seed": lambda v: 0 <= v < 2**32,
    "logging_steps": lambda v: v > 0,
}


@settings(max_examples=120, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(values=st.dictionaries(st.sampled_from(sorted(FIELDS)), st.none(), min_size=1, max_size=6).flatmap(
    lambda keys: st.fixed_dictionaries({k: FIELDS[k] for k in keys})), on_cli=st.booleans())
def test_any_config_values_give_a_valid_config_or_one_clean_error(values, on_cli, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    recipe = folder / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"output_dir": str(folder / "out"), "train_file": "t.csv",
                                      **({} if on_cli else values)}))
    cli = [f"--{k}={v}" for k, v in values.items()] if on_cli else []
    try:
        model_args, data_args, training_args = parse_config(["--config", str(recipe), *cli])
        check_inputs(model_args, data_args, training_args)
    except HftuneError as err:
        message = str(err)
        assert message and "\n" not in message and "Traceback" not in message, message
        return
    for name, ok in IN_RANGE.items():
        assert ok(getattr(training_args, name)), (name, getattr(training_args, name))
    assert training_args.do_train or training_args.do_eval or training_args.do_predict
    assert not (training_args.fp16 and training_args.bf16)
    assert data_args.max_seq_length is None or data_args.max_seq_length >= 1


@pytest.mark.parametrize("flags, fragment", [
    (["--learning_rate", "-0.1"], "learning_rate must be >= 0 (a finite number), got -0.1"),
    (["--learning_rate", "nan"], "learning_rate must be >= 0 (a finite number), got nan"),
    (["--num_train_epochs", "0"], "num_train_epochs is 0 and max_steps is not set"),
    (["--per_device_train_batch_size", "0"], "per_device_train_batch_size must be an integer >= 1, got 0"),
    (["--gradient_accumulation_steps", "0"], "gradient_accumulation_steps must be an integer >= 1"),
    (["--warmup_ratio", "1.5"], "warmup_ratio must be in [0, 1), got 1.5"),
    (["--max_grad_norm", "-1"], "max_grad_norm must be >= 0 (a finite number; 0 turns"),
    (["--label_smoothing_factor", "2"], "label_smoothing_factor must be in [0, 1), got 2.0"),
    (["--weight_decay", "inf"], "weight_decay must be >= 0 (a finite number), got inf"),
    (["--seed", "-1"], "seed must be an integer in [0, 2**32)"),
    (["--max_seq_length", "0"], "max_seq_length must be an integer >= 1, got 0"),
    (["--max_train_samples", "-1"], "max_train_samples must be an integer >= 1, got -1"),
    (["--save_steps", "0", "--save_strategy", "steps"], "save_steps must be > 0 (a finite number)"),
    (["--fp16", "true", "--bf16", "true"], "fp16 and bf16"),
    (["--load_best_model_at_end", "true", "--eval_strategy", "steps", "--save_strategy", "epoch"],
     "load_best_model_at_end requires the save and eval strategy to match"),
    (["--do_train", "false", "--do_eval", "false"], "do_train, do_eval and do_predict are all false"),
    (["--per_device_train_batch_size", "eight"], "invalid int value: 'eight'"),
])
def test_out_of_range_and_contradictory_values_are_named(flags, fragment, tmp_path):
    with pytest.raises(HftuneError) as err:
        parse_config(["--output_dir", str(tmp_path), *flags])
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_a_null_for_a_field_that_needs_a_value(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("learning_rate: null\n")
    with pytest.raises(HftuneError, match="learning_rate cannot be null; .* drop the key to keep the default 5e-05"):
        parse_config(["--config", str(recipe), "--output_dir", str(tmp_path)])
