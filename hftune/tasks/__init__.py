"""Task families: name -> adapter module. Each adapter exposes `build(model_args, data_args, raw)`
returning a TaskBundle: everything the engine needs, with no distribution logic in it.

Example:
    >>> from hftune.tasks import get_task
    >>> get_task("text-classification").__name__
    'hftune.tasks.text_classification'
"""

import importlib
from dataclasses import dataclass
from typing import Any, Callable

from hftune.errors import HftuneError, closest

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


def get_task(name):
    if name not in TASKS:
        raise HftuneError(f"unknown task '{name}'.{closest(name, TASKS)} Valid tasks: {sorted(TASKS)}.")
    return importlib.import_module(TASKS[name])
