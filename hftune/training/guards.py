"""The non-finite guard: a NaN or inf gradient is caught at the step it appears, that step's
update is skipped, and the run stops after too many bad steps in a row (the last checkpoint on
disk is the last good one). Both engines call it just before `optimizer.step()`.

Example:
    >>> import torch
    >>> layer = torch.nn.Linear(2, 1)
    >>> layer(torch.tensor([[float("nan"), 1.0]])).sum().backward()
    >>> guard = NonFiniteGuard(skip=True, max_consecutive=3)
    >>> guard.check(layer.parameters(), step=7)  # True: skip this update
    True
    >>> layer.weight.grad is None  # optimizers leave parameters without a gradient untouched
    True
"""

import logging
from dataclasses import dataclass, field

import torch
from torch.nn.utils import get_total_norm

from hftune.errors import HftuneError

logger = logging.getLogger("hftune")


@dataclass
class TrainingFields:
    """The NaN/inf guard."""

    skip_nonfinite_steps: bool = field(
        default=True, metadata={"help": "Skip the update of a step whose gradient is NaN/inf (false: stop there)."}
    )
    max_nonfinite_steps: int = field(
        default=3, metadata={"help": "Stop after this many non-finite steps in a row (0 turns the guard off)."}
    )


CAUSES = ("a learning rate too high for this model", "fp16 overflow (try bf16)",
          "a bad row in the data (empty or garbled input)")


class NonFiniteGuard:
    def __init__(self, skip, max_consecutive):
        self.skip, self.max_consecutive, self.bad_in_a_row = skip, max_consecutive, 0

    def check(self, parameters, step, total_norm=None):
        """True when the gradient is non-finite and this update must be skipped; raises once
        the run should stop. `step` is the 1-based number of the optimizer step being taken;
        `total_norm`, when the caller has it already, saves a pass over the gradients."""
        params = [p for p in parameters if p.grad is not None]
        if total_norm is None and params:
            total_norm = get_total_norm([p.grad for p in params])
        if not params or torch.isfinite(torch.as_tensor(total_norm)):
            self.bad_in_a_row = 0
            return False
        self.bad_in_a_row += 1
        message = f"non-finite gradient (NaN or inf) at step {step}; likely causes: {'; '.join(CAUSES)}"
        if not self.skip or self.bad_in_a_row >= self.max_consecutive:
            raise HftuneError(f"{message}. Stopped after {self.bad_in_a_row} such step(s) in a row; "
                              "the last checkpoint in output_dir predates them.")
        logger.warning(f"{message}; skipping this update ({self.bad_in_a_row} in a row).")
        for param in params:
            param.grad = None
        return True


def guard_for(args, accelerator):
    """The run's guard, or None: off by the config, or under an AMP loss scaler, which skips
    overflowing steps itself (they are expected early in fp16 training)."""
    if args.max_nonfinite_steps == 0 or accelerator.scaler is not None:
        return None
    return NonFiniteGuard(args.skip_nonfinite_steps, args.max_nonfinite_steps)
