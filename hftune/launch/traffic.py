"""The communication model of `hftune plan`: bytes each process sends per optimizer step under each strategy,
what crosses between machines, and the seconds that takes at a given network bandwidth.

Ring collectives (NCCL's and gloo's ring algorithms) over N processes, r = (N-1)/N: an all-reduce of B bytes
sends 2r*B from every process, a reduce-scatter or an all-gather r*B. T = trainable parameters (under peft the
adapter's: frozen parameters have no gradient to reduce), P = all parameters, G = gradient-accumulation steps,
p = bytes of a parameter in the compute dtype (2 under fp16/bf16 mixed precision, else 4), g = bytes of a
communicated gradient element. Bytes each process sends per optimizer step:
  DDP           2r*T*g once per step (no_sync during accumulation); g = 4 (gradients of fp32 parameters),
                2 with ddp_comm_hook fp16 or bf16
  DDP PowerSGD  2r*4*E, E = the sum over gradients, each viewed as an n x m matrix (shape[0] x the rest), of
                k*(n+m), k = min(n, m, powersgd_rank), where 2*k*(n+m) < n*m, else of n*m (sent whole: biases,
                norms); from step powersgd_start_iter on (the DDP figure before it)
  ZeRO-1        r*T*g (reduce-scatter of gradients) + r*T*p (all-gather of the updated parameters)
  ZeRO-2        G*r*T*g + r*T*p: ZeRO-2 reduce-scatters at every micro-batch (DeepSpeed's engine)
  ZeRO-3        G*(2r*P*p + r*T*g): parameters gathered for forward and again for backward, every micro-batch;
                FSDP (full shard) is estimated the same way
  Under DeepSpeed g = p, unless the JSON's communication_data_type sets it.
At G = 1 in fp32, DDP = ZeRO-1 = ZeRO-2 = 8r*T and ZeRO-3 = 12r*P: 2:3 without peft.
Several machines: the ring visits the processes node by node, so every chunk crosses each node's network link
once; a node's link carries what one process sends and, as the ring's slowest link, sets the pace:
seconds = bytes per process / --network_bandwidth. Not counted: activations passed between pipeline stages,
the few bytes of loss and metric all-reduces.

Example:
    >>> parse_bandwidth("10Gbit"), parse_bandwidth("25GB/s")
    (1250000000.0, 25000000000.0)
    >>> ddp_traffic(4, trainable=1000, grad_bytes=4).total  # 2 * 3/4 * 1000 * 4
    6000.0
"""

import inspect
import math
import re
from dataclasses import dataclass

from hftune.errors import HftuneError

DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}  # DeepSpeed's communication_data_type values
PREFIXES = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
            "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}
# a number, a prefix, then bits (b, bit, bits) or bytes (B, byte, bytes), then /s or ps, optional
BANDWIDTH = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]i?)?([bB]its?|[bB]ytes?|b|B)(?:/s|ps)?\s*")


@dataclass
class Traffic:
    """Bytes one process sends per optimizer step."""

    gradients: float
    parameters: float = 0.0

    @property
    def total(self):
        return self.gradients + self.parameters


@dataclass
class Compression:
    """This launch's gradient compression: a DDP comm hook (hftune's ddp_comm_hook and its PowerSGD fields)
    or the DeepSpeed JSON's communication_data_type; None where unset."""

    hook: str = None
    powersgd_rank: int = 1
    powersgd_start_iter: int = 1000
    deepspeed_dtype: str = None


def ring(n):
    """The share of a buffer each process sends in a ring reduce-scatter or all-gather over n processes."""
    return (n - 1) / n


def ddp_traffic(n, trainable, grad_bytes):
    """A ring all-reduce of every gradient element, once per optimizer step."""
    return Traffic(2 * ring(n) * trainable * grad_bytes)


def zero_traffic(stage, n, params, trainable, param_bytes, grad_bytes, accumulation):
    grads = ring(n) * trainable * grad_bytes * (accumulation if stage >= 2 else 1)
    if stage == 3:
        return Traffic(grads, accumulation * 2 * ring(n) * params * param_bytes)
    return Traffic(grads, ring(n) * trainable * param_bytes)


def powersgd_elements(shapes, rank):
    """Elements PowerSGD all-reduces for gradients of these shapes: P (n x k) and Q (m x k) of each matrix
    worth compressing, the others whole. The rule is torch's own (`_should_compress`, with PowerSGDState's
    default min_compression_rate, which accelerate and hftune leave as it is)."""
    from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import PowerSGDState, _should_compress

    rate = inspect.signature(PowerSGDState).parameters["min_compression_rate"].default
    total = 0
    for shape in shapes:
        rows = shape[0] if shape else 1
        cols = math.prod(shape) // rows if rows else 0
        compress, whole, compressed = _should_compress(rows, cols, min(rows, cols, rank), rate)
        total += compressed if compress else whole
    return total


def element_bytes(launch, compression):
    """(p, g): bytes of a parameter in the compute dtype and of a gradient as ZeRO sends it."""
    p = 2 if launch.mixed_precision != "no" else 4
    return p, DTYPE_BYTES.get(str(compression.deepspeed_dtype).lower(), p)


def traffic_table(facts, launch, compression):
    """{strategy: Traffic} at the launch's world size, every DDP compression beside plain DDP."""
    n, accumulation, rank = launch.world_size, launch.gradient_accumulation, compression.powersgd_rank
    p, g = element_bytes(launch, compression)
    params, trainable = facts.params, facts.trainable
    return {
        "DDP": ddp_traffic(n, trainable, 4),
        "DDP, fp16/bf16 hook": ddp_traffic(n, trainable, 2),
        f"DDP, PowerSGD r={rank}": ddp_traffic(n, powersgd_elements(facts.trainable_shapes, rank), 4),
        "ZeRO-1": zero_traffic(1, n, params, trainable, p, g, accumulation),
        "ZeRO-2": zero_traffic(2, n, params, trainable, p, g, accumulation),
        "ZeRO-3 / FSDP": zero_traffic(3, n, params, trainable, p, g, accumulation),
    }


def launch_traffic(table, facts, launch, compression):
    """(description, Traffic) of exactly this launch."""
    n, hook = launch.world_size, compression.hook
    if n == 1:
        return "one process: nothing to send", Traffic(0.0)
    if launch.pipeline_stages:
        stages = launch.pipeline_stages
        p, g = element_bytes(launch, compression)
        return (f"pipeline: ZeRO-1 among the {n // stages} replicas of each stage's 1/{stages} of the model "
                "(activations passed between stages not counted)",
                zero_traffic(1, n // stages, facts.params / stages, facts.trainable / stages, p, g, 1))
    if launch.zero_stage == 0:
        return "DeepSpeed without ZeRO: an all-reduce of the gradients", \
            ddp_traffic(n, facts.trainable, element_bytes(launch, compression)[1])
    if launch.zero_stage is not None:
        stage = launch.zero_stage
        return f"ZeRO-{stage}", table["ZeRO-3 / FSDP" if stage == 3 else f"ZeRO-{stage}"]
    if launch.fsdp:
        return f"{launch.fsdp} (estimated as full shard)", table["ZeRO-3 / FSDP"]
    if hook == "powersgd":
        return (f"DDP, PowerSGD rank {compression.powersgd_rank} from step {compression.powersgd_start_iter} "
                "(plain DDP before it)"), table[f"DDP, PowerSGD r={compression.powersgd_rank}"]
    if hook:
        return f"DDP, {hook} comm hook", table["DDP, fp16/bf16 hook"]
    return "DDP", table["DDP"]


def parse_bandwidth(text):
    """'10Gbit' or '10Gbps' -> 1.25e9 bytes/s, '25GB/s' -> 25e9 (b: bits, B: bytes; k, M, G decimal, Gi binary)."""
    match = BANDWIDTH.fullmatch(str(text))
    if not match or float(match.group(1)) <= 0:
        raise HftuneError(f"--network_bandwidth '{text}' is not a bandwidth; write it like 10Gbit, 100Gbps or 25GB/s "
                          "(b: bits, B: bytes).")
    number, prefix, unit = float(match.group(1)), (match.group(2) or "").lower(), match.group(3)
    bits = unit.lower().startswith("bit") or unit == "b"
    return number * PREFIXES[prefix] / (8 if bits else 1)
