"""token-classification: one tag per word (named entities, parts of speech), as run_ner.py does it.

Rows hold the words and their tags as list columns: `tokens` (or `words`) and `ner_tags` (or
`pos_tags`, `chunk_tags`, `tags`, `labels`), detected; `text_column` / `label_column` name others.
Tags are a ClassLabel sequence (its names), strings or integers. Each word's first sub-token carries
the word's tag and its other sub-tokens -100, or with `label_all_tokens` the tag too (a B- tag's
continuation as I-, as run_ner.py). Metrics by seqeval (CoNLL's entity level, as evaluate's seqeval):
`eval_precision`, `eval_recall`, `eval_f1`, `eval_accuracy` (of the labelled tokens), and each
entity type's with `return_entity_level_metrics`. The saved model loads in
`pipeline("token-classification")` with its tag names.

Example:
    >>> align_labels([None, 0, 0, 1, None], [3, 5], label_all_tokens=False, continuation={3: 4, 5: 5})
    [-100, 3, -100, 5, -100]
"""

from dataclasses import dataclass, field

import numpy as np
import torch
from datasets import ClassLabel
from transformers import AutoModelForTokenClassification, AutoTokenizer, DataCollatorForTokenClassification

from hftune.data import apply_batched, is_stream, limit_splits, require_columns
from hftune.errors import HftuneError
from hftune.metrics import load_metric
from hftune.tasks.common import (
    TaskBundle, TaskTraits, TextFields, check_room, load_config, load_weights, pretrained_source, processor_path,
)

IGNORE = -100
PREFIX_SPACE_MODELS = ("roberta", "gpt2", "bloom", "longformer", "bart", "deberta")  # run_ner.py's add_prefix_space


@dataclass
class DataFields(TextFields):
    """token-classification's own data fields (text_column: the words, label_column: their tags)."""

    label_all_tokens: bool = field(
        default=False,
        metadata={"help": "token-classification: label every sub-token of a word (a B- tag's continuation as I-), "
                          "not only the first."},
    )
    return_entity_level_metrics: bool = field(
        default=False, metadata={"help": "token-classification: also report precision/recall/F1 per entity type."}
    )


TRAITS = TaskTraits(auto_model="AutoModelForTokenClassification", output="classes", inputs="words",
                    peft_task_type="TOKEN_CLS")


def tag_names(raw, column):
    """The tag names in head order: a ClassLabel sequence's names, else the sorted tags of every split."""
    inner = getattr(raw["train"].features[column], "feature", None)
    if isinstance(inner, ClassLabel):
        return list(inner.names)
    values = {tag for split in raw.values() if column in split.column_names for tags in split[column]
              for tag in tags or ()}
    kinds = {type(v) for v in values}
    if kinds - {str} and kinds - {int}:
        raise HftuneError(f"label_column '{column}' mixes {sorted(k.__name__ for k in kinds)} tags; use strings "
                          "or integers.")
    return [str(v) for v in sorted(values)]


def continuation_ids(names):
    """{tag id: the id of the tag its word's later sub-tokens get}: B-X -> I-X where I-X exists."""
    ids = {n: i for i, n in enumerate(names)}
    return {i: ids.get("I-" + n[2:], i) if n.startswith("B-") else i for i, n in enumerate(names)}


def align_labels(word_ids, tags, label_all_tokens, continuation):
    """Sub-token labels: a word's first sub-token its tag; later ones -100 (or the continuation tag)."""
    labels, previous = [], None
    for word in word_ids:
        if word is None:
            labels.append(IGNORE)
        elif word != previous:
            labels.append(tags[word])
        else:
            labels.append(continuation[tags[word]] if label_all_tokens else IGNORE)
        previous = word
    return labels


def load_model(model_args, names):
    path, common = pretrained_source(model_args)
    config = load_config(model_args, path, common, num_labels=len(names), id2label=dict(enumerate(names)),
                         label2id={n: i for i, n in enumerate(names)})
    extra = {"add_prefix_space": True} if config.model_type in PREFIX_SPACE_MODELS else {}
    tokenizer = AutoTokenizer.from_pretrained(processor_path(model_args, path), **extra, **common)
    if not tokenizer.is_fast:
        raise HftuneError(f"token-classification maps sub-tokens to words with a fast tokenizer; "
                          f"{type(tokenizer).__name__} is not one: use a checkpoint with tokenizer.json.")
    model = load_weights(
        AutoModelForTokenClassification, model_args, path, config, ignore_mismatched_sizes=model_args.ignore_mismatched_sizes, dtype=torch.float32, **common)
    # BERT-style token classifiers take **kwargs but average their loss over each micro-batch's tokens and
    # ignore num_items_in_batch: Trainer would otherwise skip its division by the accumulation steps and
    # multiply by the world size under DDP (as run_ner.py's runs are). Per-micro-batch means, as run_ner.py.
    model.accepts_loss_kwargs = False
    return model, tokenizer


def tokenize_splits(raw, tokenizer, data_args, names):
    words, column = data_args.text_column, data_args.label_column
    to_id = {n: i for i, n in enumerate(names)}
    continuation = continuation_ids(names)
    max_length = min(data_args.max_seq_length or tokenizer.model_max_length, tokenizer.model_max_length)

    def encode(batch, split):
        encoded = tokenizer(batch[words], is_split_into_words=True, truncation=True, max_length=max_length)
        if column in batch:
            encoded["labels"] = [
                align_labels(encoded.word_ids(i), tag_ids(tags, to_id, split), data_args.label_all_tokens,
                             continuation) for i, tags in enumerate(batch[column])]
        return encoded

    return {split: apply_batched(ds, "map", encode, fn_kwargs={"split": split}, remove_columns=ds.column_names,
                                 num_proc=data_args.preprocessing_num_workers, desc=f"tokenizing {split}")
            for split, ds in raw.items()}


def tag_ids(tags, to_id, split):
    """A row's tags as head ids: names (strings, or integers without a ClassLabel, named by str()) through
    to_id; a ClassLabel's integers are its ids already."""
    try:
        return [to_id[str(t)] if not isinstance(t, int) or str(t) in to_id else t for t in tags]
    except KeyError as err:
        raise HftuneError(f"the {split} split has the tag {err} that no training row has; add it to the train "
                          "data or fix the tag.") from None


def check_rows(raw, data_args):
    for split, dataset in raw.items():
        require_columns(dataset, split, text_column=data_args.text_column,
                        **({"label_column": data_args.label_column} if split != "test" else {}))
        row = dataset[0]
        if not isinstance(row[data_args.text_column], list):
            raise HftuneError(f"text_column '{data_args.text_column}' holds {type(row[data_args.text_column]).__name__}"
                              ", not a list of words; token-classification needs words and tags as lists.")
        if data_args.label_column in dataset.column_names and not is_stream(dataset):
            check_lengths(dataset, split, data_args.text_column, data_args.label_column)


def check_lengths(dataset, split, words, tags):
    """Every row needs one tag per word: align_labels would read past the tags or leave words untagged."""
    for row, (these_words, these_tags) in enumerate(zip(dataset[words], dataset[tags])):
        if these_tags is None or len(these_words) != len(these_tags):
            raise HftuneError(f"row {row} of the {split} split has {len(these_words)} words in '{words}' but "
                              f"{'no' if these_tags is None else len(these_tags)} tags in '{tags}'; give every word "
                              "one tag.")


def seqeval_metrics(names, entity_level):
    metric = load_metric("seqeval")

    def compute_metrics(eval_pred):
        predictions, references = [], []
        for logits, labels in zip(np.argmax(eval_pred.predictions, axis=-1), eval_pred.label_ids):
            kept = labels != IGNORE
            predictions.append([names[i] for i in logits[kept]])
            references.append([names[i] for i in labels[kept]])
        scores = metric.compute(predictions=predictions, references=references, zero_division=0)
        results = {key: scores[f"overall_{key}"] for key in ("precision", "recall", "f1", "accuracy")}
        if entity_level:
            results.update({f"{entity}_{key}": value for entity, score in scores.items() if isinstance(score, dict)
                            for key, value in score.items()})
        return results

    return compute_metrics


def build(model_args, data_args, raw):
    check_rows(raw, data_args)
    names = tag_names(raw, data_args.label_column)
    model, tokenizer = load_model(model_args, names)
    check_room(tokenizer, data_args.max_seq_length)
    tokenized = tokenize_splits(limit_splits(raw, data_args), tokenizer, data_args, names)
    return TaskBundle(
        model=model, processor=tokenizer, train_dataset=tokenized.get("train"),
        eval_dataset=tokenized.get("validation"), test_dataset=tokenized.get("test"),
        data_collator=DataCollatorForTokenClassification(tokenizer, label_pad_token_id=IGNORE),
        compute_metrics=seqeval_metrics(names, data_args.return_entity_level_metrics), main_metric="eval_f1",
        pipeline_task="token-classification",
    )
