"""Exact match and F1 as the official SQuAD evaluation scripts define them (v1.1, and v2.0's rule that an
unanswerable question is answered right only by ""), hftune's offline module: answers are compared after
lower-casing and removing punctuation and the articles a/an/the; each question scores its best match
among its reference answers; both are means in percent."""

import datasets
import evaluate
import numpy as np

from hftune.metrics.token_f1.token_f1 import f1, words

_DESCRIPTION = "SQuAD's exact match and F1 (percent), the best over each question's reference answers."
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): the predicted answer of each question ("" for no answer).
    references (list of list of str): each question's reference answers ([] where it has none, SQuAD v2).
Returns:
    exact_match, f1 (floats, 0 to 100); with unanswerable questions also has_answer_exact_match,
    has_answer_f1 and no_answer_exact_match.
Example:
    >>> metric = evaluate.load("hftune/metrics/squad/squad.py")
    >>> metric.compute(predictions=["The Eiffel tower"], references=[["Eiffel Tower", "tower"]])["exact_match"]
    100.0
"""


def scores(prediction, answers):
    """(exact match, F1) of one question: against "" when it has no answer (SQuAD v2's rule)."""
    answers = answers or [""]
    exact = max(float(words(prediction) == words(answer)) for answer in answers)
    return exact, max(f1(prediction, answer) for answer in answers)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Squad(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Sequence(datasets.Value("string"))}),
        )

    def _compute(self, predictions, references):
        pairs = np.array([scores(p, r) for p, r in zip(predictions, references)]).reshape(-1, 2) * 100
        results = {"exact_match": float(pairs[:, 0].mean()), "f1": float(pairs[:, 1].mean())}
        answerable = np.array([bool(r) for r in references])
        if not answerable.all():
            results.update(has_answer_exact_match=float(pairs[answerable, 0].mean()) if answerable.any() else 0.0,
                           has_answer_f1=float(pairs[answerable, 1].mean()) if answerable.any() else 0.0,
                           no_answer_exact_match=float(pairs[~answerable, 0].mean()))
        return results
