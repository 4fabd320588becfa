"""Token F1 as SQuAD scores answers (hftune's own module): the F1 of the words two texts share,
after lower-casing and removing punctuation and the articles a/an/the."""

import re
import string
from collections import Counter

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Mean over the examples of the F1 of the words shared by prediction and reference (SQuAD's F1)."
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): generated texts.
    references (list of str): reference texts.
Returns:
    token_f1 (float): from 0 to 1.
Example:
    >>> metric = evaluate.load("hftune/metrics/token_f1/token_f1.py")
    >>> metric.compute(predictions=["The cat sat."], references=["a cat sat down"])["token_f1"]
    0.8
"""


def words(text):
    text = "".join(c for c in text.lower() if c not in set(string.punctuation))
    return re.sub(r"\b(a|an|the)\b", " ", text).split()


def f1(prediction, reference):
    predicted, wanted = words(prediction), words(reference)
    if not predicted or not wanted:
        return float(predicted == wanted)
    shared = sum((Counter(predicted) & Counter(wanted)).values())
    if shared == 0:
        return 0.0
    precision, recall = shared / len(predicted), shared / len(wanted)
    return 2 * precision * recall / (precision + recall)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class TokenF1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        scores = [f1(p, r) for p, r in zip(predictions, references)]
        return {"token_f1": float(np.mean(scores)) if scores else 0.0}
