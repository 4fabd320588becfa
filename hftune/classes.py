"""The classes of a classification label column: their names read from the data (a ClassLabel's, or
the values seen), every split's labels checked against them before training, and a stream's checked
as its rows are read."""

from datasets import ClassLabel

from hftune.data import is_stream
from hftune.errors import HftuneError


def label_ids(values, to_id, split):
    """Class ids of a batch of labels (as class names). A stream's labels cannot be checked up
    front, so one outside the known classes stops training here, named."""
    try:
        return [to_id[str(v)] for v in values]
    except KeyError as err:
        raise HftuneError(
            f"the {split} split has label {err.args[0]!r}, not one of the classes {list(to_id)}; with streaming: true "
            "the classes come from the validation split (or the data's ClassLabel): add it there, or fix the data."
        ) from None


def class_names(raw, label_column):
    """Class names in id order (a ClassLabel's own names, else the sorted values seen in train, or
    in validation when train is a stream, which cannot be read through up front), after checking
    every map-style split's labels: none missing, none unlabelled (-1), none unknown."""
    feature = raw["train"].features[label_column]
    source = "validation" if is_stream(raw["train"]) else "train"
    if isinstance(feature, ClassLabel):
        names, source = list(feature.names), "train"
    elif source not in raw:
        raise HftuneError(
            f"streaming: true cannot read the whole train stream to learn the classes of label_column "
            f"'{label_column}'; give a validation split holding every class (validation_file), or stream data "
            "whose label column is a ClassLabel."
        )
    else:
        values = raw[source].unique(label_column)
        if any(v is None for v in values):
            raise HftuneError(
                f"label_column '{label_column}' has empty labels in the {source} split (first at row "
                f"{_first_row(raw[source], label_column, None)}); drop or fill them."
            )
        if source == "train":  # a validation split may simply lack a class
            _check_integer_labels(raw[source], source, label_column, values)
        names = [str(v) for v in sorted(values)]
    if len(names) < 2:
        raise HftuneError(f"label_column '{label_column}' has a single class {names}; need at least 2.")
    for split, dataset in raw.items():
        # a stream's labels are checked as it is read (label_ids); an unlabelled test split is only predicted
        if not is_stream(dataset) and label_column in dataset.column_names:
            _check_split_labels(dataset, split, label_column, set(names), names, source)
    return names


def _first_row(dataset, column, value):
    return dataset[column].index(value)


def _check_integer_labels(dataset, split, label_column, values):
    """Integer labels are class ids: -1 marks an unlabelled row in HF data sets, and a gap in the ids
    (0, 1, 2, 7) is almost always a typo that would silently add a class. Consecutive ids (0..K-1, or
    1..K as in star ratings) are the classes themselves."""
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return
    ids = sorted(values)
    odd = ids[0] if ids[0] < 0 else next((b for a, b in zip(ids, ids[1:]) if b != a + 1), None)
    if odd is None:
        return
    why = "-1 marks unlabelled rows" if odd < 0 else f"ids {ids[:10]} are not consecutive"
    raise HftuneError(
        f"label_column '{label_column}' of the {split} split has label {odd} at row "
        f"{_first_row(dataset, label_column, odd)} ({why}); fix or drop such rows, or give the classes as names."
    )


def _check_split_labels(dataset, split, label_column, known, names, source):
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
            f"the {split} split has label(s) {unseen[:5]} that never occur in {source} (labels: {names}); "
            f"fix the data{' or carve validation from train' if source == 'train' else ''}."
        )
