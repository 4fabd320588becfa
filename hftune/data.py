"""Load the raw splits a run needs: a Hub data set, an offline asset, or local files/folders.

With `streaming: true` the train split is a `datasets.IterableDataset` read lazily as training
consumes it (tasks preprocess it with IterableDataset.map); validation and test are read once into
ordinary map-style data sets, so evaluation works as without streaming. Which rows each process
reads is left to accelerate (see `shuffle_stream`).

Example:
    >>> from hftune.config import DataArguments
    >>> raw = load_raw_datasets(DataArguments(train_file="train.csv"), seed=42)  # doctest: +SKIP
    >>> sorted(raw)  # validation carved from train
    ['train', 'validation']
"""

import json
import logging
import math
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from datasets import Dataset, DatasetDict, IterableDataset, load_dataset
from datasets.exceptions import DatasetGenerationCastError, DatasetGenerationError

from hftune.assets import get_asset, is_asset
from hftune.columns import detect_columns
from hftune.files import not_utf8, ragged_row
from hftune.errors import HftuneError, closest
from hftune.tasks import TASKS
from hftune.training.optim import optimizer_spec, schedule_kwargs

logger = logging.getLogger("hftune")


@dataclass
class BaseDataArguments:
    """Where the data comes from and how much of it; each task adds its own fields (its DataFields)."""

    task: str = field(
        default=None,
        metadata={"help": f"Task family: {', '.join(TASKS)}. Default: inferred from the checkpoint (a language model "
                          "or an image model) and the data (a .txt corpus, an image folder) where that is unambiguous."},
    )
    dataset_name: str = field(
        default=None, metadata={"help": "Hub data set id, or an offline asset such as 'asset:tweet-sentiment'."}
    )
    dataset_config_name: str = field(default=None, metadata={"help": "Configuration name of the Hub data set."})
    train_file: str = field(
        default=None, metadata={"help": "Local training data: csv, json, jsonl, parquet, txt, or an image folder."}
    )
    validation_file: str = field(default=None, metadata={"help": "Local validation data (same formats)."})
    test_file: str = field(default=None, metadata={"help": "Local test data (same formats)."})
    label_column: str = field(
        default=None, metadata={"help": "Column holding the class label (default: label or labels, detected)."}
    )
    max_train_samples: int = field(default=None, metadata={"help": "Keep at most this many training examples."})
    max_eval_samples: int = field(default=None, metadata={"help": "Keep at most this many evaluation examples."})
    validation_split_percentage: float = field(
        default=5,
        metadata={"help": "Percent of train held out for validation when no validation split is given."},
    )
    preprocessing_num_workers: int = field(default=None, metadata={"help": "Processes used by datasets.map."})
    shuffle_train_dataset: bool = field(
        default=False, metadata={"help": "Shuffle the train split (with seed) before max_train_samples takes its "
                                         "first rows (run_classification.py's option)."},
    )
    streaming: bool = field(
        default=False,
        metadata={"help": "Read the training data as a stream (datasets IterableDataset) instead of loading it; "
                          "needs max_steps. Each process reads its own rows."},
    )


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


def is_squad_file(path):
    """A JSON file holding one object whose rows are under "data" (SQuAD's files), not JSON Lines."""
    with open(path, "rb") as handle:
        if not re.match(rb'\{\s*"(version|data)"\s*:', handle.read(256).lstrip()):
            return False
        handle.seek(0)
        try:
            return isinstance(json.load(handle).get("data"), list)
        except ValueError:  # JSON Lines: more than one object
            return False


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
    """A DatasetDict, or an IterableDatasetDict of streams with `streaming: true`."""
    common = dict(cache_dir=cache_dir, streaming=data_args.streaming)  # for every load_dataset call
    if is_asset(data_args.dataset_name):
        if data_args.dataset_config_name:
            raise HftuneError("dataset_config_name does not apply to an asset: data set; drop it.")
        asset = get_asset(data_args.dataset_name, "dataset")
        raw = load_dataset(asset.builder, data_files=asset.locate(), **common, **asset.builder_kwargs)
        return raw.rename_columns(asset.rename_columns)
    if data_args.dataset_name:
        return load_dataset(data_args.dataset_name, data_args.dataset_config_name, **common)
    if not (data_args.train_file or data_args.validation_file or data_args.test_file):
        raise HftuneError("no data: set dataset_name, or train_file (and optionally validation_file/test_file).")
    builder, files = _local_files(data_args)
    if builder == "imagefolder":
        return DatasetDict(
            {split: load_dataset("imagefolder", data_dir=path, split="train", **common)
             for split, path in files.items()}
        )
    if builder == "csv" and any(Path(p).suffix.lower() == ".tsv" for p in files.values()):
        common["delimiter"] = "\t"
    if builder == "csv":
        _check_csv_rows(files, common.get("delimiter", ","))
    if builder == "text":
        common["keep_linebreaks"] = getattr(data_args, "keep_linebreaks", False)
    if builder == "json" and all(is_squad_file(path) for path in files.values()):
        common["field"] = "data"  # SQuAD's {"version": ..., "data": [rows]}, as run_qa.py reads it
    try:
        return load_dataset(builder, data_files=files, **common)
    except DatasetGenerationError as err:
        if isinstance(err.__cause__, UnicodeDecodeError):
            raise HftuneError(_not_utf8(files)) from None
        if not isinstance(err, DatasetGenerationCastError) and not _is_cast_error(err):
            raise
        # The files' columns or column types differ (e.g. one lacks the label column): read each on its
        # own, so that the task names the column's config key and split instead of datasets' cast error.
        return DatasetDict({split: load_dataset(builder, data_files={split: path}, split=split, **common)
                            for split, path in files.items()})


def _is_cast_error(err):
    """arrow could not give a later file the first file's column types."""
    cause = str(err.__cause__ or "")
    return cause.startswith(("Couldn't cast", "Failed to parse string"))


def _check_csv_rows(files, delimiter):
    for split, path in files.items():
        found = ragged_row(f"{split}_file", path, delimiter)
        if found:
            raise HftuneError(found)


def _not_utf8(files):
    """Which file and line are not UTF-8 (datasets' error names neither)."""
    for split, path in files.items():
        found = not_utf8(f"{split}_file", path)
        if found:
            return found
    return "the data is not valid UTF-8; re-encode the files as UTF-8."


def _carve_validation(raw, percentage, seed):
    if "validation" in raw or percentage == 0:
        return raw
    if is_stream(raw["train"]):
        raise HftuneError(
            "validation_split_percentage cannot carve a validation split out of a stream (streaming: true); give one "
            "(validation_file, or a dataset_name that has one), or set validation_split_percentage: 0."
        )
    rows = len(raw["train"])
    if not 1 <= math.ceil(rows * percentage / 100) < rows:  # datasets' ValueError otherwise (it rounds up)
        raise HftuneError(f"validation_split_percentage {percentage} of the {rows} train row(s) leaves no validation or "
                          "no train row; add rows, give a validation_file, or set validation_split_percentage: 0.")
    split = raw["train"].train_test_split(test_size=percentage / 100, seed=seed)
    raw["train"], raw["validation"] = split["train"], split["test"]
    return raw


def is_stream(dataset):
    return isinstance(dataset, IterableDataset)


def _read_streams(streams, data_args):
    """The train stream with its columns known (from its first rows), and the other splits read
    into memory (validation capped at max_eval_samples): evaluation needs their length."""
    splits = {}
    for split, stream in streams.items():
        if next(iter(stream.take(1)), None) is None:
            raise HftuneError(f"the {split} split is empty; check the data file.")
        if split == "train":
            # How datasets itself (concatenate_datasets, interleave_datasets) learns a stream's features.
            splits[split] = stream._resolve_features()
        else:
            limit = data_args.max_eval_samples if split == "validation" else None
            rows = stream.take(limit) if limit is not None else stream
            splits[split] = Dataset.from_list(list(rows), features=stream.features)
    return splits


def limit_splits(splits, data_args):
    """The first max_train_samples / max_eval_samples examples of train / validation. Tasks call
    it where HF's example scripts apply them: on rows for classification (before tokenizing),
    on blocks for a packed causal LM (after grouping)."""
    limits = {"train": data_args.max_train_samples, "validation": data_args.max_eval_samples}
    limited = {}
    for split, ds in splits.items():
        limit = limits.get(split)
        if limit is not None and is_stream(ds):
            ds = ds.take(limit)
        elif limit is not None and len(ds) > limit:
            ds = ds.select(range(limit))
        limited[split] = ds
    return limited


@contextmanager
def _readable_errors():
    """datasets' and the file system's errors as one-line HftuneErrors."""
    try:
        yield
    except HftuneError:
        raise
    except UnicodeDecodeError as err:
        raise HftuneError(f"data is not valid UTF-8 ({err.reason} at byte {err.start}); re-encode the file.") from None
    except DatasetGenerationError as err:
        cause = str(err.__cause__ or err).splitlines()[0]
        raise HftuneError(f"could not read the data ({cause}); check that no file is empty or malformed.") from None
    except (OSError, ValueError) as err:  # missing files, no network, unknown data set
        raise HftuneError(f"could not load the data set: {str(err).splitlines()[0]}") from None


def load_raw_datasets(data_args, seed=42, cache_dir=None, keep_test=False):
    """DatasetDict with 'train', 'validation' where the data allows, and 'test' if keep_test.
    Other splits (e.g. an unlabelled 'unsupervised') are left out. With `streaming: true`, a dict
    whose 'train' is an IterableDataset (the other splits are map-style)."""
    wanted = ("train", "validation", "test") if keep_test else ("train", "validation")
    with _readable_errors():
        raw = {split: ds for split, ds in _load(data_args, cache_dir).items() if split in wanted}
        if "train" not in raw:
            raise HftuneError("the data has no train split; set train_file, or a dataset_name that has one.")
        raw = _read_streams(raw, data_args) if data_args.streaming else DatasetDict(raw)
    raw = _carve_validation(raw, data_args.validation_split_percentage, seed)
    if data_args.shuffle_train_dataset and not is_stream(raw["train"]):
        raw["train"] = raw["train"].shuffle(seed=seed)
    raw = detect_columns(raw, data_args)
    _unlabel_test(raw, data_args.label_column)
    for split, dataset in raw.items():
        if not is_stream(dataset) and len(dataset) == 0:
            raise HftuneError(f"the {split} split is empty; check the data file or max_*_samples.")
    return raw


def _unlabel_test(raw, label_column):
    """A test file without the label column arrives with it all empty (datasets gives every file of
    one load the same columns): drop it, so the split is predicted without labels."""
    test = raw.get("test")
    if test is not None and not is_stream(test) and label_column in test.column_names:
        if all(value is None for value in test[label_column]):  # (unique() has no kernel for list labels)
            raw["test"] = test.remove_columns(label_column)


def apply_batched(dataset, method, function, num_proc=None, desc=None, **kwargs):
    """`dataset.map` / `dataset.filter` in batches: run now and cached by datasets for a map-style
    split (on num_proc processes); for a stream, run lazily on each batch as training reads it."""
    if not is_stream(dataset):
        kwargs.update(num_proc=num_proc, desc=desc)
    return getattr(dataset, method)(function, batched=True, **kwargs)


def drop_empty_texts(dataset, split, columns, num_proc=None):
    """(dataset without the rows whose text in any of `columns` is None or blank, how many it dropped).
    Such a row has no input to learn from or score: it is skipped with a warning, and the run reports
    the count as `<split>_skipped_rows` (TaskBundle.skipped_rows). A stream is filtered as it is read:
    its count is unknown (None)."""
    columns = [c for c in columns if c]

    def has_text(batch):
        rows = zip(*(batch[c] for c in columns))
        return [all(t is not None and str(t).strip() for t in row) for row in rows]

    kept = apply_batched(dataset, "filter", has_text, num_proc=num_proc, desc=f"dropping empty texts in {split}")
    if is_stream(dataset):
        return kept, None
    dropped = len(dataset) - len(kept)
    if dropped:
        logger.warning(f"skipping {dropped} row(s) of the {split} split with an empty or missing {' / '.join(columns)}.")
    return kept, dropped


def check_not_empty(dataset, split):
    if not is_stream(dataset) and len(dataset) == 0:
        raise HftuneError(f"the {split} split has no usable row (every text is empty); check the data.")


SHUFFLE_BUFFER = 10_000  # examples a shuffled stream draws from (datasets' default is 1,000)


def shuffle_stream(dataset, args):
    """`train_sampling_strategy: random` for a stream: shard order and a buffer of SHUFFLE_BUFFER
    examples shuffled with the run's seed (reshuffled each epoch through set_epoch); sequential
    keeps the stream's order. Every process draws the same order from the same seed, so
    accelerate's per-process split of the stream (each process's own shards, or its own slice of
    every global batch) still hands each process distinct rows.

    Example:
        >>> train = shuffle_stream(train, training_args)  # doctest: +SKIP
    """
    if not is_stream(dataset) or args.train_sampling_strategy == "sequential":
        return dataset
    seed = args.data_seed if args.data_seed is not None else args.seed
    return dataset.shuffle(seed=seed, buffer_size=SHUFFLE_BUFFER)


def check_streaming(data_args, args):
    """Refuse, before any data is read, what a stream (no length, no random access) cannot do."""
    if not data_args.streaming:
        return
    problems = {
        "max_steps > 0 (a stream has no length to count epochs by)": args.do_train and args.max_steps <= 0,
        "engine: trainer": args.engine != "trainer",
        "train_sampling_strategy random or sequential": args.train_sampling_strategy not in ("random", "sequential"),
        "an optimizer other than gd (it steps once per pass over the whole set)":
            getattr(optimizer_spec(args), "full_batch", False),
        "lr_scheduler_kwargs interval: step (an epoch of a stream has no known length)":
            schedule_kwargs(args).get("interval") == "epoch",
    }
    for needed, missing in problems.items():
        if missing:
            raise HftuneError(f"streaming: true needs {needed}; change the config, or drop streaming.")


def require_columns(dataset, split, **columns):
    """Fail with the config key to change when a named column is missing."""
    for key, column in columns.items():
        if column is not None and column not in dataset.column_names:
            raise HftuneError(
                f"{key} '{column}' is not a column of the {split} split.{closest(column, dataset.column_names)} "
                f"Columns: {dataset.column_names}."
            )


def label_column_of(dataset, split, label_column):
    """The label column a split must have: every split but test, which may be unlabelled (do_predict)."""
    return None if split == "test" and label_column not in dataset.column_names else label_column
