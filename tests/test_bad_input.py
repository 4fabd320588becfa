"""Every bad input ends the run before training with one clear line and exit status 2."""

import os
import subprocess
import sys

import pandas as pd
import pytest

from conftest import fail

from hftune.training.checkpoints import seal

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def base(tiny_bert, tweets_csv, tmp_path):
    train, validation = tweets_csv
    return ["--model_name_or_path", tiny_bert, "--train_file", str(train), "--validation_file", str(validation),
            "--label_column", "sentiment", "--output_dir", str(tmp_path / "out"), "--report_to", "none"]


def test_missing_file(capsys, base, tmp_path):
    line = fail(capsys, base + ["--train_file", str(tmp_path / "nope.csv")])
    assert "train_file" in line and "nope.csv" in line and "does not exist" in line


def test_misspelled_column_suggests_the_right_one(capsys, base):
    line = fail(capsys, base + ["--text_column", "txet"])
    assert "text_column 'txet' is not a column" in line and "Did you mean 'text'" in line


def test_missing_label_column(capsys, base):
    line = fail(capsys, base + ["--label_column", "stars"])
    assert "label_column 'stars'" in line and "Columns: ['text', 'sentiment']" in line


def test_unknown_task(capsys, base):
    line = fail(capsys, base + ["--task", "text-clasification"])
    assert "unknown task 'text-clasification'" in line and "Did you mean 'text-classification'" in line


def test_unknown_config_key(capsys, base, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("learning_rat: 0.1\n")
    line = fail(capsys, ["--config", str(recipe)] + base)
    assert "unknown config key 'learning_rat'" in line and "Did you mean 'learning_rate'" in line


def test_validation_label_never_seen_in_train(capsys, base, tmp_path):
    pd.DataFrame({"text": ["good", "bad"] * 5, "sentiment": ["pos", "neg"] * 5}).to_csv(tmp_path / "t.csv", index=False)
    pd.DataFrame({"text": ["meh", "good"], "sentiment": ["neutral", "pos"]}).to_csv(tmp_path / "v.csv", index=False)
    line = fail(capsys, base + ["--train_file", str(tmp_path / "t.csv"), "--validation_file", str(tmp_path / "v.csv")])
    assert "validation split has label(s) ['neutral'] that never occur in train" in line


def test_empty_data_set(capsys, base, tmp_path):
    (tmp_path / "empty.csv").write_text("text,sentiment\n")
    line = fail(capsys, base + ["--train_file", str(tmp_path / "empty.csv")])
    assert "train_file" in line and "has no rows" in line


def test_checkpoint_that_does_not_exist(capsys, base, tmp_path):
    line = fail(capsys, base + ["--resume_from_checkpoint", str(tmp_path / "checkpoint-7")])
    assert "resume_from_checkpoint" in line and "does not exist" in line


def test_model_that_does_not_exist(capsys, base, tmp_path):
    line = fail(capsys, base + ["--model_name_or_path", str(tmp_path / "no-such-model")])
    assert "is not a folder" in line and "no-such-model" in line


def test_non_empty_output_dir_is_not_overwritten(capsys, base, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.txt").write_text("precious")
    line = fail(capsys, base)
    assert "output_dir" in line and "overwrite_output_dir" in line
    assert sorted(os.listdir(out)) == ["results.txt"] and (out / "results.txt").read_text() == "precious"


def test_wrong_type_on_the_command_line(capsys, base):
    line = fail(capsys, base + ["--num_train_epochs", "many"])
    assert "--num_train_epochs" in line and "'many'" in line


@pytest.mark.slow
def test_script_entry_point_exits_2_with_one_line(tmp_path):
    """`accelerate launch hftune/run.py` runs the file as a script: same clean error and status."""
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "hftune", "run.py"), "--task", "nope", "--output_dir", str(tmp_path)],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("hftune: error: unknown task 'nope'")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("entry", [["-m", "hftune"], ["console"]])
@pytest.mark.slow
def test_module_and_console_script_entry_points(entry, tmp_path):
    """`python -m hftune` and the `hftune` console script run the same main."""
    cmd = [os.path.join(os.path.dirname(sys.executable), "hftune")] if entry == ["console"] else [sys.executable, *entry]
    result = subprocess.run(cmd + ["--task", "nope", "--output_dir", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 2 and "unknown task 'nope'" in result.stderr
    assert subprocess.run(cmd + ["--help"], capture_output=True, text=True).stdout.count("--model_name_or_path") >= 1


def test_resume_false_does_not_unlock_a_non_empty_output_dir(capsys, base, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.txt").write_text("precious")
    line = fail(capsys, base + ["--resume_from_checkpoint", "false"])
    assert "is not empty" in line and (out / "results.txt").read_text() == "precious"


def test_no_train_split(capsys, base):
    assert base[2] == "--train_file"
    line = fail(capsys, base[:2] + base[4:])  # only a validation_file
    assert "no train split" in line


def test_test_file_without_do_predict_would_be_ignored(capsys, base, tweets_csv):
    _, validation = tweets_csv
    line = fail(capsys, base + ["--test_file", str(validation)])
    assert "test_file is set but do_predict is false" in line


def test_model_name_or_path_unset(capsys, base):
    line = fail(capsys, base + ["--model_name_or_path", ""])
    assert "model_name_or_path is not set" in line


STRATEGY_ERRORS = {
    "unknown optimizer": (["--optim", "adamx"], ["unknown optim 'adamx'", "Did you mean 'adam", "'lbfgs'"]),
    "unknown schedule": (["--lr_scheduler_type", "cosin"], ["unknown lr_scheduler_type 'cosin'", "'exponential'"]),
    "missing schedule parameter": (["--lr_scheduler_type", "step"], ["needs ['step_size']", "optional"]),
    "unknown schedule parameter": (["--lr_scheduler_type", "exponential", "--lr_scheduler_kwargs", '{"gamma": 0.9, "gama": 1}'],
                                   ["does not take ['gama']"]),
    "bad schedule interval": (["--lr_scheduler_type", "exponential", "--lr_scheduler_kwargs",
                               '{"gamma": 0.9, "interval": "week"}'], ["interval must be 'step' or 'epoch'"]),
    "unknown optimizer argument": (["--optim", "sgd", "--optim_args", "momentun=0.9"],
                                   ["optim_args ['momentun'] do not apply to optim sgd", "'momentum'"]),
    "invalid optimizer value": (["--optim", "sgd", "--optim_args", "nesterov=true"], ["optim sgd", "Nesterov"]),
    "negative l1": (["--l1_lambda", "-0.1"], ["l1_lambda must be >= 0"]),
    "negative l2": (["--l2_lambda", "-1"], ["l2_lambda must be >= 0"]),
    "non-positive clip value": (["--max_grad_value", "0"], ["max_grad_value must be > 0"]),
    "lbfgs under trainer": (["--optim", "lbfgs", "--weight_decay", "0"], ["needs engine: accelerate"]),
    "lbfgs with default clipping": (["--optim", "lbfgs", "--engine", "accelerate", "--weight_decay", "0"],
                                    ["max_grad_norm > 0", "set max_grad_norm: 0"]),
    "lbfgs with weight decay": (["--optim", "lbfgs", "--engine", "accelerate", "--max_grad_norm", "0",
                                 "--weight_decay", "0.01"],
                                ["has no weight decay", "l2_lambda"]),
    "lbfgs with accumulation": (["--optim", "lbfgs", "--engine", "accelerate", "--max_grad_norm", "0",
                                 "--weight_decay", "0", "--gradient_accumulation_steps", "2"],
                                ["gradient_accumulation_steps > 1"]),
    "gd with accumulation": (["--optim", "gd", "--gradient_accumulation_steps", "4"], ["drop gradient_accumulation_steps"]),
    "unknown engine": (["--engine", "deepspeed"], ["unknown engine 'deepspeed'", "'accelerate'"]),
    "greedy schedule on accelerate": (["--engine", "accelerate", "--lr_scheduler_type", "greedy",
                                       "--eval_strategy", "steps"], ["greedy needs engine: trainer"]),
    "trainer-only feature on accelerate": (["--engine", "accelerate", "--torch_compile", "true"],
                                           ["torch_compile is implemented by Trainer's loop only"]),
    "both warmups": (["--warmup_steps", "10", "--warmup_ratio", "0.1"], ["warmup_steps or warmup_ratio"]),
    "early stopping without evaluation": (["--early_stopping_patience", "2", "--eval_strategy", "no"],
                                          ["early_stopping_patience needs", "eval_strategy"]),
    "plateau without evaluation": (["--lr_scheduler_type", "reduce_on_plateau", "--eval_strategy", "no"],
                                   ["reduce_on_plateau steps on evaluations", "eval_strategy: steps or epoch"]),
    "BatchNorm freezing on a model without BatchNorm": (["--freeze_bn_stats", "true"], ["has no BatchNorm layer"]),
    "dropout out of range": (["--hidden_dropout", "1.5"], ["hidden_dropout must be in [0, 1)"]),
    "regex matching nothing": (["--l1_lambda", "0.1", "--regularize", "^decoder\\."], ["matches no trainable parameter"]),
}


@pytest.mark.parametrize("case", STRATEGY_ERRORS)
def test_bad_strategy_is_one_line_before_training(case, capsys, base, tmp_path):
    flags, fragments = STRATEGY_ERRORS[case]
    line = fail(capsys, base + ["--warmup_steps", "0"] + flags)
    for fragment in fragments:
        assert fragment in line, line
    assert not (tmp_path / "out" / "trainer_state.json").exists()


DEEPSPEED_ERRORS = {
    "clip by value": (["--max_grad_value", "0.5"], "max_grad_value cannot be honoured under DeepSpeed"),
    "p-norm": (["--max_grad_norm_type", "1"], "DeepSpeed's gradient_clipping is a 2-norm"),
    "penalty under ZeRO-3": (["--l1_lambda", "0.1"], "FSDP and ZeRO-3 shard them"),
}


@pytest.mark.parametrize("case", DEEPSPEED_ERRORS)
def test_what_deepspeed_cannot_honour_is_refused(case, capsys, base, monkeypatch):
    # what `accelerate launch` with a DeepSpeed ZeRO-3 config sets
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    flags, fragment = DEEPSPEED_ERRORS[case]
    assert fragment in fail(capsys, base + flags)


def test_dropout_the_model_family_does_not_have(capsys, tiny_resnet, digit_folders, tmp_path):
    train, validation = digit_folders
    line = fail(capsys, ["--config", "image_classification", "--model_name_or_path", tiny_resnet, "--train_file",
                         str(train), "--validation_file", str(validation), "--output_dir", str(tmp_path / "out"),
                         "--hidden_dropout", "0.1"])
    assert "hidden_dropout does not apply to ResNetConfig" in line


def test_a_checkpoint_of_the_other_engine_is_refused(capsys, base, tmp_path):
    (tmp_path / "out" / "checkpoint-3" / "engine_state").mkdir(parents=True)  # what engine: accelerate writes
    (tmp_path / "out" / "checkpoint-3" / "trainer_state.json").write_text("{}")
    seal(tmp_path / "out" / "checkpoint-3")
    line = fail(capsys, base + ["--resume_from_checkpoint", "true"])
    assert "was written by engine: accelerate; resume it with engine: accelerate" in line


def test_evaluation_without_a_validation_split(capsys, base):
    line = fail(capsys, base[:4] + base[6:] + ["--validation_split_percentage", "0", "--eval_strategy", "steps"])
    assert "eval_strategy steps needs a validation split" in line
