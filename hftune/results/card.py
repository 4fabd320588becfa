"""The model card (output_dir/README.md in the Hub's format) and the training curves beside it.

The metadata (base_model, datasets, pipeline_tag, tags, model-index) is built by huggingface_hub's
ModelCardData / EvalResult, so the Hub parses it as it parses any card; the text says what the run
did: base model, data, task, the resolved strategy and parallel setup, the metrics, the curves, the
framework versions and how to load the model.

Example (after a run, as hftune/run.py does; then read the card back as the Hub does):
    >>> write_report(trainer, bundle, model_args, data_args, training_args, metrics)  # doctest: +SKIP
    >>> huggingface_hub.ModelCard.load("out/README.md").data.eval_results  # doctest: +SKIP
"""

import logging
import math
import os
from importlib import metadata

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from transformers.modelcard import TASK_TAG_TO_NAME_MAPPING, make_markdown_table, parse_log_history

from hftune.compression.adapters import describe
from hftune.assets import get_asset, is_asset
from hftune.launch.checks import deepspeed_config, pipeline_stages, uses_fsdp, zero_stage
from hftune.training.optim import name_of, schedule_kwargs
from hftune.outputs import BASE_CONFIG_DIR, CONFIG_FILE, MERGED_DIR
from hftune.results.plots import write_curves

logger = logging.getLogger("hftune")

CARD = "README.md"
SPLITS = {"eval": "validation", "test": "test"}  # metric prefix -> the split it was measured on
# eval_* keys that are timings or counts, not results
NOT_RESULTS = ("runtime", "samples_per_second", "steps_per_second", "samples", "model_preparation_time", "epoch")
FRAMEWORKS = ("hftune", "transformers", "torch", "accelerate", "datasets", "peft")
ENGINES = {"trainer": "Hugging Face Trainer", "accelerate": "hftune's Accelerate loop",
           "pipeline": "DeepSpeed pipeline engine"}


def write_report(trainer, bundle, model_args, data_args, training_args, metrics):
    """Write output_dir/README.md (Hub model card) and the training-curve PNGs, on the main process.

    Only a run that trained (and so saved a model) gets a card: an evaluation-only run must not replace
    the card of the model it evaluated; its numbers are in eval_results.json."""
    if not trainer.is_world_process_zero():
        return None
    if not training_args.do_train:
        logger.info("evaluation-only run: no model card written (an existing one is left as it is)")
        return None
    out = training_args.output_dir
    curves = write_curves(trainer.state.log_history, out)
    card = build_card(trainer, bundle, model_args, data_args, training_args, metrics, curves)
    path = os.path.join(out, CARD)
    card.save(path)
    logger.info(f"model card written to {path}" + (f", curves: {', '.join(curves)}" if curves else ""))
    return path


def build_card(trainer, bundle, model_args, data_args, training_args, metrics, curves):
    """A huggingface_hub ModelCard; constructing it parses the metadata back (model-index included),
    so a malformed entry fails here, not on the Hub."""
    base_text, base_id = base_model_facts(model_args)
    data = dataset_facts(data_args)
    results = eval_results(metrics)
    name = model_name(training_args)
    card_data = ModelCardData(
        model_name=name, base_model=base_id, datasets=[data["hub_id"]] if data["hub_id"] else None,
        pipeline_tag=bundle.pipeline_task, library_name="peft" if bundle.adapter is not None else "transformers",
        tags=tags(bundle, model_args), eval_results=model_index(results, bundle.pipeline_task, data) or None,
    )
    sections = [
        f"# {name}\n\nFine-tuned with hftune for **{bundle.pipeline_task}**: "
        f"base model {base_text}, data {data['text']}." + problem_text(bundle, data_args),
        results_section(results, trainer.state.log_history),
        usage_section(bundle, model_args, training_args),
        "## Training\n\n### Strategy\n\n" + bullets(strategy_lines(trainer, model_args, training_args)),
        "### Parallel setup\n\n" + bullets(parallel_lines(trainer, training_args)),
        curves_section(curves),
        f"## Reproduce\n\nThe resolved config of this run is [{CONFIG_FILE}]({CONFIG_FILE}):\n\n"
        f"    hftune --config {CONFIG_FILE}",
        "## Framework versions\n\n" + bullets(framework_versions(training_args)),
    ]
    body = "\n\n".join(s for s in sections if s) + "\n"
    return ModelCard(scrub_secrets(f"---\n{card_data.to_yaml()}\n---\n\n{body}", training_args))


# ---- what was trained, on what ----


def model_name(args):
    return (args.hub_model_id or "").split("/")[-1] or os.path.basename(os.path.abspath(args.output_dir))


def is_hub_id(name):
    if os.path.exists(name):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def base_model_facts(model_args):
    """(text for the card, Hub id for base_model metadata or None)."""
    name = model_args.model_name_or_path
    if name is None:
        return f"a new `{model_args.model_type}` model trained from scratch (`model_type`, `config_overrides`)", None
    if is_asset(name):
        return f"`{name}` (hftune offline asset: {get_asset(name, 'model').description})", None
    if is_hub_id(name):
        return f"[{name}](https://huggingface.co/{name})", name
    return f"the local checkpoint `{os.path.basename(os.path.normpath(name))}`", None


def dataset_facts(data_args):
    """Text for the card, the Hub id (or None) and the model-index dataset type/name/config."""
    name = data_args.dataset_name
    if name and is_asset(name):
        description = get_asset(name, "dataset").description
        return dict(text=f"`{name}` ({description})", hub_id=None, type=name.split(":", 1)[1], name=name, config=None)
    if name:
        config = data_args.dataset_config_name
        text = f"[{name}](https://huggingface.co/datasets/{name})" + (f" (config `{config}`)" if config else "")
        return dict(text=text, hub_id=name, type=name, name=name, config=config)
    files = [os.path.basename(os.path.normpath(f)) for f in
             (data_args.train_file, data_args.validation_file, data_args.test_file) if f]
    kind = "local"
    if files:  # the datasets builder the files load with: csv, json, ...; a folder is an imagefolder
        kind = os.path.splitext(files[0])[1].lstrip(".") or "imagefolder"
    return dict(text="local files " + ", ".join(f"`{f}`" for f in files), hub_id=None, type=kind,
                name=" + ".join(files), config=None)


def problem_text(bundle, data_args):
    """What the head predicts, where it is not one class per example (which the task name says)."""
    if bundle.answers:  # sft
        turns = {"assistant": "every assistant turn", "last_assistant": "the last assistant turn",
                 "all": "the whole text"}[data_args.train_on]
        return (f"\n\nTask: **sft** (supervised fine-tuning on instructions and conversations): the loss covers "
                f"{turns} and its end-of-turn token, rendered with the chat template saved with the tokenizer; "
                "generation stops at that end-of-turn (generation_config.json).")
    config = bundle.model.config
    kind, column = getattr(config, "problem_type", None), data_args.label_column
    if kind == "regression":
        return (f"\n\nProblem type: **regression** of `{column}`: one output, the predicted score itself (no "
                "activation), trained with mean squared error; the pipeline returns it as `score`.")
    if kind == "multi_label_classification":
        names = [config.id2label[i] for i in range(config.num_labels)]
        shown = ", ".join(f"`{n}`" for n in names[:20]) + (f" and {len(names) - 20} more" if len(names) > 20 else "")
        return (f"\n\nProblem type: **multi-label classification** of `{column}` over {len(names)} labels "
                f"({shown}): a sigmoid probability per label, trained with binary cross-entropy; a label is "
                "predicted where its probability exceeds 0.5. `pipeline(..., top_k=None)` returns every label's.")
    return ""


def tags(bundle, model_args):
    extra = [model_args.peft] if model_args.peft else []
    return ["hftune", bundle.pipeline_task, *extra]


# ---- results ----


def eval_results(metrics):
    """[(split, metric, value)] of the run's evaluation numbers (eval_* and test_*), timings and counts left out."""
    results = []
    for key, value in metrics.items():
        prefix, _, metric = key.partition("_")
        if prefix in SPLITS and metric not in NOT_RESULTS and isinstance(value, (int, float)) \
                and not isinstance(value, bool):
            results.append((SPLITS[prefix], metric, value))
    return results


def model_index(results, task, data):
    """huggingface_hub EvalResults (the card's model-index); a non-finite value has no place there."""
    return [EvalResult(task_type=task, task_name=TASK_TAG_TO_NAME_MAPPING.get(task, task), dataset_type=data["type"],
                       dataset_name=data["name"], dataset_config=data["config"], dataset_split=split,
                       metric_type=metric, metric_name=metric.replace("_", " "), metric_value=value)
            for split, metric, value in results if math.isfinite(value)]


def format_value(value):
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def results_section(results, log_history):
    if not results:
        return "## Results\n\nThis run did not evaluate (do_eval: false)."
    rows = "\n".join(f"| {split} | {metric} | {format_value(value)} |" for split, metric, value in results)
    text = f"## Results\n\n| split | metric | value |\n|:--|:--|--:|\n{rows}"
    _, lines, _ = parse_log_history(log_history)  # transformers' own per-evaluation table
    if lines:
        text += "\n\n### Evaluations during training\n\n" + make_markdown_table(lines).strip()
    return text


def curves_section(curves):
    if not curves:
        return ""
    images = "\n\n".join(f"![{os.path.splitext(c)[0].replace('_', ' ')}]({c})" for c in curves)
    return f"### Training curves\n\n{images}"


# ---- how it was trained ----


def plural(count, noun):
    return f"{count} {noun}" + ("" if count == 1 else "es" if noun.endswith("s") else "s")


def bullets(lines):
    return "\n".join(f"- {line}" for line in lines)


def unwrap_optimizer(optimizer):
    """The torch optimizer under accelerate's / DeepSpeed's wrappers (or None before training)."""
    while optimizer is not None and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def optimizer_line(trainer, args):
    optimizer = unwrap_optimizer(getattr(trainer, "optimizer", None))
    built = getattr(optimizer, "defaults", None)
    hyper = dict(built) if built else {"lr": args.learning_rate}
    hyper.pop("weight_decay", None)  # per parameter group: under regularization
    shown = ", ".join(f"{k}={v}" for k, v in hyper.items() if not (isinstance(v, (bool, type(None))) and not v))
    kind = f" ({type(optimizer).__module__}.{type(optimizer).__name__})" if built else ""
    return f"optimizer: `{name_of(args.optim)}`{kind}: {shown}" + (f"; optim_args `{args.optim_args}`"
                                                                     if args.optim_args else "")


def schedule_line(args):
    warmup = args.warmup_steps
    warmup_text = ("no warmup" if not warmup else f"warmup {int(warmup)} steps" if warmup >= 1
                   else f"warmup {warmup:.0%} of the steps")
    kwargs = schedule_kwargs(args)
    return (f"learning rate {args.learning_rate}, schedule `{name_of(args.lr_scheduler_type)}`"
            + (f" {kwargs}" if kwargs else "") + f", {warmup_text}")


def batch_line(args):
    processes, data_parallel = args.world_size, data_parallel_size(args)
    per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * data_parallel
    return (f"batch size: {args.per_device_train_batch_size} per device x {args.gradient_accumulation_steps} "
            f"gradient accumulation x {plural(data_parallel, 'data-parallel process')} = {per_step} examples per "
            f"optimizer step ({plural(processes, 'process')} in all)")


def length_line(trainer, args):
    planned = f"max_steps {args.max_steps}" if args.max_steps > 0 else f"num_train_epochs {args.num_train_epochs}"
    state = trainer.state
    return f"length: {planned}; trained {state.global_step} optimizer steps ({state.epoch or 0:.2f} epochs)"


def regularization_lines(model_args, args):
    found = {
        "weight_decay": args.weight_decay or None,
        "L1 penalty": args.l1_lambda and f"{args.l1_lambda} on {args.regularize}",
        "L2 penalty": args.l2_lambda and f"{args.l2_lambda} on {args.regularize}",
        "label smoothing": args.label_smoothing_factor or None,
        "dropout overrides": ", ".join(f"{k}={getattr(model_args, k)}" for k in
                                       ("hidden_dropout", "attention_dropout", "classifier_dropout")
                                       if getattr(model_args, k) is not None) or None,
        "early stopping": args.early_stopping_patience and
        f"patience {args.early_stopping_patience} on {args.metric_for_best_model}",
        "BatchNorm": (args.freeze_bn_stats or args.freeze_bn_affine) and
        f"stats frozen={args.freeze_bn_stats}, affine frozen={args.freeze_bn_affine}",
        "PEFT": model_args.peft and describe(model_args),
        "distillation": model_args.teacher_model_name_or_path and
        f"teacher `{os.path.basename(os.path.normpath(model_args.teacher_model_name_or_path))}`, "
        f"alpha {args.distill_alpha}, temperature {args.distill_temperature}",
        "pruning": args.prune_sparsity and f"sparsity {args.prune_sparsity} ({args.prune_structure or 'unstructured'})",
    }
    shown = [f"{name} {value}" for name, value in found.items() if value]
    return "regularization: " + ("; ".join(shown) if shown else "none")


def precision_line(trainer, args):
    accelerator = getattr(trainer, "accelerator", None)
    mixed = getattr(accelerator, "mixed_precision", None) or ("fp16" if args.fp16 else "bf16" if args.bf16 else "no")
    return "precision: " + ("fp32" if str(mixed) == "no" else f"{mixed} mixed precision")


def strategy_lines(trainer, model_args, args):
    clip = f"norm {args.max_grad_norm} (p={args.max_grad_norm_type})" if args.max_grad_norm else "norm off"
    return [
        optimizer_line(trainer, args), schedule_line(args), batch_line(args), length_line(trainer, args),
        f"gradient clipping: {clip}, by value {args.max_grad_value or 'off'}",
        regularization_lines(model_args, args), precision_line(trainer, args), f"seed: {args.seed}",
    ]


def data_parallel_size(args):
    config = deepspeed_config(args)
    return max(1, args.world_size // pipeline_stages(args, config or {}))


def distribution_line(args):
    config = deepspeed_config(args)
    if args.engine == "pipeline":
        stages = pipeline_stages(args, config or {})
        return (f"DeepSpeed pipeline parallelism: {stages} stages x "
                f"{plural(data_parallel_size(args), 'data-parallel replica')}, ZeRO-{zero_stage(config or {})}")
    if config is not None:
        zero = config.get("zero_optimization") or {}
        offload = [f"{k.split('_')[1]} to {(zero.get(k) or {}).get('device')}" for k in
                   ("offload_optimizer", "offload_param") if (zero.get(k) or {}).get("device") not in (None, "none")]
        return f"DeepSpeed ZeRO-{zero_stage(config)}" + (f", offload {', '.join(offload)}" if offload else "")
    if uses_fsdp(args):
        version = os.environ.get("FSDP_VERSION", "1")  # what accelerate launch exports from the config
        recipe = " ".join(str(getattr(o, "value", o)) for o in args.fsdp or [])
        return f"FSDP{version} (fully sharded data parallel)" + (f", recipe fsdp: {recipe}" if recipe else "")
    if args.world_size > 1:
        hook = f", gradient compression {args.ddp_comm_hook}" if args.ddp_comm_hook else ""
        return f"DDP (DistributedDataParallel){hook}"
    return "none (one process)"


def backend():
    import torch.distributed as dist

    return dist.get_backend() if dist.is_available() and dist.is_initialized() else None


def parallel_lines(trainer, args):
    where = f"{plural(args.world_size, 'process')} on {args.device.type}"
    comm = backend()
    return [f"engine: `{args.engine}` ({ENGINES.get(args.engine, args.engine)})",
            where + (f", backend {comm}" if comm else ""), f"distribution: {distribution_line(args)}"]


# ---- how to use it ----


def model_reference(args):
    """What the snippet loads: the Hub repo when the run pushes there, else the output folder."""
    if args.push_to_hub and args.hub_model_id:
        return args.hub_model_id
    return os.path.abspath(args.output_dir)


def base_reference(model_args):
    """(import line, expression) naming the base checkpoint in a snippet."""
    name = model_args.model_name_or_path
    if is_asset(name):
        return "from hftune.assets import resolve_model\n", f'resolve_model("{name}")'
    return "", f'"{name}"'


def pipeline_snippet(task, ref, chat=False):
    ask = '\npipe([{"role": "user", "content": "Hello!"}], max_new_tokens=64)  # the chat template is applied' if chat \
        else ""
    return f'```python\nfrom transformers import pipeline\n\npipe = pipeline("{task}", model="{ref}"){ask}\n```'


def run_snippet(bundle, ref):
    """The saved model in its transformers pipeline, or the task's own loader where transformers has none."""
    if bundle.usage:
        return f"```python\n{bundle.usage.format(ref=ref)}\n```"
    return pipeline_snippet(bundle.pipeline_task, ref, bundle.answers)


def adapter_snippet(bundle, model_args, ref):
    """Loading the adapter as AdapterSaver left it: the base rebuilt with this run's labels, then the adapter."""
    base_class = type(bundle.adapter.base_model).__name__
    imports, base = base_reference(model_args)
    return (f"```python\nfrom peft import PeftModel\nfrom transformers import AutoConfig, {base_class}\n{imports}\n"
            f'config = AutoConfig.from_pretrained("{ref}", subfolder="{BASE_CONFIG_DIR}")  # this run\'s labels\n'
            f"base = {base_class}.from_pretrained({base}, config=config, ignore_mismatched_sizes=True)\n"
            f'model = PeftModel.from_pretrained(base, "{ref}")\n```')


def usage_section(bundle, model_args, args):
    ref = model_reference(args)
    # a merged push (hftune/results/hub.py's hub_push_merged) puts a plain checkpoint in the repo the card describes
    merged_on_hub = args.push_to_hub and args.hub_push_merged and ref == args.hub_model_id
    if bundle.adapter is None or merged_on_hub:
        return f"## How to use\n\n{run_snippet(bundle, ref)}"
    text = (f"## How to use\n\nThis folder holds a PEFT adapter ({describe(model_args)}):\n\n"
            + adapter_snippet(bundle, model_args, ref))
    if model_args.merge_adapter:
        text += ("\n\nBase and adapter merged into a plain checkpoint (on disk where the run wrote it):\n\n"
                 + run_snippet(bundle, os.path.join(os.path.abspath(args.output_dir), MERGED_DIR)))
    return text


def framework_versions(args):
    lines = []
    for name in FRAMEWORKS + (("deepspeed",) if deepspeed_config(args) is not None else ()):
        try:
            lines.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    return lines


def scrub_secrets(text, args):
    """No token may reach the card, whatever a path or a setting happens to contain."""
    for secret in (args.hub_token, os.environ.get("HF_TOKEN"), os.environ.get("HUGGING_FACE_HUB_TOKEN")):
        if secret:
            text = text.replace(secret, "***")
    return text
