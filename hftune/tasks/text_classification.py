"""text-classification: BERT-style encoders (AutoModelForSequenceClassification) on single
texts or text pairs. Integer or string labels: single-label classes, metrics accuracy and macro-F1;
float scores: regression, metrics MSE, RMSE, Pearson, Spearman; lists of labels: multi-label
classification, metrics micro/macro-F1 and subset accuracy (hftune.tasks.labels)."""

from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

from hftune.compression.adapters import quantized_loading
from hftune.columns import detect_columns
from hftune.data import apply_batched, check_not_empty, drop_empty_texts, label_column_of, limit_splits, require_columns
from hftune.metrics import load_metric
from hftune.tasks.common import (
    TaskBundle, TaskTraits, TextFields, check_room, load_config, load_weights, pretrained_source, processor_path,
)
from hftune.tasks.labels import SINGLE, LabelFields, check_label_config, check_label_features, detect_labels


@dataclass
class DataFields(TextFields, LabelFields):
    """text-classification's own data fields."""

    text_pair_column: str = field(
        default=None, metadata={"help": "Column holding the second text of a pair (text-classification)."}
    )
    pad_to_max_length: bool = field(
        default=False, metadata={"help": "Pad every text to max_seq_length (run_glue.py's option; the default pads "
                                         "each batch to its longest text: same results, less compute)."},
    )


TRAITS = TaskTraits(auto_model="AutoModelForSequenceClassification", output="classes", inputs="text",
                    peft_task_type="SEQ_CLS")


def check_config(model_args, data_args, training_args):
    check_label_config(model_args, data_args, training_args)


def load_model(model_args, labels):
    """Pretrained encoder + a new head: one output per class or label name, or one score (regression)."""
    path, common = pretrained_source(model_args)
    tokenizer = AutoTokenizer.from_pretrained(processor_path(model_args, path), **common)
    head = labels.head() if labels.kind != SINGLE else dict(num_labels=len(labels.names), **labels.head())
    config = load_config(model_args, path, common, **head)
    # float32 master weights whatever the checkpoint's dtype (transformers 5 keeps bf16 ones as bf16).
    model = load_weights(
        AutoModelForSequenceClassification, model_args, path, config,
        ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
        dtype=torch.float32, **quantized_loading(model_args, "text-classification"), **common
    )
    # The classification loss is a per-example mean that ignores `num_items_in_batch`; without this,
    # Trainer multiplies it by the world size under DDP (2x loss and gradient on 2 processes).
    model.accepts_loss_kwargs = False
    return model, tokenizer


def tokenize_splits(raw, tokenizer, data_args, labels):
    """input_ids (+ pair segments) and `labels` (class ids 0..n-1, scores, or multi-hot vectors):
    cached by datasets per split, or lazily as training reads a streamed train split."""
    limit = tokenizer.model_max_length
    max_length = min(data_args.max_seq_length or limit, limit)
    text, pair, label = data_args.text_column, data_args.text_pair_column, data_args.label_column

    def preprocess(batch, encode):
        first = [t if t is not None else "" for t in batch[text]]
        second = [t if t is not None else "" for t in batch[pair]] if pair else None
        encoded = tokenizer(first, second, truncation=True, max_length=max_length)
        if label in batch:  # ints, strings or ClassLabel ids (through their names), scores or lists of them
            encoded["labels"] = encode(batch[label])
        return encoded

    return {
        split: apply_batched(ds, "map", preprocess, num_proc=data_args.preprocessing_num_workers,
                             desc=f"tokenizing {split}", remove_columns=ds.column_names,
                             fn_kwargs={"encode": labels.encoder(split, ds.features.get(label))})
        for split, ds in raw.items()
    }


def accuracy_and_macro_f1():
    accuracy, f1 = load_metric("accuracy"), load_metric("f1")

    def compute_metrics(eval_pred):
        predictions, references = np.argmax(eval_pred.predictions, axis=-1), eval_pred.label_ids
        return {
            **accuracy.compute(predictions=predictions, references=references),
            "f1_macro": f1.compute(predictions=predictions, references=references, average="macro")["f1"],
        }

    return compute_metrics


def collator(tokenizer, data_args):
    if not data_args.pad_to_max_length:
        return DataCollatorWithPadding(tokenizer)
    max_length = min(data_args.max_seq_length or tokenizer.model_max_length, tokenizer.model_max_length)
    return DataCollatorWithPadding(tokenizer, padding="max_length", max_length=max_length)


def build(model_args, data_args, raw):
    raw = detect_columns(raw, data_args)  # unset columns (load_raw_datasets has found them already)
    for split, dataset in raw.items():
        require_columns(
            dataset, split, text_column=data_args.text_column, text_pair_column=data_args.text_pair_column,
            label_column=label_column_of(dataset, split, data_args.label_column),
        )
    skipped = {}
    for split in ("train", "validation"):  # test rows stay: each gets its prediction, in order
        if split in raw:
            raw[split], skipped[split] = drop_empty_texts(
                raw[split], split, [data_args.text_column, data_args.text_pair_column],
                num_proc=data_args.preprocessing_num_workers)
            check_not_empty(raw[split], split)
    labels = detect_labels(raw, data_args.label_column, data_args.do_regression)
    check_label_features(labels, model_args)
    compute_metrics, main_metric = (accuracy_and_macro_f1(), "eval_accuracy") if labels.kind == SINGLE \
        else labels.metrics()

    model, tokenizer = load_model(model_args, labels)
    check_room(tokenizer, data_args.max_seq_length, pair=bool(data_args.text_pair_column))
    tokenized = tokenize_splits(limit_splits(raw, data_args), tokenizer, data_args, labels)
    return TaskBundle(
        model=model, processor=tokenizer, train_dataset=tokenized.get("train"),
        eval_dataset=tokenized.get("validation"), test_dataset=tokenized.get("test"),
        data_collator=collator(tokenizer, data_args), compute_metrics=compute_metrics,
        main_metric=main_metric, pipeline_task="text-classification", skipped_rows=skipped,
    )
