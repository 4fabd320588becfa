"""Entity-level precision, recall and F1 in the CoNLL sense, and token accuracy, computed by the
`seqeval` package as evaluate's seqeval metric computes them (hftune's offline copy of its interface)."""

import datasets
import evaluate
from seqeval.metrics import accuracy_score, classification_report

_DESCRIPTION = "seqeval: entity-level P/R/F1 (an entity counts when its type and whole span match) and token accuracy."
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of list of str): predicted tags per sentence.
    references (list of list of str): reference tags per sentence.
    scheme (str, optional): a strict-mode scheme (IOB1, IOB2, IOE1, IOE2, IOBES, BILOU); default: CoNLL's lenient one.
    mode (str, optional): "strict" with a scheme.
    zero_division (0, 1 or "warn"): the value of a score whose denominator is 0.
Returns:
    {entity type: {precision, recall, f1, number}}, overall_precision, overall_recall, overall_f1, overall_accuracy.
Example:
    >>> metric = evaluate.load("hftune/metrics/seqeval/seqeval.py")
    >>> metric.compute(predictions=[["B-PER", "I-PER", "O"]], references=[["B-PER", "I-PER", "O"]])["overall_f1"]
    1.0
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Seqeval(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Sequence(datasets.Value("string")),
                                        "references": datasets.Sequence(datasets.Value("string"))}),
        )

    def _compute(self, predictions, references, suffix=False, scheme=None, mode=None, sample_weight=None,
                 zero_division="warn"):
        if scheme is not None:
            import importlib

            scheme = getattr(importlib.import_module("seqeval.scheme"), scheme)
        report = classification_report(y_true=references, y_pred=predictions, suffix=suffix, output_dict=True,
                                       scheme=scheme, mode=mode, sample_weight=sample_weight,
                                       zero_division=zero_division)
        report.pop("macro avg")
        report.pop("weighted avg")
        overall = report.pop("micro avg")
        scores = {name: {"precision": score["precision"], "recall": score["recall"], "f1": score["f1-score"],
                         "number": score["support"]} for name, score in report.items()}
        scores.update(overall_precision=overall["precision"], overall_recall=overall["recall"],
                      overall_f1=overall["f1-score"], overall_accuracy=accuracy_score(y_true=references,
                                                                                      y_pred=predictions))
        return scores
