"""The task, when the config does not name it: inferred where it is unambiguous, from the
checkpoint (what its architecture is for) and from the data (a .txt corpus, an image folder).
An explicit `task` always wins; two answers that disagree, or none, are an error asking for `task`.

What a task takes follows from its TaskTraits: a language-model head and a .txt corpus (no labels)
for a task whose output is tokens, a vision checkpoint and an image folder for one whose inputs are
images, another text model for the rest.

Example:
    >>> infer_task(ModelArguments(model_name_or_path="openai-community/gpt2"), DataArguments(train_file="a.txt"))  # doctest: +SKIP
    ('causal-lm', "the checkpoint's architecture GPT2LMHeadModel and train_file a.txt")
"""

import os

from huggingface_hub.errors import StrictDataclassError

from hftune.assets import resolve_model
from hftune.errors import HftuneError
from hftune.tasks import TASKS, traits


DEFAULT_TASK = "text-classification"  # where the checkpoint cannot be read: loading it names the problem later
# inputs read off the data's columns: a task that takes one is inferred only from such data
SHAPED = ("chat", "words", "question-context", "choices")


def checkpoint_config(model_args):
    """The checkpoint's config, or None where it cannot be read (missing, not a model): the model
    loading reports that in its own words."""
    from transformers import AutoConfig

    if model_args.model_type:
        return AutoConfig.for_model(model_args.model_type)
    if not model_args.model_name_or_path:
        return None
    try:
        return AutoConfig.from_pretrained(
            resolve_model(model_args.model_name_or_path), revision=model_args.model_revision,
            cache_dir=model_args.cache_dir, trust_remote_code=model_args.trust_remote_code)
    except (OSError, ValueError, TypeError, HftuneError, StrictDataclassError):
        return None  # an unreadable config: loading the model names the problem


def checkpoint_kind(config):
    """('lm' | 'image' | 'text' | None, what it was read from): a language-model head for generation,
    a vision model, another text model."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    architectures = config.architectures if isinstance(config.architectures, list) else []  # (checked on loading)
    source = f"the checkpoint's architecture {', '.join(architectures)}" if architectures else \
        f"model_type {config.model_type}"
    if not hasattr(config, "vocab_size") and config.model_type in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES:
        return "image", source
    if architectures:
        is_lm = any(a in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() for a in architectures)
    else:  # a config without weights (model_type): decoder-only families have no masked-LM head
        is_lm = config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and \
            config.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
    if is_lm:
        return "lm", source
    return ("text", source) if hasattr(config, "vocab_size") else (None, source)


def data_kind(data_args):
    """('.txt' | 'folder' | 'chat' | None, what it was read from), from the training data's file:
    chat data is a table whose columns make an sft format (messages, prompt + completion, ...)."""
    path = data_args.train_file
    if not path:
        return None, None
    if os.path.isdir(path):
        return "folder", f"train_file {path} (a folder)"
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".txt":
        return suffix, f"train_file {os.path.basename(path)}"
    if is_chat_table(path, suffix, data_args):
        return "chat", f"the columns of train_file {os.path.basename(path)}"
    if is_word_table(path, suffix):
        return "words", f"the columns of train_file {os.path.basename(path)} (words and their tags)"
    if is_squad_table(path, suffix):
        return "question-context", f"the columns of train_file {os.path.basename(path)} (question, context, answers)"
    if is_choice_table(path, suffix):
        return "choices", f"the columns of train_file {os.path.basename(path)} (endings to choose from)"
    return None, None


def is_choice_table(path, suffix):
    """run_swag.py's ending0, ending1, ... columns, or HellaSwag's `endings` list."""
    try:
        columns = file_columns(path, suffix)
    except (OSError, ValueError):
        return False
    return {"ending0", "ending1"} <= set(columns) or "endings" in columns


def is_squad_table(path, suffix):
    from hftune.data import is_squad_file

    try:
        return (suffix == ".json" and is_squad_file(path)) or \
            {"question", "context", "answers"} <= set(file_columns(path, suffix))
    except (OSError, ValueError):
        return False


def is_word_table(path, suffix):
    from hftune.columns import TAGS, WORDS

    try:
        columns = file_columns(path, suffix)
    except (OSError, ValueError):
        return False
    return any(c in columns for c in WORDS) and any(c in columns for c in TAGS if c.endswith("tags"))


def is_chat_table(path, suffix, data_args):
    from hftune.tasks.chat import Columns, detect_format

    try:
        columns = file_columns(path, suffix)
        detect_format(columns, data_args.data_format, Columns(
            data_args.messages_column, data_args.prompt_column, data_args.completion_column))
    except (OSError, ValueError, HftuneError):
        return False
    return True


def file_columns(path, suffix):
    """The column names of a data file, read from its first record (JSON Lines, CSV) or schema (Parquet)."""
    import csv
    import json

    with open(path, encoding="utf-8", errors="replace") as handle:
        if suffix in (".jsonl", ".json"):
            first = handle.readline().strip()
            if first.startswith("["):  # a JSON array: its first object
                handle.seek(0)
                return list(json.load(handle)[0])
            return list(json.loads(first))
        if suffix == ".csv":
            return next(csv.reader(handle))
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_schema(path).names
    return []


def takes(task_traits):
    """(the checkpoint kind, the data file kinds) a task with these traits takes."""
    if task_traits.inputs == "chat":
        return "lm", ("chat",)
    if task_traits.auto_model == "AutoModelForMaskedLM":  # an encoder's LM head: a .txt corpus to adapt it to
        return "text", (".txt",)
    if task_traits.output == "tokens":
        return "lm", (".txt",)
    if task_traits.inputs == "image":
        return "image", ("folder",)
    if task_traits.inputs in SHAPED:
        return "text", (task_traits.inputs,)
    return "text", ()


def infer_task(model_args, data_args):
    """(task, why) for a config that names none."""
    config = checkpoint_config(model_args)
    kind, model_source = checkpoint_kind(config) if config is not None else (None, None)
    files, data_source = data_kind(data_args)
    # a language model takes chat data for sft, any other data as causal-lm; an encoder takes word-tagged
    # data for token-classification, SQuAD-style data for question-answering, endings to choose from for
    # multiple-choice, a .txt corpus for masked-lm, any other as text-classification
    by_model = {name for name in TASKS if takes(traits(name))[0] == kind
                and (traits(name).inputs in SHAPED) == (files in SHAPED)
                and (traits(name).auto_model != "AutoModelForMaskedLM" or files == ".txt")}  # else a classifier
    by_data = {name for name in TASKS if files in takes(traits(name))[1]}
    if by_data and by_model and not by_model & by_data:
        raise HftuneError(f"task is not set, and {model_source} suggests {' or '.join(sorted(by_model))} while "
                          f"{data_source} suggests {' or '.join(sorted(by_data))}; set task.")
    candidates = (by_model & by_data) or by_data or by_model
    if config is None and not candidates:
        return DEFAULT_TASK, "nothing (the default; the checkpoint's config could not be read)"
    if len(candidates) != 1:
        found = f"could be {' or '.join(sorted(candidates))}" if candidates else "fits no task"
        raise HftuneError(f"task is not set and {model_source} {found}; set task ({', '.join(TASKS)}).")
    why = " and ".join(s for s, c in ((model_source, by_model), (data_source, by_data)) if c)
    return candidates.pop(), why
