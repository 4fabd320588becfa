"""image-classification: ResNet-style backbones (AutoModelForImageClassification) with a new
head sized from the data. Images may be PIL images, file paths or bytes, grayscale or colour;
labels ints, strings or an image folder's ClassLabel. Metric: accuracy.

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
from datasets import ClassLabel, Image
from transformers import AutoImageProcessor, AutoModelForImageClassification, DefaultDataCollator

from hftune.data import class_names, is_stream, label_column_of, label_ids, limit_splits, require_columns
from hftune.errors import HftuneError
from hftune.launch.gpu_defaults import channels_last
from hftune.metrics import load_metric
from hftune.tasks.common import TaskBundle, TaskTraits, load_config, pretrained_source

logger = logging.getLogger("hftune")


@dataclass
class DataFields:
    """image-classification's own data fields."""

    image_column: str = field(
        default="image", metadata={"help": "Column holding images: PIL images, file paths or bytes."}
    )


TRAITS = TaskTraits(auto_model="AutoModelForImageClassification", output="classes", inputs="image")


class ImageTransform:
    """Decoded images -> `pixel_values` on the fly, in whichever process reads the batch: float
    pixel tensors are ~100x the size of the PNG bytes, so they are never stored. A plain object, not a
    closure, so DataLoader workers started with spawn can unpickle it too.

    Example:
        >>> transform = ImageTransform(processor, {"cat": 0, "dog": 1}, None)  # doctest: +SKIP
        >>> transform({"pixel_values": [pil_image], "labels": ["dog"]})["labels"]  # doctest: +SKIP
        [1]
    """

    def __init__(self, processor, to_id, split_names, split="train"):
        self.processor = processor
        self.to_id = to_id  # class name -> id in the model's head
        self.split_names = split_names  # this split's ClassLabel names (its ids may differ from train's), or None
        self.split = split

    def __call__(self, batch):
        encoded = {"pixel_values": self.processor(batch["pixel_values"], return_tensors="pt")["pixel_values"]}
        if "labels" in batch:
            names = [self.split_names[v] if self.split_names else v for v in batch["labels"]]
            encoded["labels"] = label_ids(names, self.to_id, self.split)
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


def prepare(dataset, split, data_args, processor, to_id):
    """Keep only image and label, named as the model's forward() arguments: Trainer's
    remove_unused_columns then keeps them (it drops columns before the transform runs)."""
    image, label = data_args.image_column, data_args.label_column
    dataset, skipped = as_images(dataset, split, image)
    columns = {image: "pixel_values"}
    if label in dataset.column_names:
        columns[label] = "labels"
    feature = dataset.features.get(label)
    split_names = list(feature.names) if isinstance(feature, ClassLabel) else None
    dataset = dataset.select_columns(list(columns))
    dataset = dataset.rename_columns({old: new for old, new in columns.items() if old != new})
    transform = ImageTransform(processor, to_id, split_names, split)
    # A stream has no on-the-fly transform: its map runs lazily, batch by batch, as training reads it.
    return (dataset.map(transform, batched=True) if is_stream(dataset) else dataset.with_transform(transform)), skipped


def load_model(model_args, names):
    """Pretrained backbone + a new head with one output per class found in the data."""
    path, common = pretrained_source(model_args)
    processor = AutoImageProcessor.from_pretrained(path, **common)
    # id2label alone sets num_labels; passing both makes transformers warn that they disagree.
    config = load_config(
        model_args, path, common, id2label=dict(enumerate(names)),
        label2id={name: i for i, name in enumerate(names)},
    )
    # float32 master weights whatever the checkpoint's dtype (transformers 5 keeps bf16 ones as bf16).
    model = AutoModelForImageClassification.from_pretrained(
        path, config=config, ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
        dtype=torch.float32, **common
    )
    return channels_last(model), processor


def build(model_args, data_args, raw):
    for split, dataset in raw.items():
        require_columns(
            dataset, split, image_column=data_args.image_column,
            label_column=label_column_of(dataset, split, data_args.label_column),
        )
    names = class_names(raw, data_args.label_column)

    model, processor = load_model(model_args, names)
    # The loss is a per-image mean that ignores `num_items_in_batch`; left True (inferred from
    # forward's **kwargs), Trainer would scale it by the world size under DDP.
    model.accepts_loss_kwargs = False
    to_id = {name: i for i, name in enumerate(names)}
    prepared = {split: prepare(ds, split, data_args, processor, to_id)
                for split, ds in limit_splits(raw, data_args).items()}
    skipped = {split: n for split, (_, n) in prepared.items()}
    prepared = {split: ds for split, (ds, _) in prepared.items()}
    accuracy = load_metric("accuracy")

    def compute_metrics(eval_pred):
        predictions = np.argmax(eval_pred.predictions, axis=-1)
        return accuracy.compute(predictions=predictions, references=eval_pred.label_ids)

    return TaskBundle(
        model=model, processor=processor, train_dataset=prepared.get("train"),
        eval_dataset=prepared.get("validation"), test_dataset=prepared.get("test"),
        data_collator=DefaultDataCollator(), compute_metrics=compute_metrics,
        main_metric="eval_accuracy", pipeline_task="image-classification", skipped_rows=skipped,
    )
