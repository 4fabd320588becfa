"""Run configuration: HF-named dataclasses, parsed from a YAML recipe plus CLI overrides.

The three argument classes are composed here from their owners' dataclasses: the base fields
(hftune.tasks.common, hftune.data, hftune.training.arguments), every task's `DataFields`
(hftune.tasks) and every feature's `ModelFields` / `TrainingFields` (hftune.features). This module
knows none of them by name: adding a task or a feature does not touch it.

Example:
    >>> from hftune.config import parse_config
    >>> model_args, data_args, training_args = parse_config(["--max_steps", "2"])  # default recipe
"""

import argparse
import json
import sys
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import yaml
from transformers import HfArgumentParser

from hftune.aliases import ALIASES, to_canonical
from hftune.data import BaseDataArguments
from hftune.errors import HftuneError, closest
from hftune.features import feature_modules
from hftune.launch.gpu_defaults import bf16_by_default
from hftune.outputs import CONFIG_FILE
from hftune.ranges import DATA_RANGES, check_ranges
from hftune.recipe_file import load_recipe, recipe_path
from hftune.tasks import TASKS, get_task, task_fields
from hftune.tasks.common import BaseModelArguments
from hftune.tasks.inference import infer_task
from hftune.training.arguments import BaseTrainingArguments

DEFAULT_RECIPE = "text_classification"


def _unique(classes):
    return list(dict.fromkeys(c for c in classes if c is not None))


def compose(name, base, parts, **attributes):
    """One dataclass with the fields of `base`, then of each part in order (a part's field keeps the
    position of its first declaration)."""
    return dataclass(type(name, (*reversed(parts), base), {"__module__": __name__, **attributes}))


FEATURES = feature_modules()

ModelArguments = compose("ModelArguments", BaseModelArguments,
                         _unique(getattr(m, "ModelFields", None) for m in FEATURES))
DataArguments = compose("DataArguments", BaseDataArguments, _unique(get_task(name).DataFields for name in TASKS))
HftuneTrainingArguments = compose(
    "HftuneTrainingArguments", BaseTrainingArguments, _unique(getattr(m, "TrainingFields", None) for m in FEATURES),
    feature_checks=tuple(m.check_training for m in FEATURES if hasattr(m, "check_training")),
)
CONFIG_CLASSES = (ModelArguments, DataArguments, HftuneTrainingArguments)


class _OneLineErrorParser(HfArgumentParser):
    """argparse prints the full usage (hundreds of options) on error; print one line instead."""

    def error(self, message):
        raise HftuneError(f"{message}. Run `hftune --help` for every field.")


def build_parser():
    # No abbreviations: `--max_seq_len` must be an error, not a silent prefix match.
    parser = _OneLineErrorParser(
        CONFIG_CLASSES, description="Fine-tune a Hugging Face checkpoint from one config.", allow_abbrev=False
    )
    parser.add_argument(
        "--config",
        default=None,
        help=f"YAML recipe (a file, or the name of a shipped recipe; default: {DEFAULT_RECIPE}). CLI flags win.",
    )
    return parser


def field_names():
    return {f.name for cls in CONFIG_CLASSES for f in fields(cls) if f.init}


def _declared_type(name):
    """The annotation as written: HfArgumentParser rewrites dataclass `field.type` in place
    (`str | list[str]` becomes `str`), but not the classes' `__annotations__`."""
    for cls in CONFIG_CLASSES:
        for klass in cls.__mro__:
            annotations = vars(klass).get("__annotations__", {})
            if name in annotations:
                return str(annotations[name])
    return ""


def recipe_to_argv(recipe):
    """YAML values become CLI tokens placed before the user's flags: argparse then type-checks
    both the same way, and the last occurrence (the CLI's) wins. `--key=value` keeps values that
    start with '-' intact. Nulls, and lists for `str | list[str]` fields such as report_to (which
    the CLI can only give one value), become parser defaults instead."""
    argv, defaults = [], {}
    for key, value in recipe.items():
        if value is None or (isinstance(value, list) and "list" in _declared_type(key)):
            defaults[key] = value
        elif isinstance(value, list):
            raise HftuneError(f"{key} takes a single value, got the list {value}.")
        elif isinstance(value, dict):
            argv.append(f"--{key}={json.dumps(value)}")
        else:
            argv.append(f"--{key}={str(value).lower() if isinstance(value, bool) else value}")
    return argv, defaults


FILE_SOURCES = ("train_file", "validation_file", "test_file")
HUB_SOURCES = ("dataset_name", "dataset_config_name")


def _flags(argv):
    return set(_flag_values(argv))


def _flag_values(argv):
    """{flag name: value} of `--key=value`, `--key value` and bare `--key` tokens; the last one wins."""
    values = {}
    for i, token in enumerate(argv):
        if token.startswith("--"):
            name, has_value, value = token[2:].partition("=")
            following = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else True
            values[name.replace("-", "_")] = value if has_value else following
    return values


# Settings that exclude each other: choosing one on the command line drops the recipe's other.
ALTERNATIVES = ((FILE_SOURCES, HUB_SOURCES), (("warmup_steps",), ("warmup_ratio",)))


def choose_data_source(recipe, cli, path):
    """Data comes from dataset_name or from files, never both. A CLI choice replaces the recipe's
    (so `hftune --train_file my.csv` leaves the default recipe's data set out); so does
    warmup_ratio for warmup_steps and back."""
    cli_flags = _flags(cli)
    for first, second in ALTERNATIVES:
        for chosen, other in ((first, second), (second, first)):
            if cli_flags & set(chosen):
                recipe = {k: v for k, v in recipe.items() if k not in other}
    recipe_keys = {k for k, v in recipe.items() if v is not None}
    for where, keys in ((path, recipe_keys), ("the command line", cli_flags)):
        if "dataset_name" in keys and keys & set(FILE_SOURCES):
            raise HftuneError(f"{where} sets both dataset_name and train/validation/test files; keep one.")
    return recipe


# Flags that say which run this is: a command line naming any of them starts from the defaults, not the demo.
NAMES_A_RUN = ("model_name_or_path", "model_type", "config_name", "task", "dataset_name", *FILE_SOURCES)


def config_base(config, cli):
    """(recipe path or None, the line saying what the run is built on). A recipe applies when it is
    named, or for the demo: a command line that names its own model, data or task without --config
    starts from TrainingArguments' and the example scripts' defaults, like the scripts themselves."""
    if config is not None:
        return recipe_path(config), f"recipe {config} + the command line"
    named = sorted(_flags(cli) & set(NAMES_A_RUN))
    if named:
        return None, (f"TrainingArguments' defaults + the command line (it names {', '.join(named)}; "
                      f"--config {DEFAULT_RECIPE} would build on the demo recipe)")
    return recipe_path(DEFAULT_RECIPE), f"the demo recipe {DEFAULT_RECIPE} + the command line"


def parse_config(argv=None):
    """Parse `--config recipe.yaml` plus CLI overrides into (model, data, training) arguments."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config", default=None)
    known, cli = pre.parse_known_args(argv)
    cli = to_canonical(cli)
    path, base = config_base(known.config, cli)
    recipe = choose_data_source(load_recipe(path, field_names() | set(ALIASES)), cli, path) if path else {}
    parser = build_parser()
    recipe_argv, defaults = recipe_to_argv(recipe)
    recipe_argv = to_canonical(recipe_argv)
    if not torch.accelerator.is_available():
        # Without this, a multi-process launch on a GPU-less machine silently runs N unsynchronised jobs.
        parser.set_defaults(use_cpu=True)
    bf16 = bf16_by_default(_flag_values(recipe_argv + cli))
    if bf16:
        parser.set_defaults(bf16=True)
    parser.set_defaults(**defaults)
    try:
        *parsed, remaining = parser.parse_args_into_dataclasses(
            args=recipe_argv + cli, return_remaining_strings=True, look_for_args_file=False
        )
    except HftuneError:
        raise
    except ValueError as err:  # TrainingArguments.__post_init__ refusing a combination
        raise HftuneError(str(err).strip().splitlines()[0]) from None
    if remaining:
        flag = next((r for r in remaining if r.startswith("--")), remaining[0])
        if not flag.startswith("--") and flag.endswith((".yaml", ".yml")):
            raise HftuneError(f"'{flag}' looks like a recipe; pass it as --config {flag}.")
        raise HftuneError(f"unknown argument '{flag}'.{closest(flag.lstrip('-'), field_names())}")
    model_args, data_args, training_args = parsed[:3]  # parsed[3]: the namespace holding --config
    training_args.machine_defaults = ("bf16",) if bf16 else ()
    training_args.config_base = base
    if data_args.task is None:
        data_args.task, why = infer_task(model_args, data_args)
        training_args.config_base += f"; task {data_args.task}, inferred from {why}"
    apply_task_defaults(data_args, _flags(recipe_argv + cli) | set(defaults))
    check_data_args(data_args)
    for owner in [*FEATURES, get_task(data_args.task)]:
        if hasattr(owner, "check_config"):
            owner.check_config(model_args, data_args, training_args)
    return model_args, data_args, training_args


def apply_task_defaults(data_args, given):
    """A task's own defaults for fields tasks share (its module's DEFAULTS, e.g. question-answering's
    max_seq_length 384 as run_qa.py), where neither the recipe nor the command line sets them."""
    for name, value in getattr(get_task(data_args.task), "DEFAULTS", {}).items():
        if name not in given:
            setattr(data_args, name, value)


def check_data_args(data_args):
    """Refuse values that would be silently ignored or make no sense, naming the key."""
    get_task(data_args.task)  # an unknown task name is an error here
    check_ranges(data_args, DATA_RANGES)
    for name, tasks in task_fields().items():
        default = DataArguments.__dataclass_fields__[name].default
        if data_args.task not in tasks and getattr(data_args, name) != default:
            raise HftuneError(f"{name} does not apply to task {data_args.task} (only {', '.join(tasks)}); drop it.")
    if not 0 <= data_args.validation_split_percentage < 100:
        raise HftuneError(
            f"validation_split_percentage must be in [0, 100), got {data_args.validation_split_percentage}."
        )


def resolved_config(model_args, data_args, training_args):
    """All fields as one flat mapping, ready to be re-read with --config."""
    resolved = {}
    for args in (model_args, data_args):
        resolved.update({f.name: getattr(args, f.name) for f in fields(args)})
    resolved.update(training_args.to_dict())
    # Secrets never go to disk, and a re-run on another machine picks its own device.
    resolved = {k: v for k, v in resolved.items() if not k.endswith("_token")}
    if resolved.get("warmup_ratio") is not None:  # __post_init__ copied it into warmup_steps
        resolved.pop("warmup_steps")
    if not torch.accelerator.is_available() and resolved.get("use_cpu"):
        resolved.pop("use_cpu")
    for key in training_args.machine_defaults:
        resolved.pop(key)
    return json.loads(json.dumps(resolved, default=str))  # enums and paths as plain values


def save_resolved_config(model_args, data_args, training_args, name=CONFIG_FILE):
    """Write output_dir/hftune_config.yaml (or `name`); re-running it with --config reproduces the run."""
    if not training_args.should_save:
        return None
    path = Path(training_args.output_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(resolved_config(model_args, data_args, training_args), sort_keys=False))
    return path
