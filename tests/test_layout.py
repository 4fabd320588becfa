"""The structure hftune grows in: no import cycles, a config that names no task or feature, every
module importable, and a task that plugs in through its module and the registry alone."""

import ast
import importlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "hftune"


def module_names():
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        names[name] = path
    return names


def import_graph():
    """module -> the hftune modules it imports, at the top or inside a function."""
    names = module_names()
    graph = {}
    for name, path in names.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("hftune"):
                for alias in node.names:
                    child = f"{node.module}.{alias.name}"
                    deps.add(child if child in names else node.module)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("hftune"))
        graph[name] = {d for d in deps if d in names and d != name}
    return graph


def cycles(graph):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while not component or v not in component:
                component.add(stack.pop())
            on_stack.difference_update(component)
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_config_names_no_task_and_no_feature():
    imported = import_graph()["hftune.config"]
    owners = ("hftune.tasks.", "hftune.compression", "hftune.engines", "hftune.results", "hftune.training.")
    shared = {"hftune.tasks.common", "hftune.tasks.inference", "hftune.training.arguments"}  # no task in them
    named = {m for m in imported if m.startswith(owners)} - shared
    assert named == set()
    assert len((PACKAGE / "config.py").read_text().splitlines()) <= 300


# hftune.__main__ runs the CLI when imported; metric modules load through evaluate.load(path)
IMPORTABLE = sorted(n for n in module_names() if n != "hftune.__main__" and not n.startswith("hftune.metrics."))


@pytest.mark.parametrize("name", IMPORTABLE)
def test_every_module_imports(name):
    importlib.import_module(name)


def test_every_feature_field_is_parsed_and_owned_once():
    from dataclasses import fields

    from hftune.config import CONFIG_CLASSES, build_parser
    from hftune.features import feature_modules

    declared = [f.name for module in feature_modules() for group in ("ModelFields", "TrainingFields")
                if hasattr(module, group) for f in fields(getattr(module, group))]
    assert len(declared) == len(set(declared))
    composed = {f.name for cls in CONFIG_CLASSES for f in fields(cls)}
    assert set(declared) <= composed
    flags = {a.dest for a in build_parser()._actions}
    assert set(declared) <= flags


TOY_TASK = '''
from dataclasses import dataclass, field

from hftune.tasks.common import TaskTraits


@dataclass
class DataFields:
    toy_width: int = field(default=3, metadata={"help": "toy: a field of its own"})


TRAITS = TaskTraits(auto_model="AutoModelForSequenceClassification", output="classes", inputs="text")
CHECKED = []


def check_config(model_args, data_args, training_args):
    if data_args.toy_width < 1:
        from hftune.errors import HftuneError
        raise HftuneError("toy_width must be >= 1")
'''

PROBE = '''
import sys
from hftune import tasks
tasks.TASKS["toy"] = "toy_task"  # the registry line a new task adds
from hftune.config import parse_config
from hftune.errors import HftuneError
_, data, _ = parse_config(["--task", "toy", "--toy_width", "5", "--output_dir", sys.argv[1]])
print("width", data.toy_width, data.task)
for argv in (["--task", "toy", "--toy_width", "0"], ["--toy_width", "5"], ["--task", "toy", "--block_size", "8"]):
    try:
        parse_config(argv + ["--output_dir", sys.argv[1]])
    except HftuneError as err:
        print("refused:", err)
'''


def test_a_new_task_plugs_in_through_its_module_and_the_registry(tmp_path):
    (tmp_path / "toy_task.py").write_text(TOY_TASK)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(PACKAGE.parent)])}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(PROBE), str(tmp_path / "out")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert "width 5 toy" in lines
    assert "refused: toy_width must be >= 1" in lines  # its own check runs
    assert any(line.startswith("refused: toy_width does not apply to task text-classification") for line in lines)
    assert any(line.startswith("refused: block_size does not apply to task toy") for line in lines)
