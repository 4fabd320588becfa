"""What every task shares: the bundle a task hands the engine, the model-loading fields and the
from_pretrained settings, and the fields of the text tasks."""

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

from hftune.assets import resolve_model
from hftune.errors import HftuneError, closest
from hftune.tasks.loading import (
    building, check_architecture, check_checkpoint, check_folder, check_mismatched, check_processor_files,
)

logger = logging.getLogger("hftune")


@dataclass
class BaseModelArguments:
    """Where the checkpoint comes from and how it loads; features add their model fields beside these."""

    model_name_or_path: str = field(
        default=None,
        metadata={"help": "Hub id, local checkpoint folder, or an offline asset such as 'asset:all-MiniLM-L6-v2'."},
    )
    model_revision: str = field(default="main", metadata={"help": "Hub branch, tag or commit of the checkpoint."})
    cache_dir: str = field(default=None, metadata={"help": "Where downloaded models and data sets are cached."})
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Run modelling code shipped with the checkpoint. Only for sources you trust."}
    )
    ignore_mismatched_sizes: bool = field(
        default=True,
        metadata={"help": "Re-initialise a task head whose shape differs from the checkpoint's (a checkpoint "
                          "fine-tuned on other labels). Backbone tensors never: see reinit_mismatched_backbone."},
    )
    reinit_mismatched_backbone: bool = field(
        default=False,
        metadata={"help": "Also re-initialise backbone tensors whose shape in config.json differs from the weights' "
                          "(by default an error naming the first: the config and the weights disagree)."},
    )
    tokenizer_name: str = field(
        default=None, metadata={"help": "Tokenizer (or image processor) to load instead of the checkpoint's own: "
                                        "a Hub id, folder or asset (the example scripts' name)."},
    )
    config_name: str = field(
        default=None, metadata={"help": "Model config to load instead of the checkpoint's own (a Hub id or folder)."}
    )
    model_type: str = field(
        default=None,
        metadata={"help": "Train from scratch, as run_clm.py can: the default config of this transformers model type "
                          "(gpt2, llama, bert, ...), changed by config_overrides, randomly initialised; needs "
                          "tokenizer_name, instead of model_name_or_path."},
    )
    config_overrides: str = field(
        default=None,
        metadata={"help": "With model_type: changes to its default config, e.g. 'n_embd=64,n_layer=2,n_head=2'."},
    )

    def __post_init__(self):
        check_model_source(self)


def check_model_source(args):
    """Exactly one source of weights: a checkpoint, or a model type trained from scratch."""
    if args.model_type is None:
        if args.config_overrides:
            raise HftuneError("config_overrides changes the config of a model trained from scratch; set model_type "
                              "(and drop model_name_or_path), or drop config_overrides.")
        return
    from transformers import CONFIG_MAPPING

    if args.model_name_or_path:
        raise HftuneError("model_type trains a new model from scratch, model_name_or_path fine-tunes a checkpoint; "
                          "keep one.")
    if args.model_type not in CONFIG_MAPPING:
        raise HftuneError(f"unknown model_type '{args.model_type}'.{closest(args.model_type, CONFIG_MAPPING)}")
    if not args.tokenizer_name:
        raise HftuneError(f"model_type {args.model_type} starts without a tokenizer; set tokenizer_name "
                          "(a Hub id, folder or asset).")


@dataclass
class TextFields:
    """Data fields of every task that reads text."""

    text_column: str = field(
        default=None,
        metadata={"help": "Column holding the (first) text; several, comma-separated, are joined with a space. Default: "
                          "detected (a GLUE pair such as sentence1/sentence2, text, sentence, or the only text column)."},
    )
    max_seq_length: int = field(
        default=128, metadata={"help": "Longest tokenized input; longer texts are truncated."}
    )


@dataclass(frozen=True)
class TaskTraits:
    """What the features need to know of a task, so that none of them names one (hftune.tasks.traits)."""

    auto_model: str  # the transformers Auto class of its models (a teacher loads with it; `hftune plan` too)
    output: str  # "classes": a head over the data's labels; "tokens": a language-model head
    inputs: str  # "text", "image", or "chat" (conversations rendered by a chat template)
    peft_task_type: str = None  # peft's TaskType; None where peft has none


@dataclass
class TaskBundle:
    model: Any
    processor: Any  # tokenizer or image processor; saved beside the model
    train_dataset: Any
    eval_dataset: Any
    data_collator: Callable = None
    compute_metrics: Callable = None
    main_metric: str = "eval_loss"  # the number the end-of-run summary reports
    derived_metrics: Callable = None  # dict of metrics -> extra metrics (e.g. perplexity)
    test_dataset: Any = None
    pipeline_task: str = None  # transformers.pipeline task that loads the saved model (the Hub's pipeline_tag)
    usage: str = None  # where transformers has no pipeline for the task: Python that loads and runs it ({ref})
    adapter: Any = None  # hftune.compression.adapters.AdapterSaver under peft: saves what the adapter needs beside it
    predict_inputs: Any = None  # texts of the predict_split (prompts of a causal LM), set for do_predict
    skipped_rows: dict = None  # split -> rows dropped as unusable (empty text, unreadable image)
    data_counts: dict = None  # more counts for the results, e.g. train_dropped_no_labels (sft)
    answers: bool = False  # evaluation also generates answers to the rows' prompts and scores them (sft)
    span_answers: Any = None  # question-answering: turns a split's start/end logits into answer texts
    callbacks: tuple = ()  # TrainerCallbacks the task's data needs in training (masked-lm: the epoch's masks)


def check_room(tokenizer, length, name="max_seq_length", pair=False, real=1):
    """`length` tokens must hold the special tokens the tokenizer adds plus `real` tokens of text:
    below that every input is special tokens only (nothing to learn) or is never truncated (fails mid-run)."""
    specials = tokenizer.num_special_tokens_to_add(pair=pair)
    if length < specials + real:
        raise HftuneError(f"{name} {length} leaves no room for text: the tokenizer adds {specials} special token(s) "
                          f"per input{' pair' if pair else ''} and at least {real} token(s) of text are needed; set "
                          f"{name} to at least {specials + real} (128 or more is usual).")


def pretrained_source(model_args):
    """(local path or Hub id, kwargs) for every from_pretrained call of a task: one revision,
    cache and trust_remote_code setting for model, config and processor alike."""
    kwargs = dict(revision=model_args.model_revision, cache_dir=model_args.cache_dir,
                  trust_remote_code=model_args.trust_remote_code)
    if model_args.trust_remote_code:
        logger.warning(f"trust_remote_code: true runs the Python code shipped with '{model_args.model_name_or_path}' "
                       "on this machine; keep it only for sources you trust.")
    path = resolve_model(model_args.model_name_or_path)
    if not model_args.model_type:
        check_checkpoint(model_args.model_name_or_path, path, "model_name_or_path")
    return path, kwargs


def processor_path(model_args, path, kind="tokenizer"):
    """Where the tokenizer (or image processor) loads from: tokenizer_name, else the checkpoint."""
    path = resolve_model(model_args.tokenizer_name) if model_args.tokenizer_name else path
    check_processor_files(model_args, path, kind)
    return path


def load_config(model_args, path, common, **task_settings):
    """The checkpoint's config (or config_name's, or model_type's default changed by config_overrides)
    with the task's settings (labels, ...) and the user's dropout overrides."""
    from transformers import AutoConfig

    from hftune.training.regularization import apply_dropout_overrides

    if model_args.model_type:
        config = AutoConfig.for_model(model_args.model_type, **task_settings)
        if model_args.config_overrides:
            try:
                config.update_from_string(model_args.config_overrides)
            except ValueError as err:
                raise HftuneError(f"config_overrides: {err}") from None
            logger.info(f"model_type {model_args.model_type} with config_overrides {model_args.config_overrides}")
    else:
        source = resolve_model(model_args.config_name) if model_args.config_name else path
        if model_args.config_name:
            check_folder(model_args.config_name, source, "config_name")
        with building(model_args.config_name or model_args.model_name_or_path,
                      "config_name" if model_args.config_name else "model_name_or_path"):
            config = AutoConfig.from_pretrained(source, **task_settings, **common)
    return apply_dropout_overrides(config, model_args)


def load_weights(auto_class, model_args, path, config, loading_info=False, **kwargs):
    """The checkpoint's weights (and transformers' loading info when asked), or a new randomly
    initialised model of model_type (from scratch). Only the task head may change shape."""
    if model_args.model_type:
        kwargs = {k: v for k, v in kwargs.items() if k in ("dtype", "trust_remote_code")}
        logger.info(f"training a new {model_args.model_type} model from scratch (random weights)")
        model = auto_class.from_config(config, **kwargs)
        return (model, {}) if loading_info else model
    check_architecture(model_args.model_name_or_path, config, auto_class)
    with building(model_args.model_name_or_path):
        model, info = auto_class.from_pretrained(path, config=config, output_loading_info=True, **kwargs)
    check_mismatched(info, model, model_args)
    # transformers' ZeRO-3 loader keeps every name conversion it tried, not only those the checkpoint used as its
    # other loader does; save_pretrained reverts them, so a BERT's LayerNorm.weight was saved as LayerNorm.gamma.
    if getattr(model, "_weight_conversions", None):
        model._weight_conversions = [conversion for conversion in model._weight_conversions if conversion.was_used()]
    return (model, info) if loading_info else model
