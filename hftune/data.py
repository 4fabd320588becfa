"""Load the raw splits a run needs: a Hub data set, an offline asset, or local files/folders.

Example:
    >>> from hftune.config import DataArguments
    >>> raw = load_raw_datasets(DataArguments(train_file="train.csv"), seed=42)  # doctest: +SKIP
    >>> sorted(raw)  # validation carved from train
    ['train', 'validation']
"""

import os
from pathlib import Path

from datasets import ClassLabel, DatasetDict, load_dataset
from datasets.exceptions import DatasetGenerationError

from hftune.assets import get_asset, is_asset
from hftune.errors import HftuneError, closest

BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text"}


def _builder_for(path):
    if os.path.isdir(path):
        return "imagefolder"
    builder = BUILDERS.get(Path(path).suffix.lower())
    if builder is None:
        raise HftuneError(
            f"cannot read '{path}': use one of {sorted(BUILDERS)} or an image folder, or pass dataset_name."
        )
    return builder


def _has_no_rows(path):
    """Catch empty files up front: datasets' own error for them is a schema puzzle."""
    if os.path.isdir(path):
        return not any(files for _, _, files in os.walk(path))
    if Path(path).suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows == 0
    with open(path, "rb") as handle:
        lines = [line for line in handle.read(1 << 16).splitlines() if line.strip()]
    header_lines = 1 if Path(path).suffix.lower() in (".csv", ".tsv") else 0
    return len(lines) <= header_lines


def _local_files(data_args):
    files = {"train": data_args.train_file, "validation": data_args.validation_file, "test": data_args.test_file}
    files = {split: path for split, path in files.items() if path}
    for split, path in files.items():
        if not os.path.exists(path):
            raise HftuneError(f"{split}_file '{path}' does not exist; check the path in your config.")
        if _has_no_rows(path):
            raise HftuneError(f"{split}_file '{path}' has no rows; fill it or drop it from the config.")
    builders = {_builder_for(path) for path in files.values()}
    if len(builders) > 1:
        raise HftuneError(f"train/validation/test files must share one format, got {sorted(builders)}.")
    return builders.pop(), files


def _load(data_args, cache_dir):
    if is_asset(data_args.dataset_name):
        if data_args.dataset_config_name:
            raise HftuneError("dataset_config_name does not apply to an asset: data set; drop it.")
        asset = get_asset(data_args.dataset_name, "dataset")
        raw = load_dataset(asset.builder, data_files=asset.locate(), cache_dir=cache_dir, **asset.builder_kwargs)
        return raw.rename_columns(asset.rename_columns)
    if data_args.dataset_name:
        return load_dataset(data_args.dataset_name, data_args.dataset_config_name, cache_dir=cache_dir)
    if not (data_args.train_file or data_args.validation_file or data_args.test_file):
        raise HftuneError("no data: set dataset_name, or train_file (and optionally validation_file/test_file).")
    builder, files = _local_files(data_args)
    if builder == "imagefolder":
        return DatasetDict(
            {split: load_dataset("imagefolder", data_dir=path, split="train", cache_dir=cache_dir)
             for split, path in files.items()}
        )
    if builder == "csv" and any(Path(p).suffix.lower() == ".tsv" for p in files.values()):
        return load_dataset(builder, data_files=files, cache_dir=cache_dir, delimiter="\t")
    return load_dataset(builder, data_files=files, cache_dir=cache_dir)


def _carve_validation(raw, percentage, seed):
    if "validation" in raw or percentage == 0:
        return raw
    split = raw["train"].train_test_split(test_size=percentage / 100, seed=seed)
    raw["train"], raw["validation"] = split["train"], split["test"]
    return raw


def limit_splits(splits, data_args):
    """The first max_train_samples / max_eval_samples examples of train / validation. Tasks call
    it where HF's example scripts apply them: on rows for classification (before tokenizing),
    on blocks for a packed causal LM (after grouping)."""
    limits = {"train": data_args.max_train_samples, "validation": data_args.max_eval_samples}
    return {
        split: ds.select(range(limits[split])) if limits.get(split) is not None and len(ds) > limits[split] else ds
        for split, ds in splits.items()
    }


def load_raw_datasets(data_args, seed=42, cache_dir=None, keep_test=False):
    """DatasetDict with 'train', 'validation' where the data allows, and 'test' if keep_test.
    Other splits (e.g. an unlabelled 'unsupervised') are left out."""
    try:
        raw = _load(data_args, cache_dir)
    except HftuneError:
        raise
    except UnicodeDecodeError as err:
        raise HftuneError(f"data is not valid UTF-8 ({err.reason} at byte {err.start}); re-encode the file.") from None
    except DatasetGenerationError as err:
        cause = str(err.__cause__ or err).splitlines()[0]
        raise HftuneError(f"could not read the data ({cause}); check that no file is empty or malformed.") from None
    except (OSError, ValueError) as err:  # missing files, no network, unknown data set
        raise HftuneError(f"could not load the data set: {str(err).splitlines()[0]}") from None
    wanted = ("train", "validation", "test") if keep_test else ("train", "validation")
    raw = DatasetDict({split: ds for split, ds in raw.items() if split in wanted})
    if "train" not in raw:
        raise HftuneError("the data has no train split; set train_file, or a dataset_name that has one.")
    raw = _carve_validation(raw, data_args.validation_split_percentage, seed)
    for split, dataset in raw.items():
        if len(dataset) == 0:
            raise HftuneError(f"the {split} split is empty; check the data file or max_*_samples.")
    return raw


def require_columns(dataset, split, **columns):
    """Fail with the config key to change when a named column is missing."""
    for key, column in columns.items():
        if column is not None and column not in dataset.column_names:
            raise HftuneError(
                f"{key} '{column}' is not a column of the {split} split.{closest(column, dataset.column_names)} "
                f"Columns: {dataset.column_names}."
            )


def class_names(raw, label_column):
    """Class names in id order (a ClassLabel's own names, else the sorted values seen in train),
    after checking every split's labels: none missing, none unlabelled (-1), none unseen in train."""
    feature = raw["train"].features[label_column]
    if isinstance(feature, ClassLabel):
        names = list(feature.names)
    else:
        values = raw["train"].unique(label_column)
        if any(v is None for v in values):
            raise HftuneError(f"label_column '{label_column}' has empty labels in the train split; drop or fill them.")
        names = [str(v) for v in sorted(values)]
    if len(names) < 2:
        raise HftuneError(f"label_column '{label_column}' has a single class {names}; need at least 2.")
    for split, dataset in raw.items():
        _check_split_labels(dataset, split, label_column, set(names), names)
    return names


def _check_split_labels(dataset, split, label_column, known, names):
    feature = dataset.features[label_column]
    if isinstance(feature, ClassLabel):
        if -1 in dataset.unique(label_column):  # how HF data sets mark unlabelled rows (e.g. GLUE test)
            raise HftuneError(f"the {split} split has unlabelled rows (label -1); use a labelled split.")
        values = feature.names
    else:
        values = dataset.unique(label_column)
    unseen = sorted(str(v) for v in values if str(v) not in known)
    if unseen:
        raise HftuneError(
            f"the {split} split has label(s) {unseen[:5]} that never occur in train (labels: {names}); "
            "fix the data or carve validation from train."
        )
