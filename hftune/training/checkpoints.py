"""Crash-safe checkpoints. A checkpoint-N folder counts only once its manifest
(hftune_checkpoint.json: every file's size and SHA-256) is written, last and atomically, after every
process has finished writing. A run killed mid-save leaves a folder without a valid manifest: resuming
skips it, and rotation never deletes a sealed checkpoint for it. A file changed after the seal (a bad
disk, a copy gone wrong) no longer matches its checksum: `changed_file` names it before a resume."""

import hashlib
import json
import logging
import os
import re
import shutil

import yaml

from hftune.errors import HftuneError
from hftune.launch.checks import deepspeed_config, uses_fsdp, zero_stage
from hftune.outputs import CONFIG_FILE as CONFIG

logger = logging.getLogger("hftune")

MANIFEST = "hftune_checkpoint.json"
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def seal(folder, run=None):
    """Write the manifest of a fully written checkpoint (main process, after a barrier): file sizes
    and `run`, the launch that wrote it (run_record). The files are flushed to disk first, so that
    not even a power cut leaves a manifest over missing data."""
    sizes, digests = {}, {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            if name != MANIFEST:
                _fsync(path)
                sizes[os.path.relpath(path, folder)] = os.path.getsize(path)
                digests[os.path.relpath(path, folder)] = sha256(path)
    temporary = os.path.join(folder, f"{MANIFEST}.{os.getpid()}.tmp")  # one per writer, even in a misconfigured launch
    with open(temporary, "w") as handle:
        json.dump({"files": sizes, "sha256": digests, "run": run}, handle, indent=1, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, os.path.join(folder, MANIFEST))  # atomic: the manifest is whole or absent
    _fsync(folder)


def is_complete(folder):
    """A manifest that parses, and every file it lists present with its recorded size."""
    return _size_problem(folder) is None


def _size_problem(folder):
    """Why the manifest does not match the folder by sizes alone (cheap: no file is read), or None."""
    try:
        with open(os.path.join(folder, MANIFEST)) as handle:
            sizes = json.load(handle)["files"]
        sizes = sorted(sizes.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"incomplete (no valid {MANIFEST}; the run was stopped while saving it)"
    for name, size in sizes:
        path = os.path.join(folder, name)
        if not os.path.isfile(path) or os.path.getsize(path) != size:
            return f"damaged: its {name} is {'gone' if not os.path.isfile(path) else 'of another size'} since it was saved"
    return None


def sha256(path):
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def changed_file(folder):
    """The first file of a sealed checkpoint whose content no longer matches the checksum recorded
    when it was sealed, or None (also for a manifest of an older hftune that recorded sizes only)."""
    with open(os.path.join(folder, MANIFEST)) as handle:
        digests = json.load(handle).get("sha256", {})
    return next((name for name, digest in sorted(digests.items())
                 if sha256(os.path.join(folder, name)) != digest), None)


def checkpoints(output_dir):
    """checkpoint-N folders in output_dir, oldest step first."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(match.group(1)), name) for name in os.listdir(output_dir)
             if (match := CHECKPOINT.match(name)) and os.path.isdir(os.path.join(output_dir, name))]
    return [os.path.join(output_dir, name) for _, name in sorted(found)]


def unusable(folder):
    """Why a checkpoint cannot be resumed from (None when it can): unsealed, or changed since its seal."""
    problem = _size_problem(folder)
    if problem:
        return problem
    changed = changed_file(folder)
    if changed:
        return f"damaged: its {changed} no longer matches the checksum recorded when it was saved"
    return None


def complete_steps(output_dir):
    """{step: folder} of the sealed checkpoints in output_dir whose files still match their checksums."""
    return {int(CHECKPOINT.match(os.path.basename(f)).group(1)): f for f in checkpoints(output_dir)
            if unusable(f) is None}


def latest_complete(output_dir):
    """The newest sealed, unchanged checkpoint; newer ones that are not (an interrupted save, a file
    damaged since) are skipped with a warning naming them."""
    for folder in reversed(checkpoints(output_dir)):
        why = unusable(folder)
        if why is None:
            return folder
        logger.warning(f"skipping {folder}: {why}")
    return None


def rotate(output_dir, save_total_limit, best=None):
    """Keep at most save_total_limit sealed checkpoints, never deleting the newest sealed one or the
    best; unsealed folders are left alone (a later save of the same step replaces them)."""
    if not save_total_limit or save_total_limit <= 0:
        return
    sealed = [folder for folder in checkpoints(output_dir) if is_complete(folder)]
    protected = {os.path.abspath(sealed[-1])} if sealed else set()
    if best:
        protected.add(os.path.abspath(best))
    surplus = len(sealed) - max(save_total_limit, len(protected))
    for folder in sealed:
        if surplus <= 0:
            break
        if os.path.abspath(folder) not in protected:
            logger.info(f"deleting older checkpoint {folder} (save_total_limit={save_total_limit})")
            shutil.rmtree(folder, ignore_errors=True)
            surplus -= 1


def unseal(folder):
    """Drop the manifest of a folder about to be rewritten (a resumed run saving a step again), so a
    kill during the rewrite cannot leave old and new files under a valid manifest."""
    try:
        os.remove(os.path.join(folder, MANIFEST))
    except FileNotFoundError:
        pass


def commit(folder, args, best, wait_for_everyone, is_main):
    """After every process wrote its part of folder: copy the run's resolved config into it, seal
    it, then rotate (main process)."""
    wait_for_everyone()
    if is_main:
        config = os.path.join(args.output_dir, CONFIG)
        if os.path.isfile(config):
            shutil.copyfile(config, os.path.join(folder, CONFIG))
        seal(folder, run_record(args))
        rotate(os.path.dirname(folder), args.save_total_limit, best)
    wait_for_everyone()  # nobody resumes or saves again before the seal exists


# What a run writes before its first checkpoint is sealed (TensorBoard's runs/ included).
STARTUP_FILES = (CONFIG, "runs")


def holds_only_an_interrupted_start(output_dir):
    """True when output_dir holds nothing but what a run killed before its first sealed checkpoint
    leaves: its resolved config, logs and unsealed checkpoint folders. Nothing there is a result."""
    for name in os.listdir(output_dir):
        folder = os.path.join(output_dir, name)
        if CHECKPOINT.match(name) and os.path.isdir(folder) and not is_complete(folder):
            continue
        if name not in STARTUP_FILES:
            return False
    return True


def run_record(args):
    """What a checkpoint's layout depends on beyond the config: the launch."""
    config = deepspeed_config(args)
    return {"world_size": args.world_size, "zero_stage": None if config is None else zero_stage(config),
            "fsdp": uses_fsdp(args)}


# Settings whose change makes a checkpoint another model: its weights or adapter no longer fit.
MODEL_KEYS = ("model_name_or_path", "task", "peft", "lora_r", "lora_target_modules", "use_dora",
              "num_virtual_tokens")


def check_compatible(checkpoint, config, run):
    """Refuse, before training, a resume whose model or parallel layout differs from the checkpoint's;
    a data-parallel world-size change works (optimizer state is whole on every process) and is logged."""
    manifest = os.path.join(checkpoint, MANIFEST)  # absent in a plain transformers Trainer checkpoint
    then = {}
    if os.path.isfile(manifest):
        with open(manifest) as handle:
            then = json.load(handle).get("run") or {}
    saved = os.path.join(checkpoint, CONFIG)
    before = yaml.safe_load(open(saved)) if os.path.isfile(saved) else {}
    changed = [f"{key} {before[key]!r} -> {config.get(key)!r}" for key in MODEL_KEYS
               if key in before and before[key] != config.get(key)]
    changed += [f"{key} {then[key]!r} -> {run[key]!r}" for key in ("zero_stage", "fsdp")
                if key in then and then[key] != run[key]]
    sharded = run["zero_stage"] is not None or run["fsdp"]
    if sharded and then.get("world_size", run["world_size"]) != run["world_size"]:
        changed.append(f"world size {then['world_size']} -> {run['world_size']} "
                       "(DeepSpeed and FSDP checkpoints are partitioned per process)")
    if changed:
        raise HftuneError(f"cannot resume from {checkpoint}: {'; '.join(changed)}; resume with the settings that "
                          "wrote it, or start a new output_dir.")
    if then.get("world_size", run["world_size"]) != run["world_size"]:
        logger.warning(f"resuming {checkpoint} (written by {then['world_size']} processes) with {run['world_size']}: "
                       "the global batch size and the data order from here on change.")
