"""Reading a recipe file: a YAML file on disk or a shipped recipe's name, UTF-8 (anything else is
named with its conversion), YAML 1.2 booleans, and every key once (PyYAML silently keeps the last
of a key given twice)."""

import os
import re
from importlib import resources
from pathlib import Path

import yaml

from hftune.errors import HftuneError, closest
from hftune.files import not_utf8


class _Yaml12Loader(yaml.SafeLoader):
    """YAML 1.2 booleans: only true/false, so `eval_strategy: no` stays the string 'no'."""


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [r for r in resolvers if r[0] != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


class DuplicateKey(Exception):
    pass


def _mapping_without_duplicates(loader, node, deep=False):
    """A key given twice is refused (PyYAML keeps the second value silently)."""
    seen = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        line = key_node.start_mark.line + 1
        if key in seen:
            raise DuplicateKey(f"key '{key}' is given twice (lines {seen[key]} and {line}); keep one.")
        seen[key] = line
    return loader.construct_mapping(node, deep=deep)


_Yaml12Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def recipe_path(name_or_path):
    """A YAML file on disk, or the name of a recipe shipped in hftune/recipes."""
    if os.path.isfile(name_or_path):
        return Path(name_or_path)
    if os.path.isdir(name_or_path):
        raise HftuneError(f"config '{name_or_path}' is a folder; pass the recipe's YAML file.")
    shipped = resources.files("hftune") / "recipes" / f"{name_or_path}.yaml"
    if os.sep not in name_or_path and shipped.is_file():  # a bare name, never a mistyped path
        return Path(str(shipped))
    names = sorted(p.name[: -len(".yaml")] for p in (resources.files("hftune") / "recipes").iterdir())
    raise HftuneError(f"config file '{name_or_path}' not found; pass a YAML path or a shipped recipe: {names}.")


def load_recipe(path, known=None):
    """The recipe's mapping; `known`: the keys it may hold (None: any, for a recipe known to be valid)."""
    problem = not_utf8("config", path)
    if problem:
        raise HftuneError(problem)
    try:
        recipe = yaml.load(Path(path).read_text(encoding="utf-8-sig"), Loader=_Yaml12Loader) or {}
    except DuplicateKey as err:
        raise HftuneError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        raise HftuneError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(recipe, dict):
        raise HftuneError(f"{path} must be a mapping of field: value, got {type(recipe).__name__}.")
    for key in recipe:
        if known is not None and key not in known:
            raise HftuneError(f"unknown config key '{key}' in {path}.{closest(key, known)}")
    return recipe
