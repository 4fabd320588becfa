"""Mean squared error, or its root (hftune's offline module: scikit-learn's, with evaluate's `mse` arguments).

evaluate's own `mse` passes `squared` to sklearn's mean_squared_error, which scikit-learn 1.6 removed;
this one calls root_mean_squared_error for squared=False instead."""

import datasets
import evaluate
from sklearn.metrics import mean_squared_error, root_mean_squared_error

_DESCRIPTION = "Mean of the squared differences between predictions and references (or its square root)."
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of float): predicted values.
    references (list of float): true values.
    sample_weight (list of float): optional per-example weights.
    multioutput (str): 'uniform_average' (default) or 'raw_values' (config 'multilist' only).
    squared (bool): the mean squared error (True, default) or its square root (False).
Returns:
    mse (float): the MSE, or the RMSE with squared=False.
Example:
    >>> metric = evaluate.load("hftune/metrics/mse/mse.py")
    >>> metric.compute(predictions=[2.5, 0.0, 2.0, 8.0], references=[3.0, -0.5, 2.0, 7.0])
    {'mse': 0.375}
    >>> metric.compute(predictions=[1.0, 1.0], references=[0.0, 2.0], squared=False)
    {'mse': 1.0}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Mse(evaluate.Metric):
    def _info(self):
        value = datasets.Value("float")
        if self.config_name == "multilist":  # one vector of outputs per example, as evaluate's mse
            value = datasets.Sequence(value)
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": value, "references": value}),
        )

    def _compute(self, predictions, references, sample_weight=None, multioutput="uniform_average", squared=True):
        error = mean_squared_error if squared else root_mean_squared_error
        return {"mse": error(references, predictions, sample_weight=sample_weight, multioutput=multioutput)}
