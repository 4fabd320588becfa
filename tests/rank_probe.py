"""`accelerate launch tests/rank_probe.py <hftune args>` runs hftune exactly as `hftune/run.py` does
and records what each process really saw, in $HFTUNE_PROBE_DIR/rank<R>.json:
  world_size  torch.distributed's world size (1 when the launch silently ran independent jobs),
  rows        a fingerprint of every example the process collated (run without evaluation, so
              these are training rows),
  ds_tensor / ds_numel  under ZeRO-3, the parameter elements this process holds / the full count,
  local_numel / full_numel  the same under FSDP2,
  distributed_type  accelerate's, once an Accelerator exists (None under Trainer until it builds one).
With HFTUNE_PROBE_UNCHECKED=1 hftune's world-size check is skipped (negative controls only); with
HFTUNE_KILL_AT every process kills itself as tests/kill_probe.py describes; with HFTUNE_PROBE_AS_GPU_FSDP=1
accelerate's state is what an FSDP launch on GPUs gets (distributed type FSDP, its plugin), device and
backend aside.
"""

import hashlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from hftune import run, tasks  # noqa: E402

seen = {"rows": []}


def row_fingerprint(example):
    data = example.get("input_ids", example.get("pixel_values"))
    return hashlib.sha1(torch.as_tensor(data).numpy().tobytes()).hexdigest()[:16]


def record_partitioning(model):
    params = list(model.parameters())
    if params and hasattr(params[0], "ds_tensor"):  # DeepSpeed ZeRO-3
        seen["ds_tensor"] = sum(p.ds_tensor.numel() for p in params)
        seen["ds_numel"] = sum(p.ds_numel for p in params)
    if params and hasattr(params[0], "to_local"):  # FSDP2: parameters are sharded DTensors
        seen["local_numel"] = sum(p.to_local().numel() for p in params)
        seen["full_numel"] = sum(p.numel() for p in params)


def probing(build):
    def build_and_probe(*args, **kwargs):
        bundle = build(*args, **kwargs)
        collate = bundle.data_collator

        def collate_and_record(examples):
            if "world_size" not in seen:
                dist = torch.distributed
                seen["world_size"] = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
                record_partitioning(bundle.model)
                from accelerate.state import AcceleratorState

                seen["distributed_type"] = str(AcceleratorState._shared_state.get("distributed_type"))
            seen["rows"].extend(row_fingerprint(example) for example in examples)
            return collate(examples)

        bundle.data_collator = collate_and_record
        return bundle

    return build_and_probe


def get_probed_task(name):
    module = get_task(name)
    if not getattr(module.build, "probed", False):
        module.build = probing(module.build)
        module.build.probed = True
    return module


get_task, run.get_task = tasks.get_task, get_probed_task
if os.environ.get("HFTUNE_PROBE_UNCHECKED"):  # negative controls: let a broken launch through hftune's check
    run.check_world_size = lambda args: None

if os.environ.get("HFTUNE_KILL_AT"):  # kill -9 every process at that moment (see tests/kill_probe.py)
    from kill_probe import arm

    arm(*os.environ["HFTUNE_KILL_AT"].split(":"))

if os.environ.get("HFTUNE_PROBE_AS_GPU_FSDP"):
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    cpu_init = AcceleratorState.__init__

    def as_on_gpus(self, *args, **kwargs):  # accelerate makes FSDP states for GPU-family launches only
        cpu_init(self, *args, **kwargs)
        if self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, FullyShardedDataParallelPlugin()

    AcceleratorState.__init__ = as_on_gpus

if __name__ == "__main__":
    try:
        run.main()
    finally:
        rank = os.environ.get("RANK", "0")
        with open(os.path.join(os.environ["HFTUNE_PROBE_DIR"], f"rank{rank}.json"), "w") as handle:
            json.dump(seen, handle)
