"""Every notebook in notebooks/ executes headless, top to bottom, and shows what it says it shows,
so none can rot. Notebooks are stored without outputs.

The notebooks share one kernel (importing torch/transformers/hftune costs several seconds a
notebook); each starts from an empty namespace (`%reset -f`), so one that forgets an import still fails.
"""

import os
import re

import nbformat
import pytest
from jupyter_client import KernelManager
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK_DIR = os.path.join(REPO, "notebooks")
NOTEBOOKS = sorted(f for f in os.listdir(NOTEBOOK_DIR) if f.endswith(".ipynb"))
PNG = "image/png"


def number_after(label, text):
    """The number printed right after `label` in the notebook's text output."""
    found = re.search(re.escape(label) + r"\s*([-+.e\d]+)", text)
    assert found, f"no number after '{label}'"
    return float(found.group(1))


# name -> (strings its text outputs must hold, images it must show, {label: upper bound of the number after it})
EXPECTED = {
    "quickstart_text_classification.ipynb": (["hftune: done.", "'eval_accuracy'", "'label': '"], 0, {}),
    "quickstart_causal_lm.ipynb": (["'eval_perplexity'", "'generated_text': ", "Just got back from the beach and"], 0, {}),
    "quickstart_image_classification.ipynb": (["'eval_accuracy'", "'predicted': '"], 0, {}),
    "training_strategies.ipynb": (
        ["refused: unknown lr_scheduler_type 'cosin'. Did you mean 'cosine'?", "sgd + nesterov momentum", "adagrad"],
        2,  # the schedules, the optimizers' loss curves
        {"lowest final train loss:": 0.9},  # some optimizer got well below the class-frequency loss (1.07)
    ),
    "parallelism.ipynb": (
        ["ZeRO stage             3", "Recommendation for", "world size             2", "hftune: done."],
        0,
        {"largest loss difference over 3 steps:": 1e-4},  # 2 processes x 4 = 1 process x 8
    ),
    "peft_lora.ipynb": (
        ["adapter_model.safetensors", "base_config/config.json", "merged/model.safetensors", "lora_A"],
        0,
        {"max difference between base + adapter and merged logits:": 1e-4, "trainable share:": 5},  # in percent
    ),
}


@pytest.fixture(scope="module")
def kernel():
    """One Python kernel for all notebooks, started in notebooks/ as Jupyter would."""
    manager = KernelManager(kernel_name="python3")
    manager.start_kernel(cwd=NOTEBOOK_DIR)
    yield manager
    manager.shutdown_kernel(now=True)


def text_of(notebook):
    parts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            parts.append(output.get("text", ""))
            parts.append(output.get("data", {}).get("text/plain", ""))
    return "\n".join(parts)


def images_in(notebook):
    return sum(PNG in output.get("data", {}) for cell in notebook.cells for output in cell.get("outputs", []))


def test_every_notebook_says_what_it_must_show():
    assert set(NOTEBOOKS) == set(EXPECTED), "add each notebook's expected outputs to EXPECTED"


@pytest.mark.parametrize("name", NOTEBOOKS)
@pytest.mark.slow
def test_notebook_executes_and_shows_its_results(name, kernel):
    notebook = nbformat.read(os.path.join(NOTEBOOK_DIR, name), as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(not cell.outputs and cell.execution_count is None for cell in code), "strip outputs"
    before = sorted(os.listdir(NOTEBOOK_DIR))
    fresh = nbformat.v4.new_code_cell(f"import os\nos.chdir({NOTEBOOK_DIR!r})\n%reset -f")  # reset last: no `os` left
    notebook.cells.insert(0, fresh)
    NotebookClient(notebook, km=kernel, timeout=600).execute()
    errors = [o for cell in notebook.cells for o in cell.get("outputs", []) if o.output_type == "error"]
    assert not errors, "\n".join(e.ename + ": " + e.evalue for e in errors)
    strings, images, bounds = EXPECTED[name]
    text = text_of(notebook)
    missing = [s for s in strings if s not in text]
    assert not missing, f"{name} did not show {missing}"
    assert images_in(notebook) == images
    for label, bound in bounds.items():
        assert number_after(label, text) < bound, f"{name}: the number after '{label}' is not below {bound}"
    assert sorted(os.listdir(NOTEBOOK_DIR)) == before, "a notebook wrote into notebooks/ (use tempfile.mkdtemp())"
