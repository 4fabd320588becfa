"""Which columns hold the text, the text pair, the label and the image, where the config leaves
them unset: found as run_glue.py and run_classification.py find them, logged, written to the
resolved config. An explicit setting always wins; more than one candidate is an error asking for it.
`text_column: a,b` (run_classification.py's `text_column_names`) joins several columns with a space.

Example:
    >>> detect_columns(raw, data_args)  # doctest: +SKIP
    columns: text_column=sentence1, text_pair_column=sentence2, label_column=label (detected)
"""

import logging
from dataclasses import fields

from datasets import IterableDataset

from hftune.errors import HftuneError
from hftune.tasks import get_task, traits

logger = logging.getLogger("hftune")

TEXT_PAIRS = (("sentence1", "sentence2"), ("question", "sentence"), ("question1", "question2"),
              ("premise", "hypothesis"))
TEXTS = ("text", "sentence")
LABELS = ("label", "labels")
IMAGES = ("image", "img")
WORDS = ("tokens", "words")  # token-classification: a list of words per row (run_ner.py's names) ...
TAGS = ("ner_tags", "pos_tags", "chunk_tags", "tags", "labels", "label")  # ... and a list of their tags


def reads(data_args, name):
    """Whether the run's task reads data field `name` (without a task: every field, found where present)."""
    if data_args.task is None:
        return hasattr(data_args, name)
    return name in {f.name for f in fields(get_task(data_args.task).DataFields)}


def needs_labels(data_args):
    return data_args.task is None or traits(data_args.task).output == "classes"


def _required(data_args, key, value, candidates, columns):
    """A column a task needs and none was found: an error; without a task (data loaded on its own): None."""
    if value is None and data_args.task is not None:
        raise HftuneError(f"no {key.split('_')[0]} column ({' or '.join(candidates)}) among the train split's "
                          f"columns {list(columns)}; set {key}.")
    return value


def _one_of(candidates, columns):
    found = [c for c in candidates if c in columns]
    return found[0] if found else None


def _text(columns, label):
    """The one text column of a table: text/sentence, else the only other string column."""
    known = _one_of(TEXTS, columns)
    if known:
        return known
    others = [name for name, kind in columns.items() if name != label and kind == "string"]
    if len(others) == 1:
        return others[0]
    if not others:
        raise HftuneError(f"no text column found among {list(columns)}; set text_column.")
    raise HftuneError(f"several text columns {others}: set text_column to one, or to '{','.join(others)}' "
                      "to join them (run_classification.py's text_column_names).")


def _string_columns(dataset):
    """column -> "string" for text columns, else its dtype (None for lists, images, ...)."""
    kinds = {name: getattr(feature, "dtype", None) for name, feature in dataset.features.items()}
    return {name: "string" if kind in ("string", "large_string") else kind for name, kind in kinds.items()}


def detect_columns(raw, data_args):
    """Fill data_args' unset column fields from the train split's columns; log what was found."""
    columns = _string_columns(raw["train"])
    found = _word_columns(data_args, columns) if reads_words(data_args) else _table_columns(data_args, columns)
    found = {key: value for key, value in found.items() if value is not None}
    for key, value in found.items():
        setattr(data_args, key, value)
    if found:
        logger.info("columns: " + ", ".join(f"{k}={v}" for k, v in found.items()) + " (detected; set them to change)")
    check_column_types(raw, data_args)
    return join_text_columns(raw, data_args)


def check_column_types(raw, data_args):
    """A column whose rows mix types (datasets reads it as Json) or a text column that holds no text
    would fail deep in the tokenizer or in arrow: name the column and the fix instead."""
    texts = [] if reads_words(data_args) else [getattr(data_args, key) for key in ("text_column", "text_pair_column")
                                               if reads(data_args, key) and getattr(data_args, key)]
    for split, dataset in raw.items():
        if dataset.features is None:  # a stream whose columns are not known yet
            continue
        for name, feature in dataset.features.items():
            if type(feature).__name__ == "Json" and not isinstance(dataset, IterableDataset):  # (rows at hand)
                raise HftuneError(f"column '{name}' of the {split} split mixes value types: {_odd_row(dataset, name)}; "
                                  "give every row the same type.")
        kinds = _string_columns(dataset)
        for name in (n for t in texts for n in t.split(",")):
            kind = kinds.get(name, "string")  # (a missing column is named by the task's own check)
            if kind != "string":
                what = "lists (words?)" if kind is None else f"{kind} values"
                raise HftuneError(f"text_column '{name}' of the {split} split holds {what}, not text; give each "
                                  "row one string" + (" (task: token-classification tags lists of words)."
                                                      if kind is None else ", or set text_column to the text."))


def _kind(value):
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return {str: "a string", dict: "a mapping", bool: "a boolean"}.get(type(value), type(value).__name__)
    return "a number"


def _odd_row(dataset, name):
    """`row 0 holds a list, row 1 a string ('x')`: the first row whose value is of another kind than the first's."""
    values = [(row, value) for row, value in enumerate(dataset[name]) if value is not None]
    first_row, first = values[0]
    row, odd = next((row, value) for row, value in values if _kind(value) != _kind(first))
    return f"row {first_row} holds {_kind(first)}, row {row} {_kind(odd)} ({odd!r})"


def reads_words(data_args):
    return data_args.task is not None and traits(data_args.task).inputs == "words"


def _word_columns(data_args, columns):
    found = {}
    for key, candidates in (("text_column", WORDS), ("label_column", TAGS)):
        if getattr(data_args, key) is None:
            found[key] = _required(data_args, key, _one_of(candidates, columns), candidates, columns)
    return found


def _table_columns(data_args, columns):
    found = {}
    if needs_labels(data_args) and data_args.label_column is None:
        found["label_column"] = _required(data_args, "label_column", _one_of(LABELS, columns), LABELS, columns)
    label = found.get("label_column", data_args.label_column)
    if reads(data_args, "text_column") and data_args.text_column is None:
        pair = next((p for p in TEXT_PAIRS if all(c in columns for c in p)), None)
        if pair and reads(data_args, "text_pair_column") and data_args.text_pair_column is None:
            found["text_column"], found["text_pair_column"] = pair
        elif data_args.task is not None or any(c in columns for c in TEXTS):
            found["text_column"] = _text(columns, label)
    if reads(data_args, "image_column") and data_args.image_column is None:
        found["image_column"] = _required(data_args, "image_column", _one_of(IMAGES, columns), IMAGES, columns)
    return found


def join_text_columns(raw, data_args):
    """`text_column: a,b`: a column of that name holding a and b joined with a space, in every split."""
    names = (data_args.text_column or "").split(",") if reads(data_args, "text_column") else []
    if len(names) < 2:
        return raw
    joined = data_args.text_column
    for split, dataset in raw.items():
        if joined in dataset.column_names:  # joined already (load_raw_datasets, then the task's build)
            continue
        missing = [n for n in names if n not in dataset.column_names]
        if missing:
            raise HftuneError(f"text_column '{joined}': {missing} not among the {split} split's columns "
                              f"{dataset.column_names}.")
        raw[split] = dataset.map(
            lambda batch: {joined: [" ".join("" if t is None else str(t) for t in row)
                                    for row in zip(*(batch[n] for n in names))]}, batched=True)
    return raw
