"""The memory model of `hftune plan`: per-device memory of a model under each strategy, and a recommendation.

The model is counted on the meta device (no weights loaded); the optimizer's state bytes are measured by
one step on a probe layer.

Memory model, in bytes per parameter (P parameters, T of them trainable; N data-parallel processes;
S = optimizer state bytes per parameter, measured by one step of the configured optimizer on a
probe layer; p = 2 under fp16/bf16 mixed precision, else 4; L = the largest module's own parameters):
  DDP       parameters 4P (+2P autocast copies under mixed precision), gradients 4T, optimizer S*T
  ZeRO-s    parameters pP (/N at s=3), gradients pT (/N at s>=2) + 4T/N fp32 partition under mixed precision,
            optimizer (4T fp32 master copy + S*T)/N (no master copy at s=3 in fp32); ZeRO-3 also holds the
            gathered largest layer (p*L parameters + p*L gradients). Offload moves the optimizer (and the
            sharded gradients) or the parameter partition to host memory.
            These are the multipliers of DeepSpeed's own estimators (estimate_zero2/3_model_states_mem_needs).
  FSDP      full shard (FSDP2): parameters 4P/N plus the gathered root unit and two blocks (current +
            prefetched), gradients 4T/N plus one unsharded block, optimizer S*T/N.
  pipeline  K stages x D replicas: ZeRO-1 over D on P/K parameters (the shipped pipeline config).
Table columns "ZeRO-2 off" / "ZeRO-3 off": ZeRO-2 with the optimizer, ZeRO-3 with optimizer and parameters
offloaded to CPU; "pipe KxD": K pipeline stages x D data-parallel replicas.
Activations are approximate: transformers follow Korthikanti et al. 2022 (per layer
s*b*h*(34 + 5*a*s/h) bytes at 16 bits; the attention-score term only for eager attention; x2 in fp32;
multiple-choice runs one sequence per ending, so b = rows x endings);
CNNs sum the feature maps their layers return, traced on the meta device.
Under `peft` the meta model is wrapped by peft, so T counts the adapter's parameters (and what it saves in full).
"""

import re
from dataclasses import dataclass

from hftune.errors import HftuneError
from hftune.tasks import traits

HEADROOM = 0.85  # fits when the estimate uses <= 85% of the device: CUDA context, fragmentation, temporaries
PROBE_FEATURES = 256  # the probe layer the optimizer takes one step on (256 x 256 weights)
UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
# Strategies in the order a recommendation tries them (simplest first), with the shipped config that runs each.
RECOMMENDATION_ORDER = (
    ("DDP", "DDP", "ddp.yaml"), ("ZeRO-1", "ZeRO-1", "deepspeed_zero1.yaml"),
    ("ZeRO-2", "ZeRO-2", "deepspeed_zero2.yaml"), ("ZeRO-3", "ZeRO-3", "deepspeed_zero3.yaml"),
    ("ZeRO-3 off", "ZeRO-3 with CPU offload", "deepspeed_zero3_offload.yaml"),
)


# ---- the model, counted on the meta device ----


@dataclass
class ModelFacts:
    name: str
    architecture: str
    params: int
    trainable: int
    largest_layer: int  # the biggest module's own parameters: what ZeRO-3 gathers at once
    fsdp_root: int  # parameters outside the blocks FSDP wraps (embeddings, head): gathered all step long
    fsdp_blocks: int  # the two biggest wrapped blocks (the one computing and the one prefetched)
    layer_activations: float  # bytes per device per micro-batch in the layers (split by pipeline stages)
    head_activations: float  # bytes outside them (LM logits)
    activation_formula: str
    trainable_shapes: tuple = ()  # each trainable tensor's shape: what PowerSGD compresses (hftune.launch.traffic)


def model_class(task_name):
    """The Auto class the task adapter loads its model with (its TaskTraits)."""
    import transformers

    return getattr(transformers, traits(task_name).auto_model)


def empty_model(model_args, data_args):
    """The task's model with its parameters on the meta device: sizes without weights or memory."""
    from accelerate import init_empty_weights

    from hftune.tasks.common import load_config, pretrained_source

    path, common = pretrained_source(model_args)
    try:
        config = load_config(model_args, path, common)
    except OSError as err:  # what from_pretrained raises for a missing folder or Hub id
        raise HftuneError(f"could not load the config of model_name_or_path '{model_args.model_name_or_path}': "
                          f"{str(err).strip().splitlines()[0]}") from None
    with init_empty_weights(include_buffers=True):  # buffers too, so a meta forward pass can run
        model = model_class(data_args.task).from_config(config, trust_remote_code=model_args.trust_remote_code)
    return model, path, common


def fsdp_units(model):
    """(root, two biggest blocks): FSDP's transformer-based wrap shards each `_no_split_modules` block;
    the root unit (the rest) stays gathered all step, plus the current block and the prefetched next one."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    block_sizes = sorted((sum(p.numel() for p in b.parameters()) for b in blocks), reverse=True)
    total = sum(p.numel() for p in model.parameters())
    return total - sum(block_sizes), sum(block_sizes[:2])


def sequence_length(config, data_args):
    wanted = data_args.block_size or data_args.max_seq_length
    limit = getattr(config, "max_position_embeddings", None)
    return min(wanted, limit) if limit else wanted


def transformer_activations(config, batch, seq, act_bytes, checkpointing, lm_head):
    """(layers, head) bytes: Korthikanti et al. 2022, eq. 2, per layer s*b*h*(34 + 5*a*s/h) bytes at 16 bits.
    The a*s^2 attention scores are stored only by eager attention (SDPA/flash keep none)."""
    layers, hidden, heads = config.num_hidden_layers, config.hidden_size, config.num_attention_heads
    eager = getattr(config, "_attn_implementation", "eager") in (None, "eager")
    per_value = 34 + (5 * heads * seq / hidden if eager else 0)
    one_layer = seq * batch * hidden * per_value * act_bytes / 2
    # Gradient checkpointing keeps each layer's input and recomputes one layer at a time.
    stored = layers * seq * batch * hidden * act_bytes + one_layer if checkpointing else layers * one_layer
    # LM logits in the model dtype plus the fp32 copy the loss works on.
    head = batch * seq * config.vocab_size * (act_bytes + 4) if lm_head else 0.0
    formula = (f"transformer: {layers} layers x s*b*h*(34{' + 5*a*s/h' if eager else ''}) bytes "
               f"(s={seq}, b={batch}, h={hidden}, a={heads}; Korthikanti et al. 2022"
               f"{'; gradient checkpointing' if checkpointing else ''}{'; + LM logits' if lm_head else ''})")
    return stored, head, formula


def image_size(path, common, config):
    """(height, width) the image processor produces, else the config's image_size, else 224."""
    from transformers import AutoImageProcessor

    try:
        processor = AutoImageProcessor.from_pretrained(path, **common)
    except (OSError, ValueError):
        processor = None
    for size in (getattr(processor, "crop_size", None), getattr(processor, "size", None)):
        get = size.get if isinstance(size, dict) else lambda key, s=size: getattr(s, key, None)
        if size is not None and get("height") and get("width"):
            return get("height"), get("width")
        if size is not None and get("shortest_edge"):
            return get("shortest_edge"), get("shortest_edge")
    side = getattr(config, "image_size", None) or 224
    return (side, side) if isinstance(side, int) else tuple(side)


def traced_activations(model, channels, height, width, batch, act_bytes):
    """The input plus every leaf module's output on one meta-device forward pass (a module that returns
    its input, like Identity, adds nothing): the feature maps autograd keeps for the backward pass."""
    import torch

    outputs = [channels * height * width]  # the first convolution keeps its input

    def record(module, inputs, output):
        if torch.is_tensor(output) and not any(output is i for i in inputs):
            outputs.append(output.numel())

    hooks = [m.register_forward_hook(record) for m in model.modules() if next(m.children(), None) is None]
    try:
        model.train()
        model(pixel_values=torch.empty(1, channels, height, width, device="meta"))
    finally:
        for hook in hooks:
            hook.remove()
    formula = (f"CNN: sum of the input and the {len(outputs) - 1} feature maps its layers return, traced at "
               f"{channels}x{height}x{width}, x batch {batch}")
    return sum(outputs) * batch * act_bytes, formula


def activations(model, path, common, data_args, args, act_bytes):
    """(layers, head, formula) bytes per device per micro-batch; zeros, said so, for an architecture
    neither formula fits (a config without layer sizes, a forward that cannot run on the meta device)."""
    config, batch = model.config, args.per_device_train_batch_size
    task = traits(data_args.task)
    endings = 1
    if task.inputs == "choices":  # AutoModelForMultipleChoice runs one sequence per ending of each row
        from hftune.tasks.multiple_choice import endings_per_row

        endings = endings_per_row(data_args)
    try:
        if task.inputs == "image":
            height, width = image_size(path, common, config)
            channels = getattr(config, "num_channels", 3)
            traced, formula = traced_activations(model, channels, height, width, batch, act_bytes)
            return traced, 0.0, formula
        layers, head, formula = transformer_activations(config, batch * endings, sequence_length(config, data_args),
                                                        act_bytes, args.gradient_checkpointing,
                                                        lm_head=task.output == "tokens")
        rows = f"; b = {batch} rows x {endings} endings, one sequence each" if endings > 1 else ""
        return layers, head, formula + rows
    except (AttributeError, TypeError, RuntimeError, NotImplementedError) as err:
        return 0.0, 0.0, f"NOT estimated for {type(model).__name__} ({type(err).__name__}: {err}); add them yourself"


def with_adapter(model, model_args, data_args, args):
    """Under `peft`, the meta model wrapped as the run wraps it (its adapter on the meta device too), so that
    `trainable` counts what gets gradients, optimizer states and all-reduce traffic: the adapter, not the base."""
    if getattr(model_args, "peft", None) is None:
        return model
    from hftune.compression.adapters import apply_peft

    return apply_peft(model, model_args, data_args, args)[0]


def model_facts(model_args, data_args, args, launch):
    model, path, common = empty_model(model_args, data_args)
    architecture = type(model).__name__
    act_bytes = 2 if launch.mixed_precision != "no" else 4
    layers, head, formula = activations(model, path, common, data_args, args, act_bytes)
    model = with_adapter(model, model_args, data_args, args)
    root, blocks = fsdp_units(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    return ModelFacts(
        name=model_args.model_name_or_path,
        architecture=architecture + (f" + peft {model_args.peft}" if getattr(model_args, "peft", None) else ""),
        params=sum(p.numel() for p in model.parameters()), trainable=sum(p.numel() for p in trainable),
        largest_layer=max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()),
        fsdp_root=root, fsdp_blocks=blocks, layer_activations=layers, head_activations=head,
        activation_formula=formula, trainable_shapes=tuple(tuple(p.shape) for p in trainable),
    )


# ---- optimizer state bytes ----

# Optimizers the probe cannot build here (bitsandbytes' need a GPU, others a package): states per parameter.
KNOWN_STATE_BYTES = (("lion_8bit", 1.0), ("8bit", 2.0), ("lion", 4.0), ("adafactor", 0.0), ("lomo", 0.0),
                     ("sgd", 0.0))


def optimizer_state_bytes(args):
    """(bytes of optimizer state per trainable parameter, how it was found)."""
    import torch

    from hftune.training.optim import build_optimizer, name_of, optimizer_spec, parse_optim_args

    name, spec = name_of(args.optim), optimizer_spec(args)
    if spec is not None and spec.needs_closure:  # L-BFGS keeps `history_size` pairs of full-size vectors
        history = parse_optim_args(args.optim_args).get("history_size", spec.defaults["history_size"])
        return 4.0 * (2 * history + 2), f"{name}: {history} (step, gradient change) pairs + 2 buffers"
    probe = torch.nn.Linear(PROBE_FEATURES, PROBE_FEATURES, bias=False)
    try:
        optimizer = build_optimizer(probe, args)
        probe.weight.grad = torch.zeros_like(probe.weight)
        optimizer.step()
    except Exception:  # any failure to build here (no GPU, missing package): fall back to the known table
        guess = next((b for key, b in KNOWN_STATE_BYTES if key in name), None)
        if guess is None:
            return 8.0, f"{name}: 8 bytes/parameter assumed (AdamW-like; it cannot be built here to measure)"
        return guess, f"{name}: {guess:g} bytes/parameter (known; it cannot be built here to measure)"
    tensors = [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    state = sum(t.numel() * t.element_size() for t in tensors)
    per_param = state / probe.weight.numel()
    return per_param, f"{name} ({type(optimizer).__name__}): {per_param:.2f} bytes/parameter, measured on a probe layer"


# ---- per-device memory under each strategy ----


@dataclass
class Estimate:
    parameters: float
    gradients: float
    optimizer: float
    activations: float
    host: float = 0.0  # offloaded to host memory, per process

    @property
    def total(self):
        return self.parameters + self.gradients + self.optimizer + self.activations


@dataclass
class Sizing:
    """What the formulas need: the model, the optimizer's state bytes and the precision."""

    facts: ModelFacts
    state_bytes: float
    mixed: bool
    gradient_accumulation: int

    @property
    def compute_bytes(self):
        """Bytes of a parameter or gradient in the dtype DeepSpeed/FSDP compute in (p in the docstring)."""
        return 2 if self.mixed else 4

    @property
    def activations(self):
        return self.facts.layer_activations + self.facts.head_activations


def ddp(s):
    f = s.facts
    return Estimate(parameters=4 * f.params + (2 * f.params if s.mixed else 0), gradients=4 * f.trainable,
                    optimizer=s.state_bytes * f.trainable, activations=s.activations)


def zero(s, stage, n, offload_optimizer=False, offload_param=False, params=None, trainable=None, activations=None):
    """DeepSpeed ZeRO with the multipliers of its own estimators (see the module docstring)."""
    p = s.compute_bytes
    params = s.facts.params if params is None else params
    trainable = s.facts.trainable if trainable is None else trainable
    gathered = s.facts.largest_layer * p if stage == 3 else 0.0
    param_part = p * params / (n if stage == 3 else 1)
    grad_full = p * trainable if stage < 2 else 0.0
    grad_part = (p * trainable / n if stage >= 2 else 0.0) + (4 * trainable / n if s.mixed else 0.0)
    master = 4 * trainable if (s.mixed or stage < 3) else 0.0
    optimizer = (master + s.state_bytes * trainable) / (n if stage >= 1 else 1)
    host = (optimizer + grad_part if offload_optimizer else 0.0) + (param_part if offload_param else 0.0)
    return Estimate(
        parameters=gathered + (0.0 if offload_param else param_part),
        gradients=gathered + grad_full + (0.0 if offload_optimizer else grad_part),
        optimizer=0.0 if offload_optimizer else optimizer,
        activations=s.activations if activations is None else activations, host=host,
    )


def fsdp(s, n):
    f = s.facts
    gathered = s.compute_bytes * (f.fsdp_root + f.fsdp_blocks)
    unsharded_grads = s.compute_bytes * f.fsdp_blocks / 2  # about one block's, before its reduce-scatter
    return Estimate(parameters=4 * f.params / n + gathered, gradients=4 * f.trainable / n + unsharded_grads,
                    optimizer=s.state_bytes * f.trainable / n, activations=s.activations)


def pipeline(s, stages, replicas):
    """Each stage holds 1/stages of the layers and, in the 1F1B schedule, up to `stages` micro-batches."""
    f = s.facts
    in_flight = min(stages, s.gradient_accumulation)
    activations = f.layer_activations / stages * in_flight + f.head_activations
    return zero(s, 1, replicas, params=f.params / stages, trainable=f.trainable / stages, activations=activations)


def estimates(sizing, launch):
    """{column label: Estimate} for the launch's world size."""
    n = launch.world_size
    stages = launch.pipeline_stages or n
    return {
        "DDP": ddp(sizing),
        "ZeRO-1": zero(sizing, 1, n),
        "ZeRO-2": zero(sizing, 2, n),
        "ZeRO-3": zero(sizing, 3, n),
        "ZeRO-2 off": zero(sizing, 2, n, offload_optimizer=True),
        "ZeRO-3 off": zero(sizing, 3, n, offload_optimizer=True, offload_param=True),
        "FSDP": fsdp(sizing, n),
        f"pipe {stages}x{n // stages}": pipeline(sizing, stages, n // stages),
    }


def launch_estimate(sizing, launch):
    """(description, Estimate) of exactly this launch's strategy."""
    n = launch.world_size
    if launch.pipeline_stages:
        stages = launch.pipeline_stages
        return f"pipeline, {stages} stages x {n // stages} replicas", pipeline(sizing, stages, n // stages)
    if launch.zero_stage is not None:
        offload = [f"{what} -> {device}" for what, device in
                   (("optimizer", launch.offload_optimizer), ("parameters", launch.offload_param)) if device != "none"]
        text = f"ZeRO-{launch.zero_stage}" + (f", offload {', '.join(offload)}" if offload else "")
        return text, zero(sizing, launch.zero_stage, n, launch.offload_optimizer != "none",
                          launch.zero_stage == 3 and launch.offload_param != "none")
    if launch.fsdp:
        return f"{launch.fsdp} (estimated as full shard)", fsdp(sizing, n)
    return ("DDP" if n > 1 else "one device"), ddp(sizing)


# ---- recommendation ----


def parse_memory(text):
    """'24GB' -> 24e9 bytes, '80GiB' -> 80 * 2**30 (GB/MB are decimal, GiB/MiB binary)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]+)\s*", str(text))
    unit = match and UNITS.get(match.group(2).lower())
    if not unit or float(match.group(1)) <= 0:
        raise HftuneError(f"--device_memory '{text}' is not a size; write it like 24GB, 80GiB or 512MiB.")
    return float(match.group(1)) * unit


@dataclass
class Recommendation:
    fits: bool
    strategy: str  # the first that fits; when none does, the one needing least
    config: str  # the shipped accelerate config to launch it with (None when nothing fits)
    need: float  # its estimated bytes per device
    device: float


def recommend(table, device_bytes, world):
    """The first strategy of RECOMMENDATION_ORDER whose estimate fits in HEADROOM of the device."""
    for column, strategy, config in RECOMMENDATION_ORDER:
        need = table[column].total
        if need <= HEADROOM * device_bytes:
            config = "single_device.yaml" if strategy == "DDP" and world == 1 else config
            return Recommendation(True, strategy, f"accelerate_configs/{config}", need, device_bytes)
    column, strategy, _ = min(RECOMMENDATION_ORDER, key=lambda entry: table[entry[0]].total)
    return Recommendation(False, strategy, None, table[column].total, device_bytes)
