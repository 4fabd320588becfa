"""F1 score, binary or averaged over classes (hftune's offline module). Config `multilabel`
(as evaluate's f1): predictions and references are 0/1 indicator rows, one column per label,
scored by scikit-learn's f1_score."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Harmonic mean of precision and recall, per class, then averaged."
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted labels.
    references (list of int): true labels.
    average (str): 'binary' (default, class `pos_label`), 'macro', 'micro' or 'weighted'.
    pos_label (int): the positive class for average='binary'.
    labels (list of int): classes to average over (default: every class seen; with config multilabel,
        every column).
Returns:
    f1 (float)
Example:
    >>> metric = evaluate.load("hftune/metrics/f1/f1.py")
    >>> metric.compute(predictions=[0, 1, 1], references=[0, 1, 0], average="macro")
    {'f1': 0.6666666666666666}
    >>> metric = evaluate.load("hftune/metrics/f1/f1.py", config_name="multilabel")
    >>> metric.compute(predictions=[[1, 0], [1, 1]], references=[[1, 0], [0, 1]], average="micro")
    {'f1': 0.8}
"""


def _per_class_f1(predictions, references, labels):
    scores, support = [], []
    for label in labels:
        true_pos = np.sum((predictions == label) & (references == label))
        predicted = np.sum(predictions == label)
        actual = np.sum(references == label)
        denominator = predicted + actual
        scores.append(2.0 * true_pos / denominator if denominator else 0.0)
        support.append(actual)
    return np.asarray(scores), np.asarray(support, dtype=float)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class F1(evaluate.Metric):
    def _info(self):
        value = datasets.Value("int64")
        if self.config_name == "multilabel":
            value = datasets.Sequence(datasets.Value("int64"))
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": value, "references": value}),
        )

    def _compute(self, predictions, references, average="binary", pos_label=1, labels=None):
        if self.config_name == "multilabel":
            from sklearn.metrics import f1_score

            # a label neither predicted nor present scores 0 (sklearn's default, without its warning)
            return {"f1": float(f1_score(references, predictions, labels=labels, pos_label=pos_label,
                                         average=average, zero_division=0))}
        predictions, references = np.asarray(predictions), np.asarray(references)
        if average == "binary":
            labels = [pos_label]
        elif labels is None:
            labels = sorted(set(predictions.tolist()) | set(references.tolist()))
        if average == "micro":
            # Single-label micro-F1 over all classes reduces to accuracy on those classes.
            true_pos = np.sum((predictions == references) & np.isin(references, labels))
            denominator = np.sum(np.isin(predictions, labels)) + np.sum(np.isin(references, labels))
            return {"f1": float(2.0 * true_pos / denominator) if denominator else 0.0}
        scores, support = _per_class_f1(predictions, references, labels)
        if average == "weighted":
            return {"f1": float((scores * support).sum() / support.sum()) if support.sum() else 0.0}
        if average in ("binary", "macro"):
            return {"f1": float(scores.mean())}
        raise ValueError(f"average must be 'binary', 'macro', 'micro' or 'weighted', got {average!r}")
