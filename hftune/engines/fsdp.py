"""hftune's FSDP2: every FSDP launch (accelerate_configs/fsdp.yaml) runs `engine: accelerate`, which
shards the model with this module, on GPUs and without them alike, so a GPU launch runs the code the
CPU tests run (the device mesh's type and the process group's backend aside).

Why not accelerate's own FSDP path (Trainer + `accelerator.prepare`)?
- Without GPUs accelerate does not apply FSDP at all: the Accelerator is MULTI_CPU and `prepare`
  wraps the model in DDP, every process keeping the whole model, and nothing says so.
- With GPUs its `fsdp2_prepare_model` fails on BERT-style encoders: it shards each `BertEmbeddings`
  block (a `_no_split_modules` entry), then shards its word embeddings again as "the input
  embeddings" (torch: "Invariant encountered: value was None"); tests/test_fsdp.py shards one BERT
  both ways (tests/fsdp_paths_probe.py).
Here the engine shards the model itself, with the plugin accelerate builds from the launch's FSDP_*
variables (wrap policy, reshard_after_forward, state dict type) and torch's `fully_shard` over a
device mesh of the launch's device, before the optimizer is built; the model and optimizer then stay
out of `accelerator.prepare`. Nothing in accelerate's state is changed.

Example (2 processes, with or without GPUs):
    accelerate launch --config_file accelerate_configs/fsdp.yaml --num_processes 2 hftune/run.py \
        --config recipe.yaml   # engine: accelerate is chosen for you
"""

import logging
import os
from collections import Counter
from contextlib import contextmanager

import torch
import torch.distributed as dist

from hftune.errors import HftuneError
from hftune.launch.checks import fsdp_launch

logger = logging.getLogger("hftune")
FULL_STATE_FILE = "fsdp_state.pt"  # FULL_STATE_DICT: model + optimizer gathered on rank 0
SHARDED_STATE_DIR = "fsdp_state"  # SHARDED_STATE_DICT: torch.distributed.checkpoint, one file per rank


def _env_true(name):
    return os.environ.get(name, "false").lower() == "true"


def check_fsdp(args):
    """Refuse the FSDP settings this path cannot honour. The FSDP_* variables are read only
    when set (`hftune plan` exports ACCELERATE_USE_FSDP alone)."""
    version = os.environ.get("FSDP_VERSION", "2")
    problems = {
        f"fsdp_version: {version} (hftune shards with FSDP2; set fsdp_version: 2)": version != "2",
        "fsdp_offload_params: true (without GPUs the parameters already live in CPU memory; with GPUs "
        "use accelerate_configs/deepspeed_zero3_offload.yaml to offload)": _env_true("FSDP_OFFLOAD_PARAMS"),
        "fsdp_activation_checkpointing: true (set activation_checkpointing: true in the recipe instead)":
            _env_true("FSDP_ACTIVATION_CHECKPOINTING"),
        "fsdp_ignored_modules (drop it)": bool(os.environ.get("FSDP_IGNORED_MODULES")),
        "fp16 (no loss scaler on this path; use bf16 or full precision)":
            args.fp16 or os.environ.get("ACCELERATE_MIXED_PRECISION") == "fp16",
    }
    for problem, present in problems.items():
        if present:
            raise HftuneError(f"FSDP launches (engine: accelerate shards the model itself with FSDP2) "
                              f"cannot honour {problem}.")


class Fsdp2:
    """Shards a model with FSDP2 over the launch's processes, and gathers/saves/loads its state."""

    def __init__(self, accelerator):
        from accelerate.utils import FullyShardedDataParallelPlugin
        from torch.distributed.device_mesh import init_device_mesh

        self.accelerator = accelerator
        self.plugin = FullyShardedDataParallelPlugin()  # reads the launch's FSDP_* variables
        if self.plugin.fsdp_version != 2:
            raise HftuneError("FSDP launches need fsdp_version: 2 in the accelerate config (hftune shards with FSDP2).")
        # fully_shard moves each block to the mesh's device: this process's GPU, or the CPU (over gloo)
        self.mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,),
                                     mesh_dim_names=("dp_shard",))

    def shard(self, model):
        """fully_shard each block the wrap policy picks (the model's `_no_split_modules` under
        TRANSFORMER_BASED_WRAP, or fsdp_transformer_layer_cls_to_wrap), then the root; rank 0's
        weights are then broadcast (other ranks may hold meta tensors: fsdp_cpu_ram_efficient_loading)."""
        from accelerate.utils import get_module_children_bottom_up
        from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
        from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

        if isinstance(model, FSDPModule):  # evaluate and predict without training each ask
            return model
        full_state = model.state_dict() if self.accelerator.is_main_process else {}
        # bf16 computes in bf16; gradients are reduced in fp32, which gloo handles (NCCL too).
        bf16 = self.accelerator.mixed_precision == "bf16"
        precision = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else \
            MixedPrecisionPolicy()
        kwargs = {"mesh": self.mesh, "reshard_after_forward": self.plugin.reshard_after_forward, "mp_policy": precision}
        policy = fsdp2_prepare_auto_wrap_policy(self.plugin, model)
        blocks = [m for m in get_module_children_bottom_up(model)[:-1] if policy is not None and policy(m)]
        uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))  # > 1: a tied weight
        blocks = [m for m in blocks if not shares_a_weight_outside(m, uses)]
        for block in blocks:
            if not isinstance(block, FSDPModule):
                fully_shard(block, **kwargs)
        fully_shard(model, **kwargs)
        self._load_from_rank0(model, full_state)
        if self.accelerator.native_amp:
            self._autocast(model)
        logger.info(f"FSDP2 on {self.mesh.device_type}: {len(blocks)} blocks + root sharded over "
                    f"{self.accelerator.num_processes} processes, "
                    f"reshard_after_forward={self.plugin.reshard_after_forward}")
        return model

    def _autocast(self, model):
        """What accelerator.prepare does for mixed precision on every launch: the forward under autocast
        (layer norms, softmax and the loss in float32, matmuls in bf16) and float32 outputs. Without it
        everything would compute in the bf16 parameters, the loss included."""
        from types import MethodType

        from accelerate.utils import convert_outputs_to_fp32, get_mixed_precision_context_manager

        autocast = get_mixed_precision_context_manager(True, self.accelerator.autocast_handler)
        model.forward = MethodType(convert_outputs_to_fp32(autocast(model.forward.__func__)), model)

    def _load_from_rank0(self, model, full_state):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(model, full_state, options=options)
        # Buffers outside the state dict (position ids, rotary tables) are not sharded: rank 0's everywhere.
        for name, buffer in list(model.named_buffers()):
            value = torch.empty_like(buffer, device=self.mesh.device_type) if buffer.is_meta else buffer
            dist.broadcast(value, src=0)
            if value is not buffer:
                owner, _, leaf = name.rpartition(".")
                model.get_submodule(owner).register_buffer(leaf, value, persistent=False)
        if hasattr(model, "tie_weights"):  # loading into meta tensors assigns new ones, untying shared weights
            model.tie_weights()

    @contextmanager
    def no_sync(self, model):
        """Accumulate micro-batch gradients locally; the last micro-batch reduce-scatters the sum."""
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)

    @staticmethod
    def full_state_dict(model):
        """The whole model on rank 0 (CPU tensors), {} elsewhere; every process must call it."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        # Gathering copies each name apart: tied parameters must stay one tensor, or save_pretrained writes both.
        first_name = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            if name in state:
                state[name] = state[first_name.setdefault(id(param), name)]
        return state

    def _full(self):
        from torch.distributed.fsdp.fully_sharded_data_parallel import StateDictType

        return self.plugin.state_dict_type == StateDictType.FULL_STATE_DICT

    def save_state(self, model, optimizer, folder):
        """Model and optimizer state for resuming: gathered into one file on rank 0 under
        FULL_STATE_DICT, one shard per process (torch.distributed.checkpoint) under SHARDED_STATE_DICT."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        options = StateDictOptions(full_state_dict=self._full(), cpu_offload=self._full())
        model_state, optimizer_state = get_state_dict(model, optimizer, options=options)
        state = {"model": model_state, "optimizer": optimizer_state}
        if not self._full():
            dcp.save(state, checkpoint_id=os.path.join(folder, SHARDED_STATE_DIR))
        elif self.accelerator.is_main_process:
            torch.save(state, os.path.join(folder, FULL_STATE_FILE))
        self.accelerator.wait_for_everyone()

    def load_state(self, model, optimizer, folder):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions, get_state_dict, set_model_state_dict, set_optimizer_state_dict,
        )

        if self._full():
            path = os.path.join(folder, FULL_STATE_FILE)
            if not os.path.isfile(path):
                raise HftuneError(f"{folder} holds no {FULL_STATE_FILE}: it was not written by an FSDP run with "
                                  "fsdp_state_dict_type FULL_STATE_DICT; resume with the launch that wrote it.")
            state = torch.load(path, weights_only=True) if self.accelerator.is_main_process else {}
            options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        else:
            path = os.path.join(folder, SHARDED_STATE_DIR)
            if not os.path.isdir(path):
                raise HftuneError(f"{folder} holds no {SHARDED_STATE_DIR}/: it was not written by an FSDP run with "
                                  "fsdp_state_dict_type SHARDED_STATE_DICT; resume with the launch that wrote it.")
            model_state, optimizer_state = get_state_dict(model, optimizer)
            state = {"model": model_state, "optimizer": optimizer_state}
            dcp.load(state, checkpoint_id=path)  # fills each process's shards in place
            options = StateDictOptions()
        # Two calls: set_state_dict skips the model on ranks given an empty one, and rank 0's broadcast then hangs.
        set_model_state_dict(model, state.get("model", {}), options=options)
        set_optimizer_state_dict(model, optimizer, state.get("optimizer", {}), options=options)


def shares_a_weight_outside(block, uses):
    """The block holds a parameter tied to one outside it (BERT's word embeddings, tied to the masked-LM
    head): `uses` counts each parameter's names in the whole model. FSDP2 needs both in one group, so
    such a block is left to the root's (logged)."""
    inside = Counter(id(p) for _, p in block.named_parameters(remove_duplicate=False))
    if any(uses[key] > count for key, count in inside.items()):
        logger.info(f"FSDP2: {type(block).__name__} stays in the root's group: a weight of it is tied to one "
                    "outside it")
        return True
    return False


def fsdp_for(accelerator):
    """An Fsdp2 when this launch asks for FSDP over several processes, else None."""
    if not fsdp_launch():
        return None
    if accelerator.num_processes == 1:
        logger.info("FSDP launch with one process: nothing to shard, the model trains whole.")
        return None
    return Fsdp2(accelerator)
