"""Metrics through `evaluate`, with offline fallbacks shipped in this package.

`load_metric("accuracy")` returns the Hub's evaluate module when it can be had, else
hftune's own module of the same name, loaded through `evaluate.load(local_path)`; `config_name`
picks a configuration of it (e.g. `load_metric("f1", "multilabel")`). A name in LOCAL_FIRST is
always hftune's own: the Hub's module no longer runs with current libraries.

Example:
    >>> from hftune.metrics import load_metric
    >>> load_metric("accuracy").compute(predictions=[0, 1, 1], references=[0, 1, 0])["accuracy"]  # doctest: +SKIP
    0.666...
"""

import logging
from functools import lru_cache
from importlib import resources

import evaluate
from huggingface_hub import constants

logger = logging.getLogger(__name__)

LOCAL_METRICS = ("accuracy", "f1", "mse", "pearsonr", "spearmanr", "exact_match", "rouge", "token_f1", "seqeval", "squad")
# evaluate's mse passes `squared` to sklearn's mean_squared_error, which scikit-learn 1.6 removed;
# token_f1 is hftune's own (the Hub has none of that name); the Hub's squad cannot score unanswerable
# questions (squad_v2 takes other inputs), where hftune's squad scores both as the official scripts do.
LOCAL_FIRST = ("mse", "token_f1", "squad")


def local_metric_path(name):
    return str(resources.files("hftune") / "metrics" / name / f"{name}.py")


@lru_cache(maxsize=None)
def load_metric(name, config_name=None):
    if not constants.HF_HUB_OFFLINE and name not in LOCAL_FIRST:
        try:
            return evaluate.load(name, config_name)
        except Exception as err:  # no network, Hub down, module missing: all mean "use ours"
            if name not in LOCAL_METRICS:
                raise
            logger.warning("evaluate.load(%r) failed (%s); using hftune's offline copy.", name, type(err).__name__)
    return evaluate.load(local_metric_path(name), config_name)
