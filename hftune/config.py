"""Run configuration: HF-named dataclasses, parsed from a YAML recipe plus CLI overrides.

Example:
    >>> from hftune.config import parse_config
    >>> model_args, data_args, training_args = parse_config(["--max_steps", "2"])  # default recipe
"""

import argparse
import json
import os
import re
import sys
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path

import torch
import yaml
from transformers import HfArgumentParser, TrainingArguments

from hftune.compression.adapters import check_peft_args
from hftune.compression.distillation import check_distillation
from hftune.engines import check_training_strategy
from hftune.errors import HftuneError, closest
from hftune.launch.gpu_defaults import bf16_by_default
from hftune.results.hub import check_hub_args
from hftune.compression.quantization import check_quantize_args
from hftune.ranges import DATA_RANGES, TRAINING_RANGES, check_ranges, check_something_to_do
from hftune.training.optim import HF_OPTIMIZERS, HF_SCHEDULES, check_optimizer_name
from hftune.tasks import get_task
from hftune.tasks.causal_lm import check_padding_free

DEFAULT_RECIPE = "text_classification"
CONFIG_FILE = "hftune_config.yaml"  # the resolved config every run writes into output_dir


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default=None,
        metadata={"help": "Hub id, local checkpoint folder, or an offline asset such as 'asset:all-MiniLM-L6-v2'."},
    )
    model_revision: str = field(default="main", metadata={"help": "Hub branch, tag or commit of the checkpoint."})
    cache_dir: str = field(default=None, metadata={"help": "Where downloaded models and data sets are cached."})
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Run modelling code shipped with the checkpoint. Only for sources you trust."}
    )
    ignore_mismatched_sizes: bool = field(
        default=True,
        metadata={"help": "Re-initialise a classification head whose shape differs from the checkpoint's."},
    )
    hidden_dropout: float = field(
        default=None,
        metadata={"help": "Override the checkpoint's hidden/residual dropout (e.g. BERT hidden_dropout_prob)."},
    )
    attention_dropout: float = field(
        default=None, metadata={"help": "Override the checkpoint's attention dropout."}
    )
    classifier_dropout: float = field(
        default=None, metadata={"help": "Override the dropout before the classification head."}
    )
    # PEFT (names as in trl's ModelConfig)
    peft: str = field(
        default=None,
        metadata={"help": "Parameter-efficient fine-tuning through peft: lora, ia3, prefix_tuning or prompt_tuning "
                          "(the last two causal-lm only). DoRA/rsLoRA: peft: lora with use_dora/use_rslora."},
    )
    lora_r: int = field(default=16, metadata={"help": "peft lora: rank of the update matrices."})
    lora_alpha: int = field(default=32, metadata={"help": "peft lora: scaling numerator (alpha / r, or / sqrt(r) for rsLoRA)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "peft lora: dropout on the adapter's input."})
    lora_target_modules: str | list[str] = field(
        default=None,
        metadata={"help": "Modules the adapter wraps (names, a list, or 'all-linear'); default per family: "
                          "attention projections (BERT/GPT-style), convolutions (ResNet-style)."},
    )
    lora_modules_to_save: str | list[str] = field(
        default=None,
        metadata={"help": "Modules trained and saved in full beside the adapter; default for classification: the head."},
    )
    use_dora: bool = field(default=False, metadata={"help": "peft lora: weight-decomposed LoRA (DoRA)."})
    use_rslora: bool = field(default=False, metadata={"help": "peft lora: rank-stabilised scaling alpha / sqrt(r)."})
    num_virtual_tokens: int = field(
        default=20, metadata={"help": "peft prefix_tuning/prompt_tuning: number of virtual tokens."}
    )
    load_in_4bit: bool = field(
        default=False, metadata={"help": "QLoRA: load the base model in 4-bit (bitsandbytes, needs a GPU) under peft: lora."}
    )
    merge_adapter: bool = field(
        default=False, metadata={"help": "After training also write output_dir/merged: base + adapter as a plain checkpoint."}
    )
    # Knowledge distillation
    teacher_model_name_or_path: str = field(
        default=None,
        metadata={"help": "Distill from this fine-tuned teacher (same labels / vocabulary as the student); "
                          "see distill_alpha and distill_temperature."},
    )


@dataclass
class DataArguments:
    task: str = field(
        default="text-classification",
        metadata={"help": "Task family: text-classification, causal-lm or image-classification."},
    )
    dataset_name: str = field(
        default=None, metadata={"help": "Hub data set id, or an offline asset such as 'asset:tweet-sentiment'."}
    )
    dataset_config_name: str = field(default=None, metadata={"help": "Configuration name of the Hub data set."})
    train_file: str = field(
        default=None, metadata={"help": "Local training data: csv, json, jsonl, parquet, txt, or an image folder."}
    )
    validation_file: str = field(default=None, metadata={"help": "Local validation data (same formats)."})
    test_file: str = field(default=None, metadata={"help": "Local test data (same formats)."})
    text_column: str = field(default="text", metadata={"help": "Column holding the (first) text."})
    text_pair_column: str = field(
        default=None, metadata={"help": "Column holding the second text of a pair (text-classification)."}
    )
    label_column: str = field(default="label", metadata={"help": "Column holding the class label."})
    image_column: str = field(
        default="image", metadata={"help": "Column holding images: PIL images, file paths or bytes."}
    )
    max_seq_length: int = field(
        default=128, metadata={"help": "Longest tokenized input; longer texts are truncated."}
    )
    block_size: int = field(
        default=None,
        metadata={"help": "causal-lm: length of training blocks (default: max_seq_length)."},
    )
    concatenate_texts: bool = field(
        default=True,
        metadata={
            "help": "causal-lm: concatenate all texts and cut them into block_size blocks (true), "
            "or truncate each text on its own (false)."
        },
    )
    padding_free: bool = field(
        default=None,
        metadata={
            "help": "causal-lm with concatenate_texts: false: flatten each batch into one row without padding "
            "(DataCollatorWithFlattening; position ids keep every text to itself). Default: on wherever the "
            "model keeps the texts apart exactly, else padded batches; false: always pad."
        },
    )
    isolate_texts: bool = field(
        default=None,
        metadata={
            "help": "causal-lm with concatenate_texts: true: keep each text in a block to itself (position ids "
            "restart per text, so no token attends to or predicts across a text boundary). Default: on wherever "
            "the model keeps the texts apart exactly; false: run_clm.py's blocks, where texts see the ones before."
        },
    )
    max_train_samples: int = field(default=None, metadata={"help": "Keep at most this many training examples."})
    max_eval_samples: int = field(default=None, metadata={"help": "Keep at most this many evaluation examples."})
    validation_split_percentage: float = field(
        default=5,
        metadata={"help": "Percent of train held out for validation when no validation split is given."},
    )
    preprocessing_num_workers: int = field(default=None, metadata={"help": "Processes used by datasets.map."})
    streaming: bool = field(
        default=False,
        metadata={"help": "Read the training data as a stream (datasets IterableDataset) instead of loading it; "
                          "needs max_steps. Each process reads its own rows."},
    )


@dataclass
class HftuneTrainingArguments(TrainingArguments):
    """TrainingArguments plus the few switches hftune adds; every HF name keeps its meaning."""

    do_train: bool = field(default=True, metadata={"help": "Train (TrainingArguments' default is False)."})
    do_eval: bool = field(default=True, metadata={"help": "Evaluate on eval_split after training (or alone, without do_train)."})
    eval_split: str = field(
        default="validation",
        metadata={"help": "Split do_eval evaluates at the end: validation, test or train (evaluation during training "
                          "uses validation); metrics in <split>_results.json."},
    )
    predict_split: str = field(
        default="test",
        metadata={"help": "Split do_predict writes predictions_<split>.jsonl for: test, validation or train."},
    )
    max_new_tokens: int = field(
        default=None, metadata={"help": "causal-lm do_predict: tokens generated (greedily) after each text (default 20)."}
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Allow writing into a non-empty output_dir (its files may be overwritten)."},
    )
    engine: str = field(
        default="trainer",
        metadata={"help": "trainer (HF Trainer), accelerate (a plain Accelerate loop; needed for lbfgs) or "
                          "pipeline (DeepSpeed pipeline parallelism; launch with accelerate_configs/deepspeed_pipeline.yaml)."},
    )
    pipeline_stages: int = field(
        default=None,
        metadata={"help": "engine: pipeline: number of pipeline stages (default: the DeepSpeed config's, else all "
                          "processes); the remaining factor of the world size is data parallelism."},
    )
    ddp_comm_hook: str = field(
        default=None,
        metadata={"help": "Compress DDP gradient communication: fp16, bf16 (NCCL only) or powersgd."},
    )
    powersgd_rank: int = field(default=1, metadata={"help": "ddp_comm_hook powersgd: rank of the low-rank approximation."})
    powersgd_start_iter: int = field(
        default=1000, metadata={"help": "ddp_comm_hook powersgd: plain all-reduce until this iteration (warm start)."}
    )
    # Declared as plain strings so hftune's own names (gd, lbfgs, exponential, ...) parse; TrainingArguments'
    # enum values keep working.
    optim: str = field(
        default=TrainingArguments.default_optim,
        metadata={"help": "sgd, gd, adam, adamw, adagrad, rmsprop, lbfgs, or any TrainingArguments optim; "
                          "hyperparameters (momentum, nesterov, ...) go in optim_args."},
    )
    lr_scheduler_type: str = field(
        default="linear",
        metadata={"help": "constant, linear, cosine, cosine_with_restarts, polynomial, exponential, step, "
                          "reduce_on_plateau, or any TrainingArguments schedule; parameters in lr_scheduler_kwargs."},
    )
    warmup_ratio: float = field(
        default=None, metadata={"help": "Warmup as a fraction of the training steps (alternative to warmup_steps)."}
    )
    max_grad_norm_type: float = field(
        default=2.0, metadata={"help": "p of the p-norm max_grad_norm bounds ('inf' for the max norm)."}
    )
    max_grad_value: float = field(
        default=None, metadata={"help": "Clip every gradient element into [-max_grad_value, max_grad_value]."}
    )
    l1_lambda: float = field(default=0.0, metadata={"help": "L1 penalty l1_lambda * sum|w| added to the loss."})
    l2_lambda: float = field(
        default=0.0, metadata={"help": "Coupled L2 penalty l2_lambda * sum w^2 added to the loss (not weight_decay)."}
    )
    regularize: str = field(
        default="weights",
        metadata={"help": "Parameters the L1/L2 penalties apply to: weights (not biases or norms), all, or a regex."},
    )
    early_stopping_patience: int = field(
        default=None,
        metadata={"help": "Stop after this many evaluations without metric_for_best_model improving."},
    )
    early_stopping_threshold: float = field(
        default=0.0, metadata={"help": "Smallest change of metric_for_best_model that counts as an improvement."}
    )
    freeze_bn_stats: bool = field(
        default=False, metadata={"help": "Keep BatchNorm running statistics as pretrained (CNN fine-tuning)."}
    )
    freeze_bn_affine: bool = field(default=False, metadata={"help": "Freeze BatchNorm scale and shift."})
    skip_nonfinite_steps: bool = field(
        default=True, metadata={"help": "Skip the update of a step whose gradient is NaN/inf (false: stop there)."}
    )
    max_nonfinite_steps: int = field(
        default=3, metadata={"help": "Stop after this many non-finite steps in a row (0 turns the guard off)."}
    )
    # Knowledge distillation (with teacher_model_name_or_path)
    distill_alpha: float = field(
        default=None,
        metadata={"help": "Weight of the task loss: alpha * task + (1 - alpha) * T^2 * KL(teacher || student) "
                          "(default 0.5 with a teacher)."},
    )
    distill_temperature: float = field(
        default=None, metadata={"help": "Softmax temperature T of the distillation targets (default 2.0 with a teacher)."}
    )
    # Pruning
    prune_sparsity: float = field(
        default=None, metadata={"help": "Magnitude-prune the backbone's Linear/Conv weights to this final fraction "
                                        "of zeros, in [0, 1) (see the README's Pruning)."}
    )
    prune_scope: str = field(
        default=None, metadata={"help": "global (one magnitude threshold over all pruned layers; the default) or layer "
                                        "(each layer to the target; the default for channels)."}
    )
    prune_structure: str = field(
        default=None,
        metadata={"help": "unstructured (single weights; the default), channels (conv output channels / linear "
                          "rows) or heads (attention heads)."},
    )
    prune_schedule: str = field(
        default=None,
        metadata={"help": "How sparsity grows from prune_start_step to prune_end_step: cubic (gradual magnitude "
                          "pruning; the default), linear or one_shot."},
    )
    prune_start_step: int = field(default=None, metadata={"help": "Optimizer step at which pruning starts (default 0)."})
    prune_end_step: int = field(
        default=None, metadata={"help": "Step at which prune_sparsity is reached (default: 3/4 of the training steps)."}
    )
    prune_frequency: int = field(default=None, metadata={"help": "Steps between mask updates (default: about 10 updates)."})
    # Hub (push_to_hub, hub_model_id, hub_private_repo, hub_strategy are TrainingArguments' own)
    hub_push_merged: bool = field(
        default=False,
        metadata={"help": "PEFT runs: push the merged model (output_dir/merged, needs merge_adapter: true) instead "
                          "of the adapter; needs hub_strategy: end."},
    )
    # Deployment
    quantize: str = field(
        default=None,
        metadata={"help": "dynamic: also write a post-training dynamic int8 copy of the model to output_dir/quantized."},
    )
    # Not an option: the settings hftune chose for this machine (hftune.launch.gpu_defaults), left out of the
    # resolved config so a re-run elsewhere chooses again.
    machine_defaults: tuple = field(default=(), init=False, repr=False)

    def __post_init__(self):
        check_ranges(self, TRAINING_RANGES)  # before anything computes with a NaN, a negative or a null
        check_something_to_do(self)
        check_optimizer_name(self.optim)
        check_training_strategy(self)  # before TrainingArguments' own checks, which need DeepSpeed installed
        check_quantize_args(self)
        optim, schedule = self.optim, self.lr_scheduler_type
        # TrainingArguments only accepts its own enum names: give it a stand-in for ours (plateau's keeps
        # its eval-strategy check and metric_for_best_model default), then put ours back.
        if optim not in HF_OPTIMIZERS:
            self.optim = "sgd"
        if schedule not in HF_SCHEDULES:
            self.lr_scheduler_type = "reduce_lr_on_plateau" if schedule == "reduce_on_plateau" else "linear"
        if self.warmup_ratio is not None:
            if self.warmup_steps:
                raise HftuneError("set warmup_steps or warmup_ratio, not both.")
            if not 0 <= self.warmup_ratio < 1:
                raise HftuneError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}.")
            self.warmup_steps = self.warmup_ratio
        if self.early_stopping_patience is not None and self.metric_for_best_model is None:
            self.metric_for_best_model = "loss"
        super().__post_init__()
        check_report_to(self.report_to)
        if optim not in HF_OPTIMIZERS:
            self.optim = optim
        if schedule not in HF_SCHEDULES:
            self.lr_scheduler_type = schedule


def check_report_to(report_to):
    """An unknown or uninstalled tracker fails here, not after the data and model have loaded."""
    from transformers.integrations import get_available_reporting_integrations
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    installed = get_available_reporting_integrations()
    for name in report_to or []:
        if name in ("none", "all"):
            continue
        if name not in INTEGRATION_TO_CALLBACK:
            raise HftuneError(f"unknown report_to '{name}'.{closest(name, INTEGRATION_TO_CALLBACK)} "
                              f"Trackers: {sorted(INTEGRATION_TO_CALLBACK)}, all or none.")
        if name not in installed:
            raise HftuneError(f"report_to '{name}' needs its package, which is not installed; pip install it, "
                              "or drop it from report_to.")


CONFIG_CLASSES = (ModelArguments, DataArguments, HftuneTrainingArguments)

# Data fields that only some task families read: setting one for another task is an error, not a no-op.
TASK_FIELDS = {
    "text_column": ("text-classification", "causal-lm"),
    "max_seq_length": ("text-classification", "causal-lm"),
    "text_pair_column": ("text-classification",),
    "block_size": ("causal-lm",),
    "concatenate_texts": ("causal-lm",),
    "padding_free": ("causal-lm",),
    "isolate_texts": ("causal-lm",),
    "image_column": ("image-classification",),
}


class _Yaml12Loader(yaml.SafeLoader):
    """YAML 1.2 booleans: only true/false, so `eval_strategy: no` stays the string 'no'."""


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [r for r in resolvers if r[0] != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


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


def recipe_path(name_or_path):
    """A YAML file on disk, or the name of a recipe shipped in hftune/recipes."""
    if os.path.isfile(name_or_path):
        return Path(name_or_path)
    shipped = resources.files("hftune") / "recipes" / f"{name_or_path}.yaml"
    if os.sep not in name_or_path and shipped.is_file():  # a bare name, never a mistyped path
        return Path(str(shipped))
    names = sorted(p.name[: -len(".yaml")] for p in (resources.files("hftune") / "recipes").iterdir())
    raise HftuneError(f"config file '{name_or_path}' not found; pass a YAML path or a shipped recipe: {names}.")


def load_recipe(path):
    try:
        recipe = yaml.load(Path(path).read_text(), Loader=_Yaml12Loader) or {}
    except yaml.YAMLError as err:
        raise HftuneError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(recipe, dict):
        raise HftuneError(f"{path} must be a mapping of field: value, got {type(recipe).__name__}.")
    known = field_names()
    for key in recipe:
        if key not in known:
            raise HftuneError(f"unknown config key '{key}' in {path}.{closest(key, known)}")
    return recipe


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


def parse_config(argv=None):
    """Parse `--config recipe.yaml` plus CLI overrides into (model, data, training) arguments."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config", default=DEFAULT_RECIPE)
    known, cli = pre.parse_known_args(argv)
    path = recipe_path(known.config)
    recipe = choose_data_source(load_recipe(path), cli, path)
    parser = build_parser()
    recipe_argv, defaults = recipe_to_argv(recipe)
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
        raise HftuneError(f"unknown argument '{flag}'.{closest(flag.lstrip('-'), field_names())}")
    model_args, data_args, training_args = parsed[:3]  # parsed[3]: the namespace holding --config
    training_args.machine_defaults = ("bf16",) if bf16 else ()
    check_data_args(data_args)
    check_peft_args(model_args, data_args, training_args)
    check_distillation(model_args, training_args)
    check_padding_free(model_args, data_args, training_args)
    check_hub_args(model_args, training_args)
    return model_args, data_args, training_args


def check_data_args(data_args):
    """Refuse values that would be silently ignored or make no sense, naming the key."""
    get_task(data_args.task)  # an unknown task name is an error here
    check_ranges(data_args, DATA_RANGES)
    for name, tasks in TASK_FIELDS.items():
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
