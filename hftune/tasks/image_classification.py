"""image-classification: ResNet-style backbones (AutoModelForImageClassification) with a new
head sized from the data. Images may be PIL images, file paths or bytes, grayscale or colour;
labels ints, strings or an image folder's ClassLabel (metric: accuracy), float scores (regression:
MSE, RMSE, Pearson, Spearman) or lists of labels (multi-label: micro/macro-F1, subset accuracy), as
hftune.tasks.labels detects them.

Example:
    >>> from datasets import Dataset, DatasetDict
    >>> from hftune.config import DataArguments, ModelArguments
    >>> raw = DatasetDict(train=Dataset.from_dict({"image": ["a.png", "b.png"], "label": ["cat", "dog"]}))
    >>> bundle = build(ModelArguments("microsoft/resnet-18"), DataArguments(task="image-classification"), raw)  # doctest: +SKIP
    >>> bundle.train_dataset[0]["pixel_values"].shape  # doctest: +SKIP
    torch.Size([3, 224, 224])
"""

import io
import logging
from dataclasses import dataclass, field

import numpy as np
import PIL.Image
import pyarrow as pa
import torch
from datasets import Image
from transformers import AutoImageProcessor, AutoModelForImageClassification, DefaultDataCollator

from hftune.columns import detect_columns
from hftune.data import is_stream, label_column_of, limit_splits, require_columns
from hftune.errors import HftuneError
from hftune.launch.gpu_defaults import channels_last
from hftune.metrics import load_metric
from hftune.tasks.common import TaskBundle, TaskTraits, load_config, load_weights, pretrained_source, processor_path
from hftune.tasks.labels import SINGLE, LabelFields, check_label_config, check_label_features, detect_labels

logger = logging.getLogger("hftune")


@dataclass
class DataFields(LabelFields):
    """image-classification's own data fields."""

    image_column: str = field(
        default=None,
        metadata={"help": "Column holding images: PIL images, file paths or bytes (default: image or img, detected)."},
    )


TRAITS = TaskTraits(auto_model="AutoModelForImageClassification", output="classes", inputs="image")


def check_config(model_args, data_args, training_args):
    check_label_config(model_args, data_args, training_args)


class ImageTransform:
    """Decoded images -> `pixel_values` on the fly, in whichever process reads the batch: float
    pixel tensors are ~100x the size of the PNG bytes, so they are never stored. A plain object, not a
    closure, so DataLoader workers started with spawn can unpickle it too.

    Example:
        >>> transform = ImageTransform(processor, labels.encoder("train", dataset.features["label"]))  # doctest: +SKIP
        >>> transform({"pixel_values": [pil_image], "labels": ["dog"]})["labels"]  # doctest: +SKIP
        [1]
    """

    def __init__(self, processor, encode):
        self.processor = processor
        # this split's labels -> the head's targets (hftune.tasks.labels.LabelEncoder: a ClassLabel's ids
        # are mapped through its names, which may number the classes otherwise than train's)
        self.encode = encode

    def __call__(self, batch):
        encoded = {"pixel_values": self.processor(batch["pixel_values"], return_tensors="pt")["pixel_values"]}
        if "labels" in batch:
            encoded["labels"] = self.encode(batch["labels"])
        return encoded


def as_images(dataset, split, column):
    """Cast paths, bytes or {'bytes', 'path'} dicts to datasets.Image decoding to RGB (grayscale
    Fashion-MNIST must feed a 3-channel ResNet; the cast only relabels the column, no copy), and
    read one image up front so a bad path fails now, not mid-training."""
    if dataset.features[column] != Image(mode="RGB"):
        try:
            dataset = dataset.cast_column(column, Image(mode="RGB"))
        except (pa.ArrowException, TypeError, ValueError):
            raise HftuneError(
                f"image_column '{column}' of the {split} split holds {dataset.features[column]}, not images; "
                "it must hold PIL images, file paths or bytes."
            ) from None
    skipped = None  # a stream's images are read as training goes
    if not is_stream(dataset) and split != "test":  # test rows stay: each gets its prediction, in order
        dataset, skipped = drop_unreadable_images(dataset, split, column)
    try:
        next(iter(dataset))[column] if is_stream(dataset) else dataset[0][column]
    except (OSError, ValueError) as err:  # FileNotFoundError, PIL.UnidentifiedImageError, ...
        raise HftuneError(
            f"image_column '{column}' of the {split} split could not be read as an image ({err}); "
            "file paths are read relative to the working directory."
        ) from None
    return dataset, skipped


def _readable(value):
    """Whether PIL can open the image and its data checks out (PIL's verify: no pixel decoding)."""
    try:
        source = io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"]
        with PIL.Image.open(source) as image:
            image.verify()
        return True
    except (OSError, ValueError, SyntaxError, TypeError, KeyError):  # what PIL raises for broken files
        return False


def drop_unreadable_images(dataset, split, column):
    """(dataset without rows whose image cannot be opened, how many it dropped): a corrupt or missing
    file is skipped with a warning naming it, not a crash mid-training; if no image is readable, the
    caller's check of the first image names the problem."""
    raw = dataset.cast_column(column, Image(decode=False))
    bad = [i for i, value in enumerate(raw[column]) if not _readable(value or {})]
    if not bad or len(bad) == len(dataset):
        return dataset, 0
    names = [raw[i][column].get("path") or f"row {i}" for i in bad[:3]]
    logger.warning(f"skipping {len(bad)} unreadable image(s) of the {split} split (e.g. {names}).")
    unreadable = set(bad)
    return dataset.select(i for i in range(len(dataset)) if i not in unreadable), len(bad)


def prepare(dataset, split, data_args, processor, labels):
    """Keep only image and label, named as the model's forward() arguments: Trainer's
    remove_unused_columns then keeps them (it drops columns before the transform runs)."""
    image, label = data_args.image_column, data_args.label_column
    dataset, skipped = as_images(dataset, split, image)
    columns = {image: "pixel_values"}
    if label in dataset.column_names:
        columns[label] = "labels"
    encode = labels.encoder(split, dataset.features.get(label))
    dataset = dataset.select_columns(list(columns))
    dataset = dataset.rename_columns({old: new for old, new in columns.items() if old != new})
    transform = ImageTransform(processor, encode)
    # A stream has no on-the-fly transform: its map runs lazily, batch by batch, as training reads it.
    return (dataset.map(transform, batched=True) if is_stream(dataset) else dataset.with_transform(transform)), skipped


def load_model(model_args, labels):
    """Pretrained backbone + a new head: one output per class or label found in the data, or one score."""
    path, common = pretrained_source(model_args)
    processor = AutoImageProcessor.from_pretrained(processor_path(model_args, path, "image processor"), **common)
    # id2label alone sets num_labels; passing both makes transformers warn that they disagree.
    config = load_config(model_args, path, common, **labels.head())
    # float32 master weights whatever the checkpoint's dtype (transformers 5 keeps bf16 ones as bf16).
    model = load_weights(
        AutoModelForImageClassification, model_args, path, config, ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
        dtype=torch.float32, **common
    )
    return channels_last(model), processor


def build(model_args, data_args, raw):
    raw = detect_columns(raw, data_args)  # unset columns (load_raw_datasets has found them already)
    for split, dataset in raw.items():
        require_columns(
            dataset, split, image_column=data_args.image_column,
            label_column=label_column_of(dataset, split, data_args.label_column),
        )
    labels = detect_labels(raw, data_args.label_column, data_args.do_regression)
    check_label_features(labels, model_args)
    compute_metrics, main_metric = (accuracy_metric(), "eval_accuracy") if labels.kind == SINGLE else labels.metrics()

    model, processor = load_model(model_args, labels)
    # The loss is a per-image mean that ignores `num_items_in_batch`; left True (inferred from
    # forward's **kwargs), Trainer would scale it by the world size under DDP.
    model.accepts_loss_kwargs = False
    prepared = {split: prepare(ds, split, data_args, processor, labels)
                for split, ds in limit_splits(raw, data_args).items()}
    skipped = {split: n for split, (_, n) in prepared.items()}
    prepared = {split: ds for split, (ds, _) in prepared.items()}
    return TaskBundle(
        model=model, processor=processor, train_dataset=prepared.get("train"),
        eval_dataset=prepared.get("validation"), test_dataset=prepared.get("test"),
        data_collator=DefaultDataCollator(), compute_metrics=compute_metrics,
        main_metric=main_metric, pipeline_task="image-classification", skipped_rows=skipped,
    )


def accuracy_metric():
    accuracy = load_metric("accuracy")

    def compute_metrics(eval_pred):
        predictions = np.argmax(eval_pred.predictions, axis=-1)
        return accuracy.compute(predictions=predictions, references=eval_pred.label_ids)

    return compute_metrics
