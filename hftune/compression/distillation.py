"""Knowledge distillation (Hinton et al., 2015): the student learns from the task's labels and from a
frozen teacher's temperature-softened outputs,

    loss = distill_alpha * task loss + (1 - distill_alpha) * T^2 * KL(teacher || student),

for all three task families: classes of a text or image classifier, tokens of a causal LM (a KL over
the vocabulary at every position the LM loss predicts), masked tokens of a masked LM (the same, at its
masked positions; teacher and student see the same masked batch), the tags of a token classifier (over its
tags, at every labelled sub-token), the answer span of a question-answering model (its start and its end
distributions over the feature's positions). The teacher is loaded with the task's Auto
class in float32, frozen and kept in eval mode; every engine that trains places it beside the
student (a whole copy per process under DDP and ZeRO-1/2, sharded like the student under ZeRO-3).

Example (recipe keys):
    teacher_model_name_or_path: outputs/big-teacher   # asset:NAME, a local folder or a Hub id
    distill_alpha: 0.5                                # default with a teacher
    distill_temperature: 2.0                          # default with a teacher

    >>> import torch
    >>> student, teacher = torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, 0.0]])
    >>> float(distillation_loss(student, teacher, temperature=2.0))  # same distributions: no KL
    0.0
"""

import copy
import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import transformers
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES, MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES,
)

from hftune.assets import resolve_model
from hftune.errors import HftuneError
from hftune.launch.checks import uses_fsdp
from hftune.tasks import traits
from hftune.tasks.loading import building, check_architecture, check_checkpoint

logger = logging.getLogger("hftune")
DEFAULT_ALPHA, DEFAULT_TEMPERATURE = 0.5, 2.0
# task -> the Auto class that loads its teacher (the student's own class)


@dataclass
class ModelFields:
    """The teacher to distill from."""

    teacher_model_name_or_path: str = field(
        default=None,
        metadata={"help": "Distill from this fine-tuned teacher (same labels / vocabulary as the student); "
                          "see distill_alpha and distill_temperature."},
    )


@dataclass
class TrainingFields:
    """How the teacher's targets weigh in the loss."""

    distill_alpha: float = field(
        default=None,
        metadata={"help": "Weight of the task loss: alpha * task + (1 - alpha) * T^2 * KL(teacher || student) "
                          "(default 0.5 with a teacher)."},
    )
    distill_temperature: float = field(
        default=None, metadata={"help": "Softmax temperature T of the distillation targets (default 2.0 with a teacher)."}
    )


# DeepSpeed keys the Trainer fills from the model's hidden size only when it initialises the student
HIDDEN_SIZE_KEYS = {"reduce_bucket_size": lambda h: h * h, "stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
                    "stage3_param_persistence_threshold": lambda h: 10 * h}


def distillation_loss(student_logits, teacher_logits, temperature, labels=None, num_items=None, ignore_index=-100,
                      shift=1):
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), summed over the classes (vocabulary).

    Without labels (classification) the KL of each example is averaged. With labels (an LM) only the
    positions whose label is not `ignore_index` count, the logits shifted as the LM loss shifts them
    (`shift` 1, causal LM: position i predicts token i + 1; 0, masked LM or token classifier: each position
    its own token or tag): their KL is averaged, or summed and divided by `num_items` when the task loss is normalized
    that way (the tokens of a whole accumulated batch).
    """
    if labels is not None:
        keep = labels[..., shift:] != ignore_index
        end = student_logits.shape[-2] - shift
        student_logits, teacher_logits = student_logits[..., :end, :][keep], teacher_logits[..., :end, :][keep]
    log_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = F.kl_div(log_student, log_teacher, reduction="none", log_target=True).sum(-1) * temperature**2
    if labels is None:
        return kl.mean()
    return kl.sum() / (max(len(kl), 1) if num_items is None else num_items)


def task_logits(outputs):
    """What teacher and student are compared on: the logits, or a span model's start and end logits as two
    distributions over the positions of each example ([batch, 2, positions])."""
    if getattr(outputs, "logits", None) is not None:
        return outputs.logits
    return torch.stack([outputs.start_logits, outputs.end_logits], dim=1)


class Distiller:
    """Mixes a task loss with the teacher's distillation term, and keeps both parts for the log lines
    (`task_loss`, `distill_loss`: per optimizer step, as `loss` is).

    Example:
        >>> distiller = Distiller(teacher, alpha=0.5, temperature=2.0, causal=False)  # doctest: +SKIP
        >>> loss = distiller.mix(task_loss, outputs.logits, inputs, inputs["labels"])  # doctest: +SKIP
    """

    def __init__(self, teacher, alpha, temperature, causal, per_token=False):
        self.teacher, self.alpha, self.temperature, self.causal = teacher, alpha, temperature, causal
        self.per_token = per_token  # a masked LM or token classifier: the KL at its labelled positions, unshifted
        self._sums, self._steps = torch.zeros(2), 0.0

    def teacher_logits(self, inputs):
        with torch.no_grad():
            return task_logits(self.teacher(**{k: v for k, v in inputs.items() if k != "labels"}))

    def mix(self, task_loss, student_logits, inputs, labels, num_items=None, accumulation=1, scaled=False):
        """alpha * task_loss + (1 - alpha) * distillation term, normalized as task_loss is: `scaled`
        says task_loss is already a share of the accumulated batch (divided by `num_items`), else it
        is this micro-batch's mean, of which `accumulation` make one optimizer step."""
        teacher_logits = self.teacher_logits(inputs)
        # prompt/prefix tuning prepends virtual tokens to the student's sequence: align on the real ones
        student_logits = student_logits[..., -teacher_logits.shape[-2]:, :] if self.causal else student_logits
        distill = distillation_loss(student_logits, teacher_logits, self.temperature,
                                    labels=labels if self.causal or self.per_token else None, num_items=num_items,
                                    shift=1 if self.causal else 0)
        share = 1.0 if scaled else 1.0 / accumulation
        parts = torch.stack([task_loss.detach(), distill.detach()]).float() * share
        self._sums = self._sums.to(parts.device) + parts  # tensors: no device sync on the training path
        self._steps += 1.0 / accumulation
        return self.alpha * task_loss + (1 - self.alpha) * distill

    def pop_means(self, reduce=None):
        """Mean of both parts per optimizer step since the last call; `reduce` averages over processes
        (a collective: every process logs at the same steps)."""
        if not self._steps:
            return {}
        sums = reduce(self._sums) if reduce is not None else self._sums
        task, distill = (sums / self._steps).tolist()
        self._sums, self._steps = torch.zeros_like(self._sums), 0.0
        return {"task_loss": task, "distill_loss": distill}


# ---- configuration ----

def check_distillation(model_args, args):
    """Fill distill_alpha/distill_temperature's defaults when a teacher is set; refuse them without one,
    out of range, or where no engine would honour them."""
    if not model_args.teacher_model_name_or_path:
        for name in ("distill_alpha", "distill_temperature"):
            if getattr(args, name) is not None:
                raise HftuneError(f"{name} needs teacher_model_name_or_path (without a teacher it would be "
                                  f"ignored); set a teacher or drop {name}.")
        return
    args.distill_alpha = DEFAULT_ALPHA if args.distill_alpha is None else args.distill_alpha
    args.distill_temperature = DEFAULT_TEMPERATURE if args.distill_temperature is None else args.distill_temperature
    if not 0 <= args.distill_alpha <= 1:
        raise HftuneError(f"distill_alpha must be in [0, 1] (the task loss's weight), got {args.distill_alpha}.")
    if args.distill_temperature <= 0:
        raise HftuneError(f"distill_temperature must be > 0, got {args.distill_temperature}.")
    if not args.do_train:
        raise HftuneError("teacher_model_name_or_path only changes training, and do_train is false; drop it.")
    if args.engine == "pipeline":
        raise HftuneError("engine: pipeline cannot distill (its stages never hold the whole student's logits); "
                          "use engine: trainer.")
    if uses_fsdp(args):
        raise HftuneError("distillation under FSDP is not supported (the teacher would not be sharded); "
                          "use DDP, or DeepSpeed ZeRO-3 with engine: trainer, which shards the teacher too.")


def check_config(model_args, data_args, training_args):
    """The feature's parse-time check (hftune.features)."""
    check_distillation(model_args, training_args)


# ---- the teacher ----


def load_teacher(model_args, task, student, processor):
    """The frozen float32 teacher (None without teacher_model_name_or_path), checked against the student.
    Under ZeRO-3 call it while every process loads together, as for the student (it is partitioned
    as it loads)."""
    name = model_args.teacher_model_name_or_path
    if not name:
        return None
    path = resolve_model(name)
    common = dict(cache_dir=model_args.cache_dir, trust_remote_code=model_args.trust_remote_code)
    auto_class = getattr(transformers, traits(task).auto_model)
    role = "teacher_model_name_or_path"
    check_checkpoint(name, path, role)
    try:
        with building(name, role):
            config = transformers.AutoConfig.from_pretrained(path, **common)
            check_architecture(name, config, auto_class, role)  # e.g. an image model for a text task
            teacher = auto_class.from_pretrained(path, config=config, dtype=torch.float32, **common)
    except OSError as err:  # a missing folder or Hub id
        raise HftuneError(f"could not load {role} '{name}': {str(err).splitlines()[0]}") from None
    if traits(task).output == "tokens":
        check_vocabulary(name, teacher, student, teacher_tokenizer(path, common), processor)
    else:
        check_labels(name, teacher, student)
    return teacher.requires_grad_(False).eval()


def label_names(config):
    return [config.id2label[i] for i in range(config.num_labels)]


def check_labels(name, teacher, student):
    """A classifier teacher must score the data's classes in the student's order."""
    mine, theirs = label_names(student.config), label_names(teacher.config)
    if len(theirs) != len(mine):
        raise HftuneError(f"teacher_model_name_or_path '{name}' has {len(theirs)} labels {theirs}, the data has "
                          f"{len(mine)} {mine}; distill from a teacher fine-tuned on the same classes.")
    unnamed = theirs == [f"LABEL_{i}" for i in range(len(theirs))]  # transformers' placeholder names
    if not unnamed and theirs != mine:
        raise HftuneError(f"teacher_model_name_or_path '{name}' has labels {theirs}, the data's classes are "
                          f"{mine} (in this order); distill from a teacher fine-tuned on the same classes.")


def teacher_tokenizer(path, common):
    """The teacher's own tokenizer, or None when its checkpoint ships none."""
    try:
        return transformers.AutoTokenizer.from_pretrained(path, **common)
    except (OSError, ValueError):
        return None


def check_vocabulary(name, teacher, student, tokenizer, student_tokenizer):
    """An LM teacher must predict over the student's vocabulary, token id for token id."""
    sizes = teacher.config.vocab_size, student.config.vocab_size
    if sizes[0] != sizes[1]:
        raise HftuneError(f"teacher_model_name_or_path '{name}' predicts over {sizes[0]} tokens, the student over "
                          f"{sizes[1]}; distill from a teacher with the student's vocabulary.")
    if tokenizer is not None and tokenizer.get_vocab() != student_tokenizer.get_vocab():
        raise HftuneError(f"teacher_model_name_or_path '{name}' has a tokenizer of {len(tokenizer)} tokens that maps "
                          f"text to other ids than the student's ({len(student_tokenizer)} tokens); distill from a "
                          "teacher with the student's tokenizer.")


def place_teacher(teacher, accelerator):
    """On the student's device: a whole copy per process (DDP, ZeRO-1/2; never DDP-wrapped: it gets no
    gradients), or, under ZeRO-3, a DeepSpeed inference engine over the run's own ZeRO-3 settings,
    so the teacher is partitioned across the processes like the student (trl's prepare_deepspeed)."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None or plugin.zero_stage != 3:
        logger.info(f"teacher: a whole frozen copy on {accelerator.device} in every process")
        return teacher.to(accelerator.device)
    import deepspeed

    config = copy.deepcopy(plugin.deepspeed_config)
    for block in ("optimizer", "scheduler"):  # nothing to optimize
        config.pop(block, None)
    hidden = getattr(teacher.config, "hidden_size", None) or max(getattr(teacher.config, "hidden_sizes", [0]))
    zero = config["zero_optimization"]
    for key, value in HIDDEN_SIZE_KEYS.items():
        if zero.get(key) == "auto":
            zero[key] = value(hidden)
    engine, *_ = deepspeed.initialize(model=teacher, config=config)
    engine.eval()
    params = list(teacher.parameters())
    held, whole = sum(p.ds_tensor.numel() for p in params), sum(p.ds_numel for p in params)
    logger.info(f"teacher: partitioned by ZeRO-3, {held:,} of {whole:,} parameter elements in this process")
    return engine


def distiller_for(teacher, args, accelerator):
    """The engine's Distiller, or None without a teacher."""
    if teacher is None:
        return None
    causal = type(teacher).__name__ in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
    per_token = type(teacher).__name__ in (*MODEL_FOR_MASKED_LM_MAPPING_NAMES.values(),
                                           *MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES.values())
    return Distiller(place_teacher(teacher, accelerator), args.distill_alpha, args.distill_temperature, causal,
                     not causal and per_token)
