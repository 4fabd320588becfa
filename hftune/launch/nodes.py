"""Runs on several machines: whether output_dir is one shared folder or one per node, and which
checkpoint every node resumes from.

- A shared output_dir is written by one process (Trainer's default). One output_dir per node (disks
  not shared) needs `save_on_each_node: true`, so that every node holds the checkpoints it resumes
  from; either mismatch is refused in one line (a shared folder written by every node would see its
  files overwritten mid-write).
- `resume_from_checkpoint: auto` takes, on every node, the newest step whose checkpoint is complete
  on all of them: a node killed while saving holds an older complete checkpoint than the others.

Example:
    >>> check_output_layout(training_args)  # doctest: +SKIP   (every process calls it together)
"""

import glob
import logging
import os
import secrets

from hftune.errors import HftuneError
from hftune.launch.checks import fsdp_launch

logger = logging.getLogger("hftune")


def machines(args):
    local = int(os.environ.get("LOCAL_WORLD_SIZE", args.world_size))
    return max(1, args.world_size // max(local, 1))


def shared_by_all_nodes(folder, args):
    """Every process together: whether `folder` is one folder all nodes see (a shared disk), found by
    each node's main process leaving a marker there and counting the others' (removed again)."""
    import torch.distributed as dist

    token = [secrets.token_hex(4)]
    dist.broadcast_object_list(token)  # one name for this run's markers on every node
    marker = os.path.join(folder, f".hftune-node-{token[0]}-{os.environ.get('GROUP_RANK', 0)}")
    made = args.local_process_index == 0 and make_folder(folder)
    if args.local_process_index == 0:
        open(marker, "w").close()
    dist.barrier()
    seen = len(glob.glob(os.path.join(folder, f".hftune-node-{token[0]}-*")))
    dist.barrier()
    if args.local_process_index == 0:
        os.remove(marker)
    dist.barrier()
    if made and not os.listdir(folder):  # leave no trace where no run had written yet
        os.rmdir(folder)
    shared = [None] * args.world_size
    dist.all_gather_object(shared, seen == machines(args))
    return all(shared)


def make_folder(folder):
    """Whether this call made `folder` (False where it was there, or another node made it first)."""
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    try:
        os.mkdir(folder)
        return True
    except FileExistsError:
        return False


def preprocess_once(args, cache_dir=None):
    """Whether one process of the whole run should load and preprocess the data first (the others then
    read its cache): on one machine, or where every node shares the datasets cache. With a cache per
    node, each node's main process prepares its own (Trainer's main_process_first(local=True))."""
    if machines(args) == 1:
        return True
    import datasets

    folder = cache_dir or datasets.config.HF_DATASETS_CACHE
    shared = shared_by_all_nodes(folder, args)
    if args.process_index == 0:
        logger.info(f"data cache {folder}: " + ("shared by every node; the run's main process prepares the data, "
                                                "the others read it" if shared else
                                                "one per node; each node's main process prepares its own"))
    return shared


def check_output_layout(args):
    """Every process together: refuse an output_dir layout the run cannot save and resume with."""
    if machines(args) == 1:
        return
    shared = shared_by_all_nodes(args.output_dir, args)
    if shared and args.save_on_each_node:
        raise HftuneError(f"output_dir '{args.output_dir}' is one folder all {machines(args)} nodes share, and "
                          "save_on_each_node: true would have every node write the same files; drop save_on_each_node.")
    if not shared and args.engine != "trainer":
        # FSDP launches always run engine: accelerate (hftune/engines/fsdp.py): Trainer is no remedy for them
        remedy = "a disk the nodes share" if fsdp_launch() else "engine: trainer, or a disk the nodes share"
        raise HftuneError(f"output_dir '{args.output_dir}' is not shared by the {machines(args)} nodes; saving on "
                          f"each node runs on engine: trainer only (save_on_each_node), not {args.engine}: use "
                          f"{remedy}.")
    if not shared and not args.save_on_each_node:
        raise HftuneError(f"output_dir '{args.output_dir}' is not shared by the {machines(args)} nodes (each sees "
                          "only its own files): set save_on_each_node: true so that every node keeps the "
                          "checkpoints it resumes from, or put output_dir on a disk they share.")


def agree_on_checkpoint(complete_steps, args):
    """`resume_from_checkpoint: auto` on several processes (every one calls it): the folder of the newest
    step complete on every node, or None. complete_steps: {step: folder} complete on this node."""
    import torch.distributed as dist

    everyone = [None] * args.world_size
    dist.all_gather_object(everyone, sorted(complete_steps))
    step = max(set.intersection(*map(set, everyone)), default=None)
    return None if step is None else complete_steps[step]
