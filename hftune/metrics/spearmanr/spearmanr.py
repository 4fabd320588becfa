"""Spearman rank correlation coefficient (hftune's offline module: scipy.stats.spearmanr, with
evaluate's `spearmanr` arguments and result)."""

import datasets
import evaluate
from scipy.stats import spearmanr

_DESCRIPTION = "Correlation between the ranks of predictions and references, from -1 to 1 (0: none)."
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of float): predicted values.
    references (list of float): true values.
    return_pvalue (bool): also return the two-sided p-value (default False).
Returns:
    spearmanr (float), and spearmanr_pvalue (float) with return_pvalue=True.
Example:
    >>> metric = evaluate.load("hftune/metrics/spearmanr/spearmanr.py")
    >>> metric.compute(predictions=[1.0, 2.0, 3.0], references=[1.0, 4.0, 9.0])
    {'spearmanr': 1.0}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Spearmanr(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("float"), "references": datasets.Value("float")}),
        )

    def _compute(self, predictions, references, return_pvalue=False):
        result = spearmanr(predictions, references)
        if return_pvalue:
            return {"spearmanr": float(result[0]), "spearmanr_pvalue": float(result[1])}
        return {"spearmanr": float(result[0])}
