"""Which checkpoint a run resumes from, checked before anything is written: `auto` takes the newest
sealed checkpoint whose files still match their checksums (skipping, with a warning, any that do
not); an explicit path must be such a checkpoint, or a plain transformers Trainer checkpoint
(recognised by its trainer_state.json and no hftune seal: resumed, with a warning that nothing
verifies it). Its tensors must fit the model this run builds."""

import logging
import os

from hftune.errors import HftuneError
from hftune.launch.nodes import agree_on_checkpoint
from hftune.outputs import CONFIG_FILE
from hftune.training.checkpoints import MANIFEST, complete_steps, latest_complete, unusable

logger = logging.getLogger("hftune")

STATE = "trainer_state.json"  # what every transformers Trainer checkpoint holds
WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors", "pytorch_model.bin")


def resumes_latest(training_args):
    return str(training_args.resume_from_checkpoint).lower() in ("true", "auto")


def resolve_checkpoint(training_args):
    """`resume_from_checkpoint: auto` (or `true`) means the latest complete checkpoint in output_dir,
    or a fresh start where the run never completed one, so a killed run resumes by rerunning its command."""
    resume = training_args.resume_from_checkpoint
    if resume is None or str(resume).lower() in ("false", "none", ""):
        return None
    if not resumes_latest(training_args):
        return explicit_checkpoint(resume)
    if training_args.world_size > 1:  # the newest step complete on every node (one output_dir per node)
        last = agree_on_checkpoint(complete_steps(training_args.output_dir), training_args)
    else:
        last = latest_complete(training_args.output_dir)
    if last is None:
        logger.warning(f"resume_from_checkpoint: {resume} but output_dir '{training_args.output_dir}' holds "
                       "no complete checkpoint: training from the start.")
    else:
        logger.info(f"resuming from {last}, the latest complete checkpoint"
                    + (" on every process" if training_args.world_size > 1 else ""))
    return last


def explicit_checkpoint(path):
    if not os.path.exists(path):
        raise HftuneError(f"resume_from_checkpoint '{path}' does not exist; pass a checkpoint-* folder, or auto for "
                          "the newest complete one in output_dir.")
    if not os.path.isdir(path):
        raise HftuneError(f"resume_from_checkpoint '{path}' is a file; pass the checkpoint-* folder a run saved, or "
                          "auto.")
    if os.path.isfile(os.path.join(path, MANIFEST)) or os.path.isfile(os.path.join(path, CONFIG_FILE)):
        why = unusable(path)  # an hftune checkpoint: sealed, and unchanged since
        if why:
            raise HftuneError(f"resume_from_checkpoint '{path}' is {why}; pass an earlier checkpoint, or auto (which "
                              "skips such checkpoints).")
        return path
    if not os.path.isfile(os.path.join(path, STATE)):
        raise HftuneError(f"resume_from_checkpoint '{path}' is no Trainer checkpoint (it has no {STATE}); pass a "
                          "checkpoint-* folder a run saved (a saved model alone is model_name_or_path).")
    if not any(os.path.isfile(os.path.join(path, name)) for name in WEIGHTS):
        raise HftuneError(f"resume_from_checkpoint '{path}' holds no model weights ({', '.join(WEIGHTS[:3])}); pass "
                          "a complete checkpoint-* folder.")
    logger.warning(f"{path} is a plain transformers Trainer checkpoint (no {MANIFEST}): resuming from it as "
                   "Trainer would; nothing verifies that its files are whole.")
    return path


def check_shapes(checkpoint, model):
    """Every tensor of the checkpoint's weights that this run's model also has must have the same
    shape (another number of classes, another config): found here instead of in a traceback at resume."""
    from safetensors import safe_open

    wanted = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    for file in ("model.safetensors", "adapter_model.safetensors"):
        path = os.path.join(checkpoint, file)
        if not os.path.isfile(path):
            continue
        with safe_open(path, framework="pt") as weights:
            for name in weights.keys():
                saved = tuple(weights.get_slice(name).get_shape())
                if name in wanted and wanted[name] != saved and 0 not in wanted[name]:  # 0: a ZeRO-3 partition
                    raise HftuneError(f"cannot resume from {checkpoint}: {name} has shape {list(saved)} there and "
                                      f"{list(wanted[name])} in this run's model (e.g. the data has another number of "
                                      "classes); resume with the data and settings that wrote it, or start a new "
                                      "output_dir.")
