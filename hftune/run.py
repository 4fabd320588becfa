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

from hftune.compression.adapters import apply_peft
from hftune.assets import is_asset
from hftune.results.card import write_report
from hftune.training.checkpoints import check_compatible, holds_only_an_interrupted_start, run_record
from hftune.training.resume import check_shapes, resolve_checkpoint, resumes_latest
from hftune.config import parse_config, resolved_config, save_resolved_config
from hftune.data import check_streaming, is_stream, load_raw_datasets
from hftune.compression.distillation import load_teacher
from hftune.engines import build_engine
from hftune.errors import HftuneError
from hftune.launch.gpu_defaults import log_bf16_default, warn_slow_cpu_bf16
from hftune.launch.network import lost_peer_line, pin_socket_interface
from hftune.launch.nodes import check_output_layout, preprocess_once
from hftune.launch.threads import use_all_cores
from hftune.results.hub import push_results
from hftune.launch.checks import check_same_config, check_world_size
from hftune.outputs import CONFIG_FILE, EVALUATE_CONFIG_FILE, check_output_location
from hftune.results.predict import (
    attach_inputs, check_fine_tuned, check_predict_args, check_splits, evaluate, predict, split_dataset, split_prefix,
    wanted_splits,
)
from hftune.compression.pruning import sparsity_results
from hftune.compression.quantization import quantize_and_compare
from hftune.tasks import get_task
from hftune.tasks.loading import check_folder
from hftune.results.throughput import throughput_results

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
    """Never write into someone's results by accident. Without training only results files are
    written (no model, no checkpoint), so output_dir may hold a run already, e.g. the evaluated model."""
    out = training_args.output_dir
    if not (os.path.isdir(out) and os.listdir(out)) or not training_args.do_train:
        return
    if training_args.overwrite_output_dir or checkpoint is not None:
        return
    if resumes_latest(training_args) and holds_only_an_interrupted_start(out):
        return  # rerunning the command of a run killed before its first complete checkpoint
    raise HftuneError(
        f"output_dir '{out}' is not empty; choose another output_dir, set overwrite_output_dir: true, "
        "or resume_from_checkpoint: true."
    )


def check_model_source(model_args):
    if model_args.model_type:  # trained from scratch: no checkpoint to look at
        return
    if not model_args.model_name_or_path:
        raise HftuneError("model_name_or_path is not set; give a Hub id, a local checkpoint folder or an asset:NAME "
                          "(or model_type + tokenizer_name to train from scratch).")
    name = str(model_args.model_name_or_path)
    check_folder(name, name, "model_name_or_path")  # before the data loads, not only when the model does
    if is_asset(model_args.model_name_or_path) and model_args.model_revision != "main":
        raise HftuneError("model_revision does not apply to an asset: model; drop it.")


def check_inputs(model_args, data_args, training_args):
    check_output_location(training_args.output_dir)
    check_model_source(model_args)
    if data_args.test_file and "test" not in wanted_splits(training_args):
        raise HftuneError("test_file is set but do_predict is false (and eval_split is not test), so it would be ignored; "
                          "set do_predict: true.")
    check_predict_args(data_args, training_args)
    check_streaming(data_args, training_args)


def setup(model_args, data_args, training_args):
    setup_logging(training_args)
    logger.info(f"config: {training_args.config_base}")
    threads = use_all_cores()
    if threads:
        logger.info(threads)
    if "bf16" in training_args.machine_defaults:
        log_bf16_default()
    warn_slow_cpu_bf16(training_args)
    check_world_size(training_args)
    check_same_config(resolved_config(model_args, data_args, training_args), training_args.world_size)
    check_output_layout(training_args)
    check_inputs(model_args, data_args, training_args)
    task = get_task(data_args.task)
    checkpoint = resolve_checkpoint(training_args)
    if checkpoint is not None:
        check_compatible(checkpoint, resolved_config(model_args, data_args, training_args), run_record(training_args))
    check_output_dir(training_args, checkpoint)
    set_seed(training_args.seed)  # before the model is built: a new head's init depends on it
    # The run's main process first where the nodes share the datasets cache, else each node's.
    once = preprocess_once(training_args, model_args.cache_dir)
    with training_args.main_process_first(local=not once, desc="loading data"):
        raw = load_raw_datasets(data_args, training_args.seed, model_args.cache_dir,
                                keep_test="test" in wanted_splits(training_args))
    check_splits(training_args, raw)
    # ZeRO-3 partitions the model while it loads: a collective step every process must join at once.
    together = is_deepspeed_zero3_enabled()
    with nullcontext() if together else training_args.main_process_first(local=not once,
                                                                          desc="loading model, preprocessing"):
        try:
            bundle = task.build(model_args, data_args, raw)
        except OSError as err:  # what from_pretrained raises for a missing folder or Hub id
            raise HftuneError(
                f"could not load model_name_or_path '{model_args.model_name_or_path}': {str(err).splitlines()[0]}"
            ) from None
        bundle.model, bundle.adapter = apply_peft(bundle.model, model_args, data_args, training_args)
        teacher = load_teacher(model_args, data_args.task, bundle.model, bundle.processor)
    if checkpoint is not None:
        check_shapes(checkpoint, bundle.model)
    if not training_args.do_train:  # evaluating a saved model: its head must already know the data's classes
        check_fine_tuned(model_args, bundle)
    problem = getattr(bundle.model.config, "problem_type", None)
    if training_args.label_smoothing_factor and problem in ("regression", "multi_label_classification"):
        raise HftuneError(f"label_smoothing_factor smooths one class per row; the labels here make a {problem} "
                          "problem: drop label_smoothing_factor.")
    attach_inputs(bundle, raw, data_args, training_args)
    engine = build_engine(bundle, training_args, checkpoint, teacher)  # its checks too run before the first write
    # Without training, output_dir may be the saved model's own folder: keep its training config.
    save_resolved_config(model_args, data_args, training_args,
                         CONFIG_FILE if training_args.do_train else EVALUATE_CONFIG_FILE)
    return engine, bundle, checkpoint


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
        # rows dropped as unusable (empty text, unreadable image): train_skipped_rows, validation_skipped_rows
        metrics.update({f"{split}_skipped_rows": n for split, n in (bundle.skipped_rows or {}).items() if n})
        metrics.update(bundle.data_counts or {})
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()
    eval_split, predict_split = training_args.eval_split, training_args.predict_split
    # do_predict reports the metrics of a labelled split itself: one pass when both name the same split
    if training_args.do_eval and split_dataset(bundle, eval_split) is not None and not (
            training_args.do_predict and predict_split == eval_split):
        metrics.update(evaluate(trainer, split_dataset(bundle, eval_split), eval_split, bundle))
    if training_args.do_predict:
        metrics.update(predict(trainer, bundle, training_args))
    if training_args.quantize and trainer.is_world_process_zero():
        results = quantize_and_compare(trainer.model, bundle, training_args)
        trainer.log_metrics("quantize", results)
        trainer.save_metrics("quantize", results)
        metrics.update(results)
    return metrics


def finish(trainer, bundle, training_args, metrics):
    if not trainer.is_world_process_zero():
        return
    out = os.path.abspath(training_args.output_dir)
    split = training_args.eval_split
    prefix = split_prefix(split)
    key = bundle.main_metric.replace("eval", prefix, 1)  # eval_accuracy -> test_accuracy for eval_split: test
    value = metrics.get(key)
    lines = ["", "hftune: done."]
    if value is not None:
        lines.append(f"  {key} = {value:.4f} on {metrics.get(f'{prefix}_samples')} {split} examples")
    if training_args.do_predict:
        lines.append(f"  predictions: {out}/predictions_{training_args.predict_split}.jsonl")
    if training_args.do_train and bundle.adapter is not None:
        lines += bundle.adapter.summary(out, bundle.pipeline_task, bundle.usage)
    elif training_args.do_train:
        lines.append(f"  model saved to {out}")
        lines.append(f"  load it: {bundle.usage.format(ref=out).splitlines()[-1]}" if bundle.usage else
                     f'  load it: transformers.pipeline("{bundle.pipeline_task}", model="{out}")')
    print("\n".join(lines))


def leave_process_group():
    """End a multi-process run cleanly (torch warns when a process group is never destroyed)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["plan"]:  # `hftune plan --config recipe.yaml [--config_file accelerate_configs/X.yaml]`
        from hftune.launch.plan import main as plan

        return plan(argv[1:])
    if argv[:1] == ["launch"]:  # `hftune launch [accelerate launch options] [hftune options]`
        from hftune.launch.command import main as launch

        return launch(argv[1:])
    if argv[:1] == ["inspect"]:  # `hftune inspect --config recipe.yaml`: the sft label audit, no model weights
        from hftune.tasks.chat_audit import main as inspect

        try:
            return inspect(argv[1:])
        except HftuneError as err:
            print(f"hftune: error: {err}", file=sys.stderr)
            sys.exit(2)
    if argv[:1] == ["evaluate"]:  # `hftune evaluate --config recipe.yaml --model_name_or_path DIR [--eval_split S]`
        argv = ["--do_train=false", "--do_eval=true", *argv[1:]]  # the user's own flags still win
    try:
        pin_socket_interface()  # before anything starts the process group
        model_args, data_args, training_args = parse_config(argv)
        trainer, bundle, checkpoint = setup(model_args, data_args, training_args)
        metrics = train(trainer, bundle, training_args, checkpoint)
        if training_args.do_train:  # an evaluation alone leaves the card of the run that trained the model
            write_report(trainer, bundle, model_args, data_args, training_args, metrics)  # model card + curves
        finish(trainer, bundle, training_args, metrics)
        push_results(trainer, bundle, training_args)  # last: a refused push leaves the trained model on disk
        leave_process_group()
    except HftuneError as err:
        print(f"hftune: error: {err}", file=sys.stderr)
        sys.exit(2)
    except RuntimeError as err:  # (torch.distributed's errors are RuntimeErrors)
        line = lost_peer_line(err)
        if line is None:
            raise
        print(f"hftune: error: {line}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
