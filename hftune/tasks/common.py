"""What every task shares: the bundle a task hands the engine, the model-loading fields and the
from_pretrained settings, and the fields of the text tasks."""

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

from hftune.assets import resolve_model

logger = logging.getLogger("hftune")


@dataclass
class BaseModelArguments:
    """Where the checkpoint comes from and how it loads; features add their model fields beside these."""

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


@dataclass
class TextFields:
    """Data fields of every task that reads text."""

    text_column: str = field(default="text", metadata={"help": "Column holding the (first) text."})
    max_seq_length: int = field(
        default=128, metadata={"help": "Longest tokenized input; longer texts are truncated."}
    )


@dataclass(frozen=True)
class TaskTraits:
    """What the features need to know of a task, so that none of them names one (hftune.tasks.traits)."""

    auto_model: str  # the transformers Auto class of its models (a teacher loads with it; `hftune plan` too)
    output: str  # "classes": a head over the data's labels; "tokens": a language-model head
    inputs: str  # "text" or "image"
    peft_task_type: str = None  # peft's TaskType; None where peft has none


@dataclass
class TaskBundle:
    model: Any
    processor: Any  # tokenizer or image processor; saved beside the model
    train_dataset: Any
    eval_dataset: Any
    data_collator: Callable = None
    compute_metrics: Callable = None
    main_metric: str = "eval_loss"  # the number the end-of-run summary reports
    derived_metrics: Callable = None  # dict of metrics -> extra metrics (e.g. perplexity)
    test_dataset: Any = None
    pipeline_task: str = None  # transformers.pipeline task that loads the saved model
    adapter: Any = None  # hftune.compression.adapters.AdapterSaver under peft: saves what the adapter needs beside it
    predict_inputs: Any = None  # texts of the predict_split (prompts of a causal LM), set for do_predict
    skipped_rows: dict = None  # split -> rows dropped as unusable (empty text, unreadable image)


def pretrained_source(model_args):
    """(local path or Hub id, kwargs) for every from_pretrained call of a task: one revision,
    cache and trust_remote_code setting for model, config and processor alike."""
    kwargs = dict(revision=model_args.model_revision, cache_dir=model_args.cache_dir,
                  trust_remote_code=model_args.trust_remote_code)
    if model_args.trust_remote_code:
        logger.warning(f"trust_remote_code: true runs the Python code shipped with '{model_args.model_name_or_path}' "
                       "on this machine; keep it only for sources you trust.")
    return resolve_model(model_args.model_name_or_path), kwargs


def load_config(model_args, path, common, **task_settings):
    """The checkpoint's config with the task's settings (labels, ...) and the user's dropout overrides."""
    from transformers import AutoConfig

    from hftune.training.regularization import apply_dropout_overrides

    return apply_dropout_overrides(AutoConfig.from_pretrained(path, **task_settings, **common), model_args)
