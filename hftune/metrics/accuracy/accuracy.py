"""Accuracy: the fraction of predictions equal to their reference (hftune's offline module). Config
`multilabel` (as evaluate's accuracy): 0/1 indicator rows, one column per label; a prediction counts
when its whole row equals the reference's (subset accuracy, scikit-learn's accuracy_score)."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Fraction of predictions that equal the reference label."
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted labels.
    references (list of int): true labels.
    normalize (bool): return the fraction (True, default) or the count of correct predictions.
    sample_weight (list of float): optional per-example weights.
Returns:
    accuracy (float)
Example:
    >>> metric = evaluate.load("hftune/metrics/accuracy/accuracy.py")
    >>> metric.compute(predictions=[0, 1], references=[0, 0])
    {'accuracy': 0.5}
    >>> metric = evaluate.load("hftune/metrics/accuracy/accuracy.py", config_name="multilabel")
    >>> metric.compute(predictions=[[1, 0], [1, 1]], references=[[1, 0], [0, 1]])
    {'accuracy': 0.5}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
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

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        if self.config_name == "multilabel":
            from sklearn.metrics import accuracy_score

            return {"accuracy": float(accuracy_score(references, predictions, normalize=normalize,
                                                     sample_weight=sample_weight))}
        correct = (np.asarray(predictions) == np.asarray(references)).astype(float)
        weights = np.ones_like(correct) if sample_weight is None else np.asarray(sample_weight, dtype=float)
        total = float((correct * weights).sum())
        return {"accuracy": total / float(weights.sum()) if normalize else total}
