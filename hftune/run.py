"""Entry point: `accelerate launch hftune/run.py --config recipe.yaml`, `python -m hftune`, `hftune`.

parse -> set up -> train -> finish. With no arguments it runs the shipped default recipe:
all-MiniLM-L6-v2 fine-tuned on the tweet-sentiment corpus, fully offline.
"""

import logging
import os
import sys
from contextlib import nullcontext

if __package__ in (None, ""):  # `accelerate launch hftune/run.py` runs this file as a script
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import datasets
import transformers
from transformers import set_seed
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.trainer_utils import get_last_checkpoint

from hftune.adapters import apply_peft
from hftune.assets import is_asset
from hftune.config import parse_config, save_resolved_config
from hftune.data import check_streaming, is_stream, load_raw_datasets
from hftune.distillation import load_teacher
from hftune.engines import build_engine
from hftune.errors import HftuneError
from hftune.launch import check_world_size
from hftune.pruning import sparsity_results
from hftune.quantization import quantize_and_compare
from hftune.tasks import get_task
from hftune.throughput import throughput_results

logger = logging.getLogger("hftune")


def setup_logging(training_args):
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    level = training_args.get_process_log_level()  # replicas log less than the main process
    # hftune's own lines (the resolved strategy, ...) show on the logging process unless log_level says otherwise.
    logger.setLevel(logging.INFO if training_args.log_level == "passive" and training_args.should_log else level)
    transformers.utils.logging.set_verbosity(level)
    datasets.utils.logging.set_verbosity(level)


def check_output_dir(training_args, checkpoint):
    """Never write into someone's results by accident."""
    out = training_args.output_dir
    if not (os.path.isdir(out) and os.listdir(out)):
        return
    if training_args.overwrite_output_dir or checkpoint is not None:
        return
    raise HftuneError(
        f"output_dir '{out}' is not empty; choose another output_dir, set overwrite_output_dir: true, "
        "or resume_from_checkpoint: true."
    )


def resolve_checkpoint(training_args):
    """`resume_from_checkpoint: true` (or `auto`) means the latest checkpoint in output_dir."""
    resume = training_args.resume_from_checkpoint
    if resume is None or str(resume).lower() in ("false", "none", ""):
        return None
    if str(resume).lower() in ("true", "auto"):
        last = get_last_checkpoint(training_args.output_dir) if os.path.isdir(training_args.output_dir) else None
        if last is None:
            raise HftuneError(
                f"resume_from_checkpoint: {resume} but output_dir '{training_args.output_dir}' holds no checkpoint-*; "
                "drop resume_from_checkpoint to start fresh."
            )
        return last
    if not os.path.isdir(resume):
        raise HftuneError(f"resume_from_checkpoint '{resume}' does not exist; pass a checkpoint-* folder or true.")
    return resume


def check_inputs(model_args, data_args, training_args):
    if not model_args.model_name_or_path:
        raise HftuneError("model_name_or_path is not set; give a Hub id, a local checkpoint folder or an asset:NAME.")
    if is_asset(model_args.model_name_or_path) and model_args.model_revision != "main":
        raise HftuneError("model_revision does not apply to an asset: model; drop it.")
    if data_args.test_file and not training_args.do_predict:
        raise HftuneError("test_file is set but do_predict is false, so it would be ignored; set do_predict: true.")
    check_streaming(data_args, training_args)


def setup(model_args, data_args, training_args):
    setup_logging(training_args)
    check_world_size(training_args)
    check_inputs(model_args, data_args, training_args)
    task = get_task(data_args.task)
    checkpoint = resolve_checkpoint(training_args)
    check_output_dir(training_args, checkpoint)
    set_seed(training_args.seed)  # before the model is built: a new head's init depends on it
    with training_args.main_process_first(desc="loading data"):
        raw = load_raw_datasets(data_args, training_args.seed, model_args.cache_dir, keep_test=training_args.do_predict)
    # ZeRO-3 partitions the model while it loads: a collective step every process must join at once.
    together = is_deepspeed_zero3_enabled()
    with nullcontext() if together else training_args.main_process_first(desc="loading model, preprocessing"):
        try:
            bundle = task.build(model_args, data_args, raw)
        except OSError as err:  # what from_pretrained raises for a missing folder or Hub id
            raise HftuneError(
                f"could not load model_name_or_path '{model_args.model_name_or_path}': {str(err).splitlines()[0]}"
            ) from None
        bundle.model, bundle.adapter = apply_peft(bundle.model, model_args, data_args, training_args)
        teacher = load_teacher(model_args, data_args.task, bundle.model, bundle.processor)
    if training_args.do_predict and bundle.test_dataset is None:
        raise HftuneError("do_predict needs a test split: set test_file, or a dataset_name that has one.")
    save_resolved_config(model_args, data_args, training_args)
    return build_engine(bundle, training_args, checkpoint, teacher), bundle, checkpoint


def train(trainer, bundle, training_args, checkpoint):
    metrics = {}
    if training_args.do_train:
        result = trainer.train(resume_from_checkpoint=checkpoint)
        trainer.save_model()
        if bundle.adapter is not None:  # PEFT: the base config beside the adapter, and output_dir/merged if asked
            bundle.adapter.save(trainer, bundle.processor)
        metrics = {**result.metrics, **sparsity_results(trainer, training_args.output_dir),
                   **throughput_results(trainer)}
        if not is_stream(bundle.train_dataset):  # a stream has no length
            metrics["train_samples"] = len(bundle.train_dataset)
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()
    if training_args.do_eval and bundle.eval_dataset is not None:
        metrics.update(evaluate(trainer, bundle.eval_dataset, "eval"))
    if training_args.do_predict:
        metrics.update(evaluate(trainer, bundle.test_dataset, "test"))
    if training_args.quantize and trainer.is_world_process_zero():
        results = quantize_and_compare(trainer.model, bundle, training_args)
        trainer.log_metrics("quantize", results)
        trainer.save_metrics("quantize", results)
        metrics.update(results)
    return metrics


def evaluate(trainer, dataset, split):
    """Evaluate on a labelled split; its metrics are logged and saved as <split>_results.json."""
    metrics = {**trainer.evaluate(dataset, metric_key_prefix=split), f"{split}_samples": len(dataset)}
    trainer.log_metrics(split, metrics)
    trainer.save_metrics(split, metrics)
    return metrics


def finish(trainer, bundle, training_args, metrics):
    if not trainer.is_world_process_zero():
        return
    out = os.path.abspath(training_args.output_dir)
    value = metrics.get(bundle.main_metric)
    lines = ["", "hftune: done."]
    if value is not None:
        lines.append(f"  {bundle.main_metric} = {value:.4f} on {metrics.get('eval_samples')} validation examples")
    if training_args.do_train and bundle.adapter is not None:
        lines += bundle.adapter.summary(out, bundle.pipeline_task)
    elif training_args.do_train:
        lines.append(f"  model saved to {out}")
        lines.append(f'  load it: transformers.pipeline("{bundle.pipeline_task}", model="{out}")')
    print("\n".join(lines))


def leave_process_group():
    """End a multi-process run cleanly (torch warns when a process group is never destroyed)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["plan"]:  # `hftune plan --config recipe.yaml [--config_file accelerate_configs/X.yaml]`
        from hftune.plan import main as plan

        return plan(argv[1:])
    try:
        model_args, data_args, training_args = parse_config(argv)
        trainer, bundle, checkpoint = setup(model_args, data_args, training_args)
        metrics = train(trainer, bundle, training_args, checkpoint)
        finish(trainer, bundle, training_args, metrics)
        leave_process_group()
    except HftuneError as err:
        print(f"hftune: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
