"""Config layer: YAML + CLI precedence, unknown keys, types, --help, the saved resolved config."""

import pytest
import yaml

from hftune.config import build_parser, field_names, parse_config
from hftune.errors import HftuneError

SHIPPED_RECIPES = ["text_classification", "causal_lm", "image_classification"]


def write_recipe(tmp_path, **values):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out"), **values}))
    return str(path)


def test_cli_overrides_yaml_and_yaml_overrides_defaults(tmp_path):
    recipe = write_recipe(tmp_path, learning_rate=1e-3, num_train_epochs=2, task="causal-lm")
    model_args, data_args, args = parse_config(["--config", recipe, "--learning_rate", "3e-5"])
    assert args.learning_rate == 3e-5  # CLI wins
    assert args.num_train_epochs == 2  # YAML beats the dataclass default (3.0)
    assert data_args.task == "causal-lm"
    assert data_args.max_seq_length == 128  # untouched default


def test_yaml_types_are_checked_like_cli(tmp_path):
    recipe = write_recipe(tmp_path, learning_rate="fast")
    with pytest.raises(HftuneError, match="learning_rate.*invalid float value: 'fast'"):
        parse_config(["--config", recipe])


def test_yaml_lists_bools_dicts_and_nulls(tmp_path):
    recipe = write_recipe(
        tmp_path, report_to=["none"], concatenate_texts=False,
        lr_scheduler_kwargs={"num_cycles": 2}, max_seq_length=None,
    )
    _, data_args, args = parse_config(["--config", recipe])
    assert args.report_to == [] or args.report_to == ["none"] or args.report_to == "none"
    assert data_args.concatenate_texts is False
    assert args.lr_scheduler_kwargs == {"num_cycles": 2}
    assert data_args.max_seq_length is None


def test_unknown_yaml_key_suggests_closest(tmp_path):
    recipe = write_recipe(tmp_path, learnig_rate=1e-3)
    with pytest.raises(HftuneError, match="unknown config key 'learnig_rate'.*Did you mean 'learning_rate'"):
        parse_config(["--config", recipe])


def test_unknown_cli_flag_suggests_closest(tmp_path):
    with pytest.raises(HftuneError, match="unknown argument '--max_seq_len'.*Did you mean 'max_seq_length'"):
        parse_config(["--config", write_recipe(tmp_path), "--max_seq_len", "64"])


def test_missing_config_file_lists_shipped_recipes():
    with pytest.raises(HftuneError, match="config file 'nope.yaml' not found.*text_classification"):
        parse_config(["--config", "nope.yaml"])


def test_help_lists_every_field_with_its_help():
    text = build_parser().format_help()
    for name in field_names():
        assert f"--{name}" in text, name
    assert "Column holding the class label" in text
    assert "--config" in text


def test_no_config_means_the_default_recipe():
    model_args, data_args, args = parse_config([])
    assert model_args.model_name_or_path == "asset:all-MiniLM-L6-v2"
    assert data_args.dataset_name == "asset:tweet-sentiment"
    assert args.use_cpu  # no accelerator here: CPU mode is chosen, so launches really sync


@pytest.mark.parametrize("name", SHIPPED_RECIPES)
def test_shipped_recipes_validate(name):
    model_args, data_args, args = parse_config(["--config", name])
    assert data_args.task == name.replace("_", "-")
    assert model_args.model_name_or_path.startswith("asset:")


def test_cli_files_replace_the_recipes_dataset(tmp_path):
    recipe = write_recipe(tmp_path, dataset_name="asset:tweet-sentiment", dataset_config_name="x")
    _, data_args, _ = parse_config(["--config", recipe, "--train_file", "my.csv"])
    assert (data_args.dataset_name, data_args.dataset_config_name, data_args.train_file) == (None, None, "my.csv")
    _, data_args, _ = parse_config(["--train_file", "my.csv"])  # the default recipe's data set too
    assert data_args.dataset_name is None


def test_dataset_name_and_files_together_is_an_error(tmp_path):
    recipe = write_recipe(tmp_path, dataset_name="imdb", train_file="a.csv")
    with pytest.raises(HftuneError, match="both dataset_name and train/validation/test files"):
        parse_config(["--config", recipe])
