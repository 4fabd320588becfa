"""Pearson correlation coefficient (hftune's offline module: scipy.stats.pearsonr, with evaluate's
`pearsonr` arguments and result)."""

import datasets
import evaluate
from scipy.stats import pearsonr

_DESCRIPTION = "Linear correlation between predictions and references, from -1 to 1 (0: none)."
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of float): predicted values.
    references (list of float): true values.
    return_pvalue (bool): also return the two-sided p-value (default False).
Returns:
    pearsonr (float), and p-value (float) with return_pvalue=True.
Example:
    >>> metric = evaluate.load("hftune/metrics/pearsonr/pearsonr.py")
    >>> metric.compute(predictions=[1.0, 2.0, 3.0], references=[2.0, 4.0, 6.5])["pearsonr"]
    0.99...
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Pearsonr(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("float"), "references": datasets.Value("float")}),
        )

    def _compute(self, predictions, references, return_pvalue=False):
        result = pearsonr(references, predictions)
        if return_pvalue:
            return {"pearsonr": float(result[0]), "p-value": float(result[1])}
        return {"pearsonr": float(result[0])}
