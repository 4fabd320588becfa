"""`accelerate launch --config_file accelerate_configs/fsdp.yaml tests/fsdp_paths_probe.py <bert folder>`
(2 processes): shards the same BERT classifier once with accelerate's FSDP2 preparation (as it runs
for a GPU launch; here with a stand-in for the Accelerator it reads) and once with hftune's, runs a
forward and backward pass, and writes what happened to $HFTUNE_PROBE_DIR/rank<R>.json:
{"accelerate": "ok" | "<exception>", "hftune": "ok" | "<exception>"}."""

import json
import os
import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist
from transformers import AutoModelForSequenceClassification

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hftune.engines.fsdp import Fsdp2  # noqa: E402


def train_step(model):
    ids = torch.randint(0, 100, (2, 8))
    model(input_ids=ids, labels=torch.tensor([0, 1])).loss.backward()


def outcome(shard, folder):
    try:
        train_step(shard(AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)))
        return "ok"
    except Exception as err:  # what each path does is the record
        return f"{type(err).__name__}: {err}"


if __name__ == "__main__":
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    # what fsdp2_prepare_model and Fsdp2 read of an Accelerator, as an FSDP launch on GPUs sets it up
    accelerator = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=FullyShardedDataParallelPlugin()),
                                  torch_device_mesh=None, device=torch.device("cpu"), is_main_process=rank == 0,
                                  mixed_precision="no", native_amp=False, num_processes=dist.get_world_size())
    record = {"accelerate": outcome(lambda model: fsdp2_prepare_model(accelerator, model), sys.argv[1]),
              "hftune": outcome(Fsdp2(accelerator).shard, sys.argv[1])}
    with open(os.path.join(os.environ["HFTUNE_PROBE_DIR"], f"rank{rank}.json"), "w") as handle:
        json.dump(record, handle)
    dist.destroy_process_group()
