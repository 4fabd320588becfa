"""Exact match rate (hftune's offline module, with evaluate's `exact_match` arguments and result)."""

import re
import string

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Share of predictions equal to their reference, after the optional normalizations."
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): generated texts.
    references (list of str): reference texts.
    regexes_to_ignore (list of str): regular expressions removed from both before comparing.
    ignore_case (bool): lower-case both first (default False).
    ignore_punctuation (bool): remove string.punctuation from both (default False).
    ignore_numbers (bool): remove digits from both (default False).
Returns:
    exact_match (float): from 0 to 1.
Example:
    >>> metric = evaluate.load("hftune/metrics/exact_match/exact_match.py")
    >>> metric.compute(predictions=["Positive.", "no"], references=["positive", "yes"], ignore_case=True,
    ...                ignore_punctuation=True)["exact_match"]
    0.5
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references, regexes_to_ignore=None, ignore_case=False, ignore_punctuation=False,
                 ignore_numbers=False):
        def normalize(text):
            for pattern in regexes_to_ignore or ():
                text = re.sub(pattern, "", text)
            if ignore_case:
                text = text.lower()
            removed = (string.punctuation if ignore_punctuation else "") + (string.digits if ignore_numbers else "")
            return text.translate(str.maketrans("", "", removed))

        same = [normalize(p) == normalize(r) for p, r in zip(predictions, references)]
        return {"exact_match": float(np.mean(same)) if same else 0.0}
