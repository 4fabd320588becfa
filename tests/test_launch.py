"""`accelerate launch` with the shipped configs: the entry point runs as a script, and a 2-process
DDP launch on this GPU-less machine really shards the data (half the optimizer steps) and
matches a single-process run with the same global batch."""

import os

import pytest
from accelerate.commands.config.config_args import load_config_from_file

from conftest import launch, logged_losses, read_json

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(f for f in os.listdir(os.path.join(REPO, "accelerate_configs")) if f.endswith(".yaml"))


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_accelerate_configs_load(name):
    config = load_config_from_file(os.path.join(REPO, "accelerate_configs", name))
    assert config.num_processes >= 1 and config.distributed_type is not None


@pytest.mark.parametrize("engine", ["trainer", "accelerate"])
@pytest.mark.slow
def test_two_process_ddp_shards_and_matches_one_process(engine, tiny_bert, tweets_csv, tmp_path):
    train, validation = tweets_csv
    common = ["--model_name_or_path", tiny_bert, "--train_file", str(train), "--validation_file", str(validation),
              "--label_column", "sentiment", "--report_to", "none", "--max_seq_length", "32",
              "--num_train_epochs", "1", "--logging_steps", "1", "--learning_rate", "1e-3",
              "--disable_tqdm", "true", "--dataloader_drop_last", "true", "--seed", "7",
              "--train_sampling_strategy", "sequential", "--engine", engine,
              # penalties and clipping by value act on the averaged gradient, as on one process
              "--l2_lambda", "1e-3", "--max_grad_value", "0.05"]
    launch("single_device.yaml", 1, common + ["--output_dir", str(tmp_path / "one"),
                                              "--per_device_train_batch_size", "16"], cwd=tmp_path)
    launch("ddp.yaml", 2, common + ["--output_dir", str(tmp_path / "two"),
                                    "--per_device_train_batch_size", "8"], cwd=tmp_path)
    one, two = read_json(tmp_path / "one/trainer_state.json"), read_json(tmp_path / "two/trainer_state.json")
    assert one["global_step"] == two["global_step"] == 320 // 16  # same global batch of 16
    # Two ranks each saw half of every batch: their averaged gradient equals the single-process one.
    for a, b in zip(logged_losses(tmp_path / "one"), logged_losses(tmp_path / "two")):
        assert abs(a - b) < 1e-4, (a, b)


@pytest.mark.slow
def test_two_process_ddp_image_loss_is_not_scaled_by_world_size(tiny_resnet, digit_folders, tmp_path):
    """ResNet's loss is a per-image mean: under DDP it must not be multiplied by the world size.
    (BatchNorm statistics come from each rank's half batch, so only the scale is compared.)"""
    train, validation = digit_folders
    common = ["--config", "image_classification", "--model_name_or_path", tiny_resnet, "--train_file", str(train),
              "--validation_file", str(validation), "--max_steps", "3", "--logging_steps", "1",
              "--disable_tqdm", "true", "--seed", "7", "--train_sampling_strategy", "sequential"]
    launch("single_device.yaml", 1, common + ["--output_dir", str(tmp_path / "one"),
                                              "--per_device_train_batch_size", "16"], cwd=tmp_path)
    launch("ddp.yaml", 2, common + ["--output_dir", str(tmp_path / "two"),
                                    "--per_device_train_batch_size", "8"], cwd=tmp_path)
    one, two = logged_losses(tmp_path / "one")[0], logged_losses(tmp_path / "two")[0]
    assert 0.8 < two / one < 1.25, (one, two)


@pytest.mark.slow
def test_two_process_lbfgs_takes_the_same_steps_as_one_process(tiny_bert, tweets_csv, tmp_path):
    """The closure's loss is averaged over ranks, so both ranks run the same line search."""
    train, validation = tweets_csv
    common = ["--model_name_or_path", tiny_bert, "--train_file", str(train), "--validation_file", str(validation),
              "--label_column", "sentiment", "--report_to", "none", "--max_seq_length", "32", "--max_steps", "3",
              "--logging_steps", "1", "--disable_tqdm", "true", "--seed", "7", "--train_sampling_strategy",
              "sequential", "--engine", "accelerate", "--optim", "lbfgs", "--optim_args", "max_iter=4",
              "--learning_rate", "0.5", "--max_grad_norm", "0", "--weight_decay", "0", "--do_eval", "false"]
    launch("single_device.yaml", 1, common + ["--output_dir", str(tmp_path / "one"),
                                              "--per_device_train_batch_size", "16"], cwd=tmp_path)
    launch("ddp.yaml", 2, common + ["--output_dir", str(tmp_path / "two"),
                                    "--per_device_train_batch_size", "8"], cwd=tmp_path)
    one, two = logged_losses(tmp_path / "one"), logged_losses(tmp_path / "two")
    assert len(one) == len(two) == 3
    assert one == pytest.approx(two, abs=1e-3)
