"""multiple-choice: pick the right ending (or answer) of a context, as run_swag.py does (SWAG, HellaSwag).

Each row holds a context, its endings and the index of the right one. Each (context, ending) pair is one
sequence, as run_swag.py builds it: first sentence the context, second the question header (the start of
every ending: SWAG's `sent2`, HellaSwag's `ctx_b`) and the ending; AutoModelForMultipleChoice scores
each ending and a softmax over a row's endings is trained with cross-entropy. Columns, detected: the
context `sent1` + header `sent2` (run_swag.py), `ctx_a` + `ctx_b` (HellaSwag), else `ctx`, `context` or
`question` alone; the endings `ending0,ending1,...` or a list column `endings` / `choices`; the label
`label`: the right ending's index, or its digits as a string (HellaSwag's "0".."3"). Metric:
`eval_accuracy`. transformers has no multiple-choice pipeline: the card shows the model class instead.

Example:
    >>> choice_index("3", 4, "validation", 7, "label")
    3
    >>> second_sentence("he", "is ripping level tiles off.")
    'he is ripping level tiles off.'
"""

import logging
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import AutoModelForMultipleChoice, AutoTokenizer, DataCollatorForMultipleChoice

from hftune.data import apply_batched, limit_splits, require_columns
from hftune.errors import HftuneError
from hftune.metrics import load_metric
from hftune.tasks.common import (
    TaskBundle, TaskTraits, check_room, load_config, load_weights, pretrained_source, processor_path,
)

logger = logging.getLogger("hftune")

CONTEXT_PAIRS = (("sent1", "sent2"), ("ctx_a", "ctx_b"))  # (context, the header every ending starts with)
CONTEXTS = ("ctx", "context", "question")
ENDING_LISTS = ("endings", "choices")
USAGE = ('from transformers import AutoModelForMultipleChoice, AutoTokenizer  # transformers has no multiple-choice '
         'pipeline\n\ntokenizer = AutoTokenizer.from_pretrained("{ref}")\n'
         'model = AutoModelForMultipleChoice.from_pretrained("{ref}")')


@dataclass
class DataFields:
    """multiple-choice's own data fields (label_column: the index of the right ending). Not `context_column`:
    question-answering's has another default, and one composed field has one."""

    first_sentence_column: str = field(
        default=None, metadata={"help": "multiple-choice: the context column (run_swag.py's sent1; default: detected, "
                                        "sent1, ctx_a, ctx, context or question)."})
    question_header_column: str = field(
        default=None, metadata={"help": "multiple-choice: a column whose text starts every ending (run_swag.py's sent2; "
                                        "default: sent2 beside sent1, ctx_b beside ctx_a)."})
    ending_columns: str = field(
        default=None, metadata={"help": "multiple-choice: the endings, comma-separated columns or one list column "
                                        "(default: ending0,ending1,... or endings / choices, detected)."})
    max_seq_length: int = field(default=128, metadata={"help": "Longest tokenized input; longer texts are truncated."})
    pad_to_max_length: bool = field(
        default=False, metadata={"help": "Pad every text to max_seq_length (run_glue.py's and run_swag.py's option; "
                                         "the default pads each batch to its longest text: same results, less compute)."})


TRAITS = TaskTraits(auto_model="AutoModelForMultipleChoice", output="classes", inputs="choices")  # peft has no TaskType


def detect_columns(columns, data_args):
    """Fill the unset column fields from the train split's columns (an explicit setting wins); log them."""
    found = {}
    if data_args.ending_columns is None:
        numbered = []
        while f"ending{len(numbered)}" in columns:
            numbered.append(f"ending{len(numbered)}")
        found["ending_columns"] = ",".join(numbered) if len(numbered) > 1 else \
            next((c for c in ENDING_LISTS if c in columns), None)
    if data_args.first_sentence_column is None:
        pair = next((p for p in CONTEXT_PAIRS if all(c in columns for c in p)), None)
        found["first_sentence_column"] = pair[0] if pair else next((c for c in CONTEXTS if c in columns), None)
        if pair and data_args.question_header_column is None:
            found["question_header_column"] = pair[1]
    wanted = {"ending_columns": "ending columns (ending0, ending1, ... or endings / choices)",
              "first_sentence_column": "context column (sent1, ctx_a, ctx, context or question)"}
    for key, value in found.items():
        if value is None:
            raise HftuneError(f"no {wanted[key]} among the train split's columns {list(columns)}; set {key}.")
        setattr(data_args, key, value)
    if found:
        logger.info("columns: " + ", ".join(f"{k}={v}" for k, v in found.items()) + " (detected; set them to change)")


def choice_index(value, choices, split, row, column):
    """A label as the right ending's index: an int, or its digits as a string (HellaSwag stores "0".."3")."""
    text = str(value).strip()
    if isinstance(value, (int, str)) and not isinstance(value, bool) and text.isdigit() and int(text) < choices:
        return int(text)
    raise HftuneError(f"label_column '{column}' is {value!r} at row {row} of the {split} split; a label is the index "
                      f"of the right ending, 0 to {choices - 1}: fix or drop the row.")


def second_sentence(header, ending):
    """run_swag.py's second sentence: the header, a space, the ending (no stray space without a header)."""
    return " ".join(t for t in (header, ending) if t)


def endings_of(row, columns):
    """A row's endings: one list column's items, or one per ending column (a missing one left out)."""
    values = row[columns[0]] if len(columns) == 1 else [row[c] for c in columns]
    return [e for e in values or () if e is not None] if isinstance(values, list) else values


def encoder(tokenizer, data_args, choices, split):
    """batch -> input_ids etc. shaped [row][ending][token] and labels; a row whose ending count differs from
    the train split's first row's, or whose label is not an ending's index, stops here, named."""
    context, header, label = data_args.first_sentence_column, data_args.question_header_column, data_args.label_column
    endings = data_args.ending_columns.split(",")
    limit = tokenizer.model_max_length
    max_length = min(data_args.max_seq_length or limit, limit)

    def encode(batch, rows):
        firsts, seconds = [], []
        for i, row in enumerate(rows):
            values = endings_of({c: batch[c][i] for c in endings}, endings)
            if len(values) != choices:
                raise HftuneError(f"row {row} of the {split} split has {len(values)} endings, the train split's first "
                                  f"row {choices}; every row needs as many: fix or drop the row.")
            firsts += [batch[context][i] or ""] * choices
            seconds += [second_sentence(batch[header][i] if header else None, e) for e in values]
        encoded = tokenizer(firsts, seconds, truncation=True, max_length=max_length,
                            padding="max_length" if data_args.pad_to_max_length else False)
        shaped = {k: [v[i:i + choices] for i in range(0, len(v), choices)] for k, v in encoded.items()}
        if label in batch:
            shaped["labels"] = [choice_index(v, choices, split, row, label) for v, row in zip(batch[label], rows)]
        return shaped

    return encode


def choice_count(raw, data_args):
    """How many endings the train split's first row has: every row of every split must have as many."""
    values = endings_of(next(iter(raw["train"])), data_args.ending_columns.split(","))
    if not isinstance(values, list) or len(values) < 2:
        raise HftuneError(f"ending_columns '{data_args.ending_columns}' gives {values!r} in the train split's first "
                          "row; name two or more ending columns, or one list column.")
    return len(values)


def endings_per_row(data_args):
    """Sequences one row feeds the model (`hftune plan` sizes activations with it): the ending_columns when
    they name several, else the train split's first row, which sets the count for every row (choice_count).
    That row comes through the run's own loader, streamed, so a plan reads a row or two, not the data set."""
    from dataclasses import replace

    from hftune.data import load_raw_datasets

    named = (data_args.ending_columns or "").split(",")
    if len(named) > 1:
        return len(named)
    probe = replace(data_args, streaming=True, validation_split_percentage=0, max_eval_samples=1)
    try:
        raw = load_raw_datasets(probe)
    except HftuneError as err:
        raise HftuneError(f"{str(err).rstrip('.')} (hftune plan reads the first row to count a multiple-choice row's "
                          "endings; name them in ending_columns: ending0,ending1,...).") from None
    detect_columns(raw["train"].column_names, probe)
    return choice_count(raw, probe)


class ChoicesCollator(DataCollatorForMultipleChoice):
    """transformers' collator ([batch, endings, tokens]), which needs labels: an unlabelled split too."""

    def torch_call(self, examples):
        if "labels" in examples[0]:
            return super().torch_call(examples)
        batch = super().torch_call([{**e, "labels": -100} for e in examples])
        batch.pop("labels")
        return batch


def accuracy():
    metric = load_metric("accuracy")

    def compute_metrics(eval_pred):
        return metric.compute(predictions=np.argmax(eval_pred.predictions, axis=-1), references=eval_pred.label_ids)

    return compute_metrics


def build(model_args, data_args, raw):
    detect_columns(raw["train"].column_names, data_args)
    endings = data_args.ending_columns.split(",")
    for split, dataset in raw.items():
        require_columns(dataset, split, first_sentence_column=data_args.first_sentence_column,
                        question_header_column=data_args.question_header_column,
                        **{f"ending_columns ({e})": e for e in endings},
                        **({"label_column": data_args.label_column} if split != "test" else {}))
    choices = choice_count(raw, data_args)
    path, common = pretrained_source(model_args)
    tokenizer = AutoTokenizer.from_pretrained(processor_path(model_args, path), **common)
    check_room(tokenizer, data_args.max_seq_length, pair=True, real=2)  # some context and some ending
    tokenized = {split: apply_batched(ds, "map", encoder(tokenizer, data_args, choices, split), with_indices=True,
                                      remove_columns=ds.column_names, num_proc=data_args.preprocessing_num_workers,
                                      desc=f"tokenizing {split}")
                 for split, ds in limit_splits(raw, data_args).items()}
    config = load_config(model_args, path, common)
    model = load_weights(AutoModelForMultipleChoice, model_args, path, config,
                         ignore_mismatched_sizes=model_args.ignore_mismatched_sizes, dtype=torch.float32, **common)
    # BertForMultipleChoice takes **kwargs but its loss is a per-micro-batch mean that ignores num_items_in_batch:
    # without this Trainer would skip its division by the accumulation steps and multiply by the world size.
    model.accepts_loss_kwargs = False
    max_length = min(data_args.max_seq_length or tokenizer.model_max_length, tokenizer.model_max_length)
    collator = ChoicesCollator(tokenizer, **(dict(padding="max_length", max_length=max_length)
                                             if data_args.pad_to_max_length else {}))
    return TaskBundle(
        model=model, processor=tokenizer, train_dataset=tokenized.get("train"),
        eval_dataset=tokenized.get("validation"), test_dataset=tokenized.get("test"), data_collator=collator,
        compute_metrics=accuracy(), main_metric="eval_accuracy", pipeline_task="multiple-choice", usage=USAGE,
    )
