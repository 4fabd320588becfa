"""Task families: name -> adapter module. Each adapter exposes `build(model_args, data_args, raw)`
returning a TaskBundle (hftune.tasks.common): everything the engine needs, with no distribution
logic in it. A task module also declares `DataFields` (its own data fields, a dataclass: another
task's field is refused), `TRAITS` (a TaskTraits: what features such as PEFT or distillation need to
know of it) and may declare `check_config(model_args, data_args, training_args)`, run once the
config is parsed. Adding a task: its module, its recipe, its metric module and a line here.

Example:
    >>> from hftune.tasks import get_task
    >>> get_task("text-classification").__name__
    'hftune.tasks.text_classification'
"""

import importlib
from dataclasses import fields

from hftune.errors import HftuneError, closest

TASKS = {
    "text-classification": "hftune.tasks.text_classification",
    "causal-lm": "hftune.tasks.causal_lm",
    "masked-lm": "hftune.tasks.masked_lm",
    "sft": "hftune.tasks.sft",
    "token-classification": "hftune.tasks.token_classification",
    "multiple-choice": "hftune.tasks.multiple_choice",
    "question-answering": "hftune.tasks.question_answering",
    "image-classification": "hftune.tasks.image_classification",
}


def get_task(name):
    if name not in TASKS:
        raise HftuneError(f"unknown task '{name}'.{closest(name, TASKS)} Valid tasks: {sorted(TASKS)}.")
    return importlib.import_module(TASKS[name])


def task_fields():
    """Data field -> the tasks that read it: setting one for another task is an error, not a no-op."""
    owners = {}
    for name in TASKS:
        for f in fields(get_task(name).DataFields):
            owners.setdefault(f.name, []).append(name)
    return owners


def traits(name):
    return get_task(name).TRAITS


def tasks_where(**wanted):
    """Names of the tasks whose traits have the wanted values, e.g. tasks_where(output="tokens")."""
    return tuple(name for name in TASKS if all(getattr(traits(name), k) == v for k, v in wanted.items()))
