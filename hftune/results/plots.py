"""Training curves as PNG files, drawn from a run's `state.log_history` (Trainer's and hftune's own
engines log the same keys).

Example:
    >>> from hftune.results.plots import write_curves
    >>> history = [{"step": 1, "loss": 1.1, "learning_rate": 1e-3}, {"step": 2, "loss": 0.9, "learning_rate": 5e-4}]
    >>> write_curves(history, "/tmp/curves")
    ['loss.png', 'learning_rate.png']
"""

import math
import os

# Figure + the Agg canvas draw straight to a file: no pyplot, so no GUI backend is ever touched
# (a headless machine or a notebook kernel keeps its own backend setting).
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

# file name -> (title, y label, [(log key, legend label)]): one figure per entry, curves sharing an axis
CURVES = {
    "loss.png": ("Loss", "loss", [("loss", "train loss"), ("eval_loss", "eval loss")]),
    "learning_rate.png": ("Learning rate", "learning rate", [("learning_rate", "learning rate")]),
    "grad_norm.png": ("Gradient norm (before clipping)", "grad norm", [("grad_norm", "grad norm")]),
}


def series(log_history, key):
    """([global step], [value]) of every log entry holding `key` as a number."""
    points = [(entry["step"], float(entry[key])) for entry in log_history
              if isinstance(entry.get(key), (int, float)) and "step" in entry]
    return [step for step, _ in points], [value for _, value in points]


def _draw(path, title, ylabel, curves):
    figure = Figure(figsize=(6.4, 4.0), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    for label, (steps, values) in curves.items():
        # one point alone draws no line: mark every point so a short run still shows something
        axes.plot(steps, values, marker="o", markersize=3, label=label)
    axes.set(title=title, xlabel="global step", ylabel=ylabel)
    finite = [v for _, values in curves.values() for v in values if math.isfinite(v)]
    if ylabel != "loss" and finite and min(finite) > 0 and max(finite) / min(finite) > 1e3:
        axes.set_yscale("log")  # a decayed learning rate or a spiking grad norm spans decades
    axes.grid(alpha=0.3)
    if len(curves) > 1:
        axes.legend()
    figure.tight_layout()
    figure.savefig(path)


def write_curves(log_history, output_dir):
    """Write loss.png (train and eval loss), learning_rate.png and grad_norm.png to output_dir,
    leaving out a figure whose keys were never logged; returns the file names written."""
    written = []
    for name, (title, ylabel, keys) in CURVES.items():
        curves = {label: series(log_history, key) for key, label in keys}
        curves = {label: points for label, points in curves.items() if points[0]}
        if curves:
            _draw(os.path.join(output_dir, name), title, ylabel, curves)
            written.append(name)
    return written
