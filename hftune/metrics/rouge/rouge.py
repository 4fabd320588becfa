"""ROUGE scores (hftune's offline module: Google's rouge-score package, which evaluate's `rouge` wraps,
with its arguments and result: the F-measure of each rouge type, averaged over the examples)."""

import datasets
import evaluate
import numpy as np
from rouge_score import rouge_scorer

_DESCRIPTION = "Overlap of n-grams (rouge1, rouge2) or of the longest common subsequence (rougeL) of two texts."
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): generated texts.
    references (list of str): reference texts.
    rouge_types (list of str): default ["rouge1", "rouge2", "rougeL", "rougeLsum"].
    use_stemmer (bool): Porter-stem words before comparing (default False).
    use_aggregator (bool): average over the examples (default True), else a list per type.
Returns:
    one F-measure per rouge type.
Example:
    >>> metric = evaluate.load("hftune/metrics/rouge/rouge.py")
    >>> metric.compute(predictions=["the cat sat"], references=["the cat sat down"], rouge_types=["rougeL"])
    {'rougeL': 0.857...}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Rouge(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references, rouge_types=None, use_stemmer=False, use_aggregator=True):
        rouge_types = rouge_types or ["rouge1", "rouge2", "rougeL", "rougeLsum"]
        scorer = rouge_scorer.RougeScorer(rouge_types=rouge_types, use_stemmer=use_stemmer)
        scores = [scorer.score(r, p) for p, r in zip(predictions, references)]
        per_type = {t: [float(s[t].fmeasure) for s in scores] for t in rouge_types}
        return {t: float(np.mean(v)) if v else 0.0 for t, v in per_type.items()} if use_aggregator else per_type
