"""Config layer: YAML + CLI precedence, unknown keys, types, --help, the saved resolved config."""

from importlib import resources

import pytest
import yaml

from hftune.config import build_parser, field_names, parse_config
from hftune.errors import HftuneError

SHIPPED_RECIPES = sorted(p.name[: -len(".yaml")] for p in (resources.files("hftune") / "recipes").iterdir()
                         if p.name.endswith(".yaml"))


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
        tmp_path, task="causal-lm", report_to=["tensorboard", "none"], concatenate_texts=False,
        lr_scheduler_type="cosine_with_restarts", lr_scheduler_kwargs={"num_cycles": 2}, max_seq_length=None, run_name="-exp1", eval_strategy="no",
    )
    text = open(recipe).read()
    assert "eval_strategy: 'no'" in text
    open(recipe, "w").write(text.replace("eval_strategy: 'no'", "eval_strategy: no"))  # unquoted, as people write
    _, data_args, args = parse_config(["--config", recipe])
    assert args.report_to == ["tensorboard", "none"]
    assert args.run_name == "-exp1" and args.eval_strategy == "no"
    assert data_args.concatenate_texts is False
    assert args.lr_scheduler_kwargs == {"num_cycles": 2}
    assert data_args.max_seq_length is None


def test_a_list_for_a_scalar_field_is_a_type_error(tmp_path):
    with pytest.raises(HftuneError, match="label_column takes a single value"):
        parse_config(["--config", write_recipe(tmp_path, label_column=["a", "b"])])


def test_fields_of_another_task_are_refused(tmp_path):
    with pytest.raises(HftuneError, match="block_size does not apply to task text-classification"):
        parse_config(["--config", write_recipe(tmp_path, block_size=64)])
    with pytest.raises(HftuneError, match="image_column does not apply to task causal-lm"):
        parse_config(["--config", write_recipe(tmp_path, task="causal-lm", image_column="img")])


def test_training_arguments_refusals_become_one_line(tmp_path):
    recipe = write_recipe(tmp_path, load_best_model_at_end=True, eval_strategy="steps", save_strategy="epoch")
    with pytest.raises(HftuneError, match="load_best_model_at_end"):
        parse_config(["--config", recipe])


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
    # A mistyped path is an error even when its file name matches a shipped recipe.
    with pytest.raises(HftuneError, match="config file 'my_exps/causal_lm.yaml' not found"):
        parse_config(["--config", "my_exps/causal_lm.yaml"])


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
    _, data_args, _ = parse_config(["--train-file", "my.csv"])  # argparse's dashed alias
    assert (data_args.dataset_name, data_args.train_file) == (None, "my.csv")


def test_dataset_name_and_files_together_is_an_error(tmp_path):
    recipe = write_recipe(tmp_path, dataset_name="imdb", train_file="a.csv")
    with pytest.raises(HftuneError, match="both dataset_name and train/validation/test files"):
        parse_config(["--config", recipe])
