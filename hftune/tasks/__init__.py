"""Task families: name -> adapter module. Each adapter exposes `build(model_args, data_args, raw)`
returning a TaskBundle: everything the engine needs, with no distribution logic in it.

Example:
    >>> from hftune.tasks import get_task
    >>> get_task("text-classification").__name__
    'hftune.tasks.text_classification'
"""

import importlib
import logging
from dataclasses import dataclass
from typing import Any, Callable

from hftune.assets import resolve_model
from hftune.errors import HftuneError, closest

logger = logging.getLogger("hftune")

TASKS = {
    "text-classification": "hftune.tasks.text_classification",
    "causal-lm": "hftune.tasks.causal_lm",
    "image-classification": "hftune.tasks.image_classification",
}


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


def get_task(name):
    if name not in TASKS:
        raise HftuneError(f"unknown task '{name}'.{closest(name, TASKS)} Valid tasks: {sorted(TASKS)}.")
    return importlib.import_module(TASKS[name])
