"""What the classification tasks predict, read from the train split's label column as transformers'
run_classification.py reads it: floats -> regression (one output, MSE), lists of class names or ids
-> multi-label classification (one sigmoid per label, BCE), anything else -> single-label classes
(hftune.classes.class_names, softmax, cross-entropy). `do_regression` (run_classification.py's name)
overrides the detection: true regresses on integer scores too, false never regresses.

The kind reaches transformers as `config.problem_type`, from which the model picks its loss and
`transformers.pipeline` its activation (none for regression, sigmoid for multi-label).

Example:
    >>> from datasets import Dataset, DatasetDict
    >>> raw = DatasetDict(train=Dataset.from_dict({"label": [["sports"], ["politics", "sports"], []]}))
    >>> labels = detect_labels(raw, "label")
    >>> labels.kind, labels.names
    ('multi_label_classification', ['politics', 'sports'])
    >>> labels.encoder("train", raw["train"].features["label"])([["sports"]])
    [[0.0, 1.0]]
"""

import importlib.util
import math
from dataclasses import dataclass, field

import numpy as np
from datasets import ClassLabel, LargeList, List, Value

from hftune.classes import class_names, label_ids
from hftune.data import is_stream
from hftune.errors import HftuneError
from hftune.metrics import load_metric

SINGLE, REGRESSION, MULTI = "single_label_classification", "regression", "multi_label_classification"
MAIN_METRIC = {REGRESSION: "eval_pearson", MULTI: "eval_f1_micro"}
# With do_regression: false, a float column holding more distinct non-integral values than this is a
# score (e.g. STS-B's 0.0-5.0 similarity), not a set of classes: one class per value would be nonsense.
MAX_DECIMAL_CLASSES = 20


@dataclass
class LabelFields:
    """The classification tasks' label fields."""

    do_regression: bool = field(
        default=None,
        metadata={"help": "Regress on label_column (one output, MSE loss): true forces it (e.g. integer scores), false "
                          "forbids it; default: regression when the train labels are floats, multi-label "
                          "classification when they are lists, else single-label classes."},
    )


@dataclass(frozen=True)
class Labels:
    """The detected kind (a transformers problem_type) and the class names in head order ([] for regression)."""

    kind: str
    names: list
    column: str

    def head(self):
        """config settings of the head: class names (single- and multi-label) or one output (regression),
        and the problem_type, also over a checkpoint fine-tuned for another kind (transformers would set
        single-label's at the first forward too, where the checkpoint has none)."""
        names = ["LABEL_0"] if self.kind == REGRESSION else self.names  # transformers' name of a lone output
        return {"id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)},
                "problem_type": self.kind}

    def encoder(self, split, feature):
        """The callable turning a batch of this split's labels into the model's targets."""
        names = list(feature.names) if isinstance(feature, ClassLabel) else None
        if isinstance(feature, (List, LargeList)) and isinstance(feature.feature, ClassLabel):
            names = list(feature.feature.names)
        return LabelEncoder(self.kind, self.names, names, split, self.column)

    def metrics(self):
        """(compute_metrics, main metric) of regression or multi-label; single-label's are the task's own."""
        return (regression_metrics() if self.kind == REGRESSION else multi_label_metrics()), MAIN_METRIC[self.kind]


class LabelEncoder:
    """Labels of a batch -> targets: class ids (single-label), floats (regression), multi-hot float
    vectors (multi-label). A plain object, so DataLoader workers started with spawn can unpickle it. A
    map-style split was checked up front; a stream's rows are checked here, as they are read."""

    def __init__(self, kind, names, split_names, split, column):
        self.kind, self.to_id, self.split_names = kind, {n: i for i, n in enumerate(names)}, split_names
        self.split, self.column = split, column

    def __call__(self, values):
        if self.kind == SINGLE:
            return label_ids([self.split_names[v] for v in values] if self.split_names else values, self.to_id,
                             self.split)
        for row, value in enumerate(values):
            if value is None or (self.kind == MULTI and (not isinstance(value, list) or None in value)):
                raise HftuneError(f"label_column '{self.column}' of the {self.split} split has "
                                  f"{_describe(value)} in a batch (row {row} of it); fix or drop such rows.")
        if self.kind == REGRESSION:
            return [float(v) for v in values]
        vectors = []
        for value in values:
            vector = [0.0] * len(self.to_id)
            names = [self.split_names[v] for v in value] if self.split_names else value
            for i in label_ids(names, self.to_id, self.split):
                vector[i] = 1.0
            vectors.append(vector)
        return vectors


def _describe(value):
    if value is None:
        return "no label (None)"
    if isinstance(value, list):
        return f"an empty label (None) in {value!r}"
    return f"{value!r}, not a list of labels"


# ---- checks ----


def check_label_config(model_args, data_args, training_args):
    """Parse-time: what regression (do_regression: true) cannot go with (detected kinds: check_label_features)."""
    if data_args.do_regression and training_args.label_smoothing_factor:
        raise HftuneError("label_smoothing_factor smooths class targets, and do_regression: true has none; drop it.")


def check_label_features(labels, model_args):
    """Refuse, once the kind is known, a feature that assumes one class per example."""
    if labels.kind != SINGLE and getattr(model_args, "teacher_model_name_or_path", None):
        what = "regression" if labels.kind == REGRESSION else "multi-label classification"
        raise HftuneError(f"teacher_model_name_or_path: distillation matches the teacher's softmax over classes, "
                          f"which {what} (label_column '{labels.column}') does not have; drop the teacher.")


# ---- detection ----


def detect_labels(raw, label_column, do_regression=None):
    """The Labels of `raw` (its train split decides the kind), after checking every labelled split."""
    feature = raw["train"].features[label_column]
    lists = _is_list_feature(feature)  # (rows mixing lists and single labels: hftune.columns.check_column_types)
    if lists and do_regression:
        raise HftuneError(f"do_regression: true, but label_column '{label_column}' holds lists of labels "
                          "(multi-label classification); drop do_regression.")
    if lists:
        return Labels(MULTI, _multi_label_names(raw, label_column), label_column)
    if do_regression or (do_regression is None and _is_score(raw["train"], label_column, feature)):
        _check_regression(raw, label_column, feature)
        return Labels(REGRESSION, [], label_column)
    if do_regression is False and _is_float(feature):
        _check_not_a_score(raw["train"], label_column)
    _check_not_list_text(raw["train"], label_column, feature)
    return Labels(SINGLE, class_names(raw, label_column), label_column)


def _is_float(feature):
    return isinstance(feature, Value) and feature.dtype in ("float16", "float32", "float64")


def _is_score(dataset, column, feature):
    """Float labels that are not all whole numbers: an integer class column with an empty cell is
    read as floats (NaN there) and stays classes (its empty label is then named by row)."""
    if not _is_float(feature) or is_stream(dataset):
        return _is_float(feature)
    values = [v for v in dataset.unique(column) if v is not None and not math.isnan(v)]
    return not values or any(not float(v).is_integer() for v in values)


def _is_list_feature(feature):
    return isinstance(feature, (List, LargeList))


def _rows(dataset, column):
    """The column's values of a map-style split (None for a stream: it is checked as it is read)."""
    return None if is_stream(dataset) else list(dataset[column])


def _first_bad_row(values, bad):
    return next((i for i, v in enumerate(values) if bad(v)), None)


def _check_regression(raw, column, feature):
    if isinstance(feature, ClassLabel):
        raise HftuneError(f"do_regression: true, but label_column '{column}' holds classes {feature.names[:5]} (a "
                          "ClassLabel), not scores; drop do_regression, or give the scores as numbers.")
    for split, dataset in raw.items():
        if column not in dataset.column_names or is_stream(dataset):
            continue
        values = _rows(dataset, column)
        row = _first_bad_row(values, lambda v: v is None)
        if row is not None:
            raise HftuneError(f"label_column '{column}' of the {split} split has no label at row {row} (regression "
                              "needs a score on every row); fill or drop such rows.")
        row = _first_bad_row(values, lambda v: not _is_number(v))
        if row is not None:
            raise HftuneError(f"do_regression: true, but label_column '{column}' of the {split} split holds "
                              f"{values[row]!r} at row {row}, not a number; drop do_regression for classes.")
        row = _first_bad_row(values, lambda v: not math.isfinite(float(v)))
        if row is not None:
            raise HftuneError(f"label_column '{column}' of the {split} split has the non-finite score "
                              f"{values[row]!r} at row {row}; fix or drop such rows.")
        if split == "train" and len(set(map(float, values))) < 2:
            raise HftuneError(f"label_column '{column}' of the train split has the single score {values[0]!r} on "
                              "every row; a regression needs varying scores.")


def _is_number(value):
    if isinstance(value, bool):
        return False
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def _check_not_a_score(dataset, column):
    """do_regression: false on a float column: fine for a few class values (0.5, 1.0, 1.5 stars),
    refused for a score with many distinct decimals, where one class per value would be nonsense."""
    values = {v for v in (_rows(dataset, column) or []) if v is not None}
    decimals = [v for v in values if not float(v).is_integer()]
    if decimals and len(values) > MAX_DECIMAL_CLASSES:
        raise HftuneError(f"do_regression: false, but label_column '{column}' holds {len(values)} distinct decimal "
                          f"values (e.g. {sorted(decimals)[:3]}): a score, which would make one class per value; "
                          "drop do_regression (or set it true) to regress on it, or give class labels.")


def _check_not_list_text(dataset, column, feature):
    """A CSV cannot hold lists: a list column written to CSV comes back as text like "['a', 'b']",
    which would silently become one class per combination of labels."""
    if not (isinstance(feature, Value) and feature.dtype in ("string", "large_string")) or is_stream(dataset):
        return
    values = [v for v in _rows(dataset, column) if v is not None]
    if values and all(v.strip().startswith("[") and v.strip().endswith("]") for v in values):
        raise HftuneError(f"label_column '{column}' holds text that looks like lists (e.g. {values[0]!r}), which would "
                          "make one class per combination; for multi-label classification give real lists (JSON "
                          "lines or parquet files: a CSV file cannot hold them).")


def _multi_label_names(raw, column):
    """Label names in head order: the list's ClassLabel names, else the sorted values (ids numerically)
    seen in train (in validation when train is a stream), after checking every labelled split."""
    train = raw["train"]
    inner = getattr(train.features[column], "feature", None)
    source = "validation" if is_stream(train) else "train"
    if isinstance(inner, ClassLabel):
        names, source = list(inner.names), "train"
    elif source not in raw:
        raise HftuneError(f"streaming: true cannot read the whole train stream to learn the labels of label_column "
                          f"'{column}'; give a validation split holding every label (validation_file), or stream "
                          "data whose lists hold ClassLabel ids.")
    else:
        names = _sorted_names(_split_label_values(raw[source], source, column))
    if not names:
        raise HftuneError(f"label_column '{column}' of the {source} split holds only empty lists; a multi-label "
                          "classifier needs at least one label.")
    for split, dataset in raw.items():
        if is_stream(dataset) or column not in dataset.column_names:
            continue
        unseen = sorted(set(map(str, _split_label_values(dataset, split, column))) - set(names))
        if unseen:
            raise HftuneError(
                f"the {split} split has label(s) {unseen[:5]} that never occur in {source} (labels: {names}); "
                f"fix the data{' or carve validation from train' if source == 'train' else ''}.")
    return names


def _split_label_values(dataset, split, column):
    """Every label in a split's lists (ClassLabel ids as names), after checking each row is a list
    without empty labels: an empty list is a row without labels, None is a missing row."""
    values = _rows(dataset, column)
    row = _first_bad_row(values, lambda v: not isinstance(v, list) or None in v)
    if row is not None:
        raise HftuneError(f"label_column '{column}' of the {split} split has {_describe(values[row])} at row {row}; "
                          "give every row a list of labels ([] for none).")
    inner = getattr(dataset.features[column], "feature", None)
    flat = [label for value in values for label in value]
    if isinstance(inner, ClassLabel):
        return [inner.names[i] for i in flat]
    kinds = {type(v) for v in flat}
    if len(kinds) > 1:
        raise HftuneError(f"label_column '{column}' of the {split} split mixes label types "
                          f"{sorted(k.__name__ for k in kinds)}; give every label as a name, or every label as an id.")
    return flat


def _sorted_names(values):
    return [str(v) for v in sorted(set(values))]


# ---- metrics ----


def _metrics(*specs):
    """The metric modules (`load_metric` arguments), checked now for the libraries they compute with,
    so a missing one stops the run before training, not at its first evaluation."""
    missing = [package for module, package in (("scipy", "scipy"), ("sklearn", "scikit-learn"))
               if importlib.util.find_spec(module) is None]
    if missing:
        raise HftuneError(f"regression and multi-label metrics need {' and '.join(missing)}; "
                          f"pip install {' '.join(missing)}.")
    return [load_metric(*spec) for spec in specs]


def regression_metrics():
    """mse, rmse, pearson, spearman of the single output against the scores."""
    mse, pearson, spearman = _metrics(("mse",), ("pearsonr",), ("spearmanr",))

    def compute_metrics(eval_pred):
        predictions = np.asarray(eval_pred.predictions, dtype=np.float64).reshape(-1)
        references = np.asarray(eval_pred.label_ids, dtype=np.float64).reshape(-1)
        both = dict(predictions=predictions, references=references)
        return {"mse": mse.compute(**both)["mse"], "rmse": mse.compute(**both, squared=False)["mse"],
                "pearson": pearson.compute(**both)["pearsonr"], "spearman": spearman.compute(**both)["spearmanr"]}

    return compute_metrics


def multi_label_metrics():
    """f1_micro, f1_macro and subset_accuracy (the whole label set right) of sigmoid > 0.5, i.e. logit > 0."""
    f1, accuracy = _metrics(("f1", "multilabel"), ("accuracy", "multilabel"))

    def compute_metrics(eval_pred):
        predictions = (np.asarray(eval_pred.predictions) > 0).astype(np.int64)
        references = np.rint(np.asarray(eval_pred.label_ids)).astype(np.int64)
        both = dict(predictions=predictions, references=references)
        return {"f1_micro": f1.compute(**both, average="micro")["f1"],
                "f1_macro": f1.compute(**both, average="macro")["f1"],
                "subset_accuracy": accuracy.compute(**both)["accuracy"]}

    return compute_metrics
