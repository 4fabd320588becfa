"""`python tests/kill_probe.py <hftune args>` runs hftune exactly as `hftune` does, but with
HFTUNE_KILL_AT=<moment>:<step> set it SIGKILLs itself (kill -9: no cleanup, no atexit) at that moment:
  step:N  mid-step: after the backward pass of optimizer step N, before the optimizer steps;
  save:N  mid-save: checkpoint-N holds the model but not yet the optimizer, RNG or trainer state;
  eval:N  mid-evaluation: in the second batch of the evaluation at step N.
Rerunning the same command without HFTUNE_KILL_AT is how a user resumes."""

import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from transformers import Trainer  # noqa: E402

from hftune import run  # noqa: E402


def die():
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def arm(moment, step):
    step = int(step)
    if moment == "step":
        original = Trainer.training_step

        def training_step(self, *args, **kwargs):
            loss = original(self, *args, **kwargs)
            if self.state.global_step + 1 == step:
                die()
            return loss
        Trainer.training_step = training_step
    elif moment == "save":
        original = Trainer._save_optimizer_and_scheduler

        def save_optimizer_and_scheduler(self, output_dir):
            if self.state.global_step == step:
                die()
            return original(self, output_dir)
        Trainer._save_optimizer_and_scheduler = save_optimizer_and_scheduler
    elif moment == "eval":
        original = Trainer.prediction_step
        batches = []

        def prediction_step(self, *args, **kwargs):
            if self.state.global_step == step:
                batches.append(1)
                if len(batches) == 2:
                    die()
            return original(self, *args, **kwargs)
        Trainer.prediction_step = prediction_step
    else:
        raise SystemExit(f"unknown HFTUNE_KILL_AT moment {moment!r}")


if __name__ == "__main__":
    if os.environ.get("HFTUNE_KILL_AT"):
        arm(*os.environ["HFTUNE_KILL_AT"].split(":"))
    run.main(sys.argv[1:])
