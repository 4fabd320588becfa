"""Evaluate and predict with a trained (or saved) model on any split: train, validation or test.

`do_eval` evaluates `eval_split` (metrics in <split>_results.json); `do_predict` writes
`predictions_<split>.jsonl` for `predict_split`, one row per example in the split's order:
- classification: the predicted label, its softmax probability, every class's probability and,
  where the split has labels, the true label (a split without a label column is predicted too);
  regression: the predicted `score` (and `true_score`); multi-label: the predicted `labels` (sigmoid
  probability > 0.5), every label's `probabilities` (and `true_labels`), as transformers' pipeline
  scores them (config.problem_type);
- token classification: the words, the tag predicted for each (at its first sub-token; None where
  truncation cut the word off) and, where the split has labels, the true tags;
- multiple choice: the chosen ending's index (`choice`), its softmax probability over the row's endings,
  every ending's, and, where the split has labels, the right ending's index (`true_choice`);
- causal LM: the greedy continuation (`max_new_tokens`) of each example's text;
- sft: each row's prompt (the ids training used before its last trained turn), the greedy answer,
  the reference and whether the answer stopped; evaluation adds the answers' metrics
  (hftune.results.generation).

Example:
    $ hftune evaluate --config recipe.yaml --model_name_or_path outputs/run --eval_split test --do_predict true
    >>> rows = [json.loads(line) for line in open("outputs/run/predictions_test.jsonl")]  # doctest: +SKIP
    >>> rows[0]["label"], rows[0]["score"]  # doctest: +SKIP
    ('positive', 0.91)
"""

import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import AutoConfig, Trainer

from hftune.data import is_stream, limit_splits
from hftune.errors import HftuneError
from hftune.launch.checks import shards_parameters
from hftune.results.generation import DEFAULT_NEW_TOKENS, generation_metrics, generation_rows
from hftune.tasks import tasks_where, traits
from hftune.tasks.common import pretrained_source

logger = logging.getLogger("hftune")


@dataclass
class TrainingFields:
    """Which splits the end of a run evaluates and predicts."""

    eval_split: str = field(
        default="validation",
        metadata={"help": "Split do_eval evaluates at the end: validation, test or train (evaluation during training "
                          "uses validation); metrics in <split>_results.json."},
    )
    predict_split: str = field(
        default="test",
        metadata={"help": "Split do_predict writes predictions_<split>.jsonl for: test, validation or train."},
    )
    max_new_tokens: int = field(
        default=None, metadata={"help": "causal-lm do_predict, sft do_eval / do_predict: tokens generated (greedily) "
                                        "after each prompt (default 20)."}
    )


SPLITS = ("train", "validation", "test")
CLASSIFIERS = ("text-classification", "image-classification")


def split_prefix(split):
    """Metric prefix and results-file name of a split: `eval` for validation (as during training),
    `train_eval` for train (training's own metrics keep `train`), else the split's name."""
    return {"validation": "eval", "train": "train_eval"}.get(split, split)


def wanted_splits(args):
    """The splits do_eval / do_predict read beyond train and validation."""
    return {split for split, on in ((args.eval_split, args.do_eval), (args.predict_split, args.do_predict)) if on}


def check_predict_args(data_args, args):
    """Config-only checks of eval_split, predict_split and max_new_tokens."""
    for key, split in (("eval_split", args.eval_split), ("predict_split", args.predict_split)):
        if split not in SPLITS:
            raise HftuneError(f"{key} '{split}' is not a split hftune reads; choose one of {list(SPLITS)}.")
    generates = traits(data_args.task).auto_model == "AutoModelForCausalLM"  # a masked LM's head generates nothing
    answers = traits(data_args.task).inputs == "chat"
    if args.max_new_tokens is not None and not ((args.do_predict and generates) or (args.do_eval and answers)):
        causal = ", ".join(tasks_where(auto_model="AutoModelForCausalLM"))
        raise HftuneError(f"max_new_tokens applies to do_predict with task {causal}, "
                          f"or do_eval with {', '.join(tasks_where(inputs='chat'))}, only; drop it.")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise HftuneError(f"max_new_tokens must be >= 1, got {args.max_new_tokens}.")
    if args.do_predict and args.engine == "pipeline":
        raise HftuneError("do_predict does not run on engine: pipeline; train, then predict with the saved model "
                          "(hftune evaluate --do_predict true, engine: trainer).")
    if args.do_predict and generates and shards_parameters(args):
        raise HftuneError("do_predict generates on the main process, which needs whole parameters (not FSDP or "
                          "ZeRO-3); predict with the saved model in a DDP or single-process run (hftune evaluate --do_predict true).")


def check_splits(args, raw):
    """Refuse, before any model is loaded, an eval_split / predict_split the data does not have."""
    for key, split, used in (("eval_split", args.eval_split, args.do_eval),
                             ("predict_split", args.predict_split, args.do_predict)):
        if used and split not in raw and (key, split) == ("eval_split", "validation") and args.do_train:
            continue  # the final evaluation is skipped, as evaluation during training would be
        if used and split not in raw:
            hint = ", or set test_file (or a dataset_name with a test split)" if split == "test" else ""
            raise HftuneError(f"{key} '{split}' is not in the data (splits: {', '.join(raw)}); choose one of them{hint}.")
        if used and is_stream(raw[split]):
            raise HftuneError(f"{key} '{split}' is a stream (streaming: true); evaluate or predict validation or test.")


def split_dataset(bundle, split):
    return {"train": bundle.train_dataset, "validation": bundle.eval_dataset, "test": bundle.test_dataset}[split]


def has_labels(dataset):
    return "labels" in dataset.column_names or "start_positions" in dataset.column_names  # (QA's span labels)


def attach_inputs(bundle, raw, data_args, args):
    """The predicted split's texts (prompts of a causal LM; word lists to tag), rows limited as the task
    limited them."""
    if args.do_predict and traits(data_args.task).inputs in ("text", "words"):
        split = args.predict_split
        bundle.predict_inputs = limit_splits({split: raw[split]}, data_args)[split][data_args.text_column]


def check_fine_tuned(model_args, bundle):
    """Without training, a classifier must already predict the data's classes: a checkpoint with other
    (or no fine-tuned) labels would get a new, random head and report chance-level metrics; one trained
    for another problem type (regression, multi-label) would be scored with the wrong activation."""
    if bundle.pipeline_task not in CLASSIFIERS:
        return
    path, common = pretrained_source(model_args)
    config = AutoConfig.from_pretrained(path, **common)
    kinds = problem_type(config), problem_type(bundle.model.config)
    if kinds[0] != kinds[1]:
        raise HftuneError(f"'{model_args.model_name_or_path}' has a head for {KINDS[kinds[0]]}, the data asks for "
                          f"{KINDS[kinds[1]]} (from the label column's values and do_regression); evaluate a "
                          "checkpoint fine-tuned for it, or train it (do_train: true).")
    saved = {int(i): name for i, name in config.id2label.items()}
    wanted = {int(i): name for i, name in bundle.model.config.id2label.items()}
    if saved != wanted:
        raise HftuneError(
            f"'{model_args.model_name_or_path}' predicts the labels {list(saved.values())}, the data has "
            f"{list(wanted.values())}; evaluate a checkpoint fine-tuned on these classes, or train it (do_train: true)."
        )


KINDS = {"single_label_classification": "single-label classes (or none fine-tuned)", "regression": "regression",
         "multi_label_classification": "multi-label classification"}


def problem_type(config):
    """A classifier config's problem_type, or the one transformers infers where none is set (its models'
    forward: regression for a single output, else single-label, as integer labels make it)."""
    kind = getattr(config, "problem_type", None)
    return kind or ("regression" if config.num_labels == 1 else "single_label_classification")


def evaluate(trainer, dataset, split, bundle=None, answers=None):
    """Metrics of a labelled split, logged and saved as <prefix>_results.json; a chat model's
    answers are generated and scored too (or `answers`, the rows already generated)."""
    if not has_labels(dataset):
        raise HftuneError(f"eval_split '{split}' has no labels; evaluate a labelled split, or use do_predict alone.")
    prefix = split_prefix(split)
    # examples, not features: a question-answering split has several features per long context
    examples = len(bundle.span_answers.questions[split]) if bundle is not None and bundle.span_answers else len(dataset)
    metrics = {**trainer.evaluate(dataset, metric_key_prefix=prefix), f"{prefix}_samples": examples}
    if bundle is not None and bundle.answers and trainer.is_world_process_zero():
        rows = answers if answers is not None else _answer(trainer, bundle, dataset)
        metrics.update(generation_metrics(rows, prefix) if rows else {})
    _report(trainer, prefix, metrics)
    return metrics


def _answer(trainer, bundle, dataset):
    """The chat model's answers to the split's prompts (main process; needs whole parameters)."""
    if shards_parameters(trainer.args):
        logger.info("answers are not generated under FSDP / ZeRO-3 (sharded parameters); evaluate the saved model "
                    "(hftune evaluate) for exact_match and the other answer metrics.")
        return []
    new_tokens = trainer.args.max_new_tokens or DEFAULT_NEW_TOKENS
    model = trainer.accelerator.unwrap_model(trainer.model)  # the accelerate engine's model may be DDP-wrapped
    return generation_rows(model, bundle.processor, dataset, new_tokens, trainer.args.per_device_eval_batch_size)


def predict(trainer, bundle, args):
    """Write predictions_<predict_split>.jsonl; returns the split's metrics when it has labels."""
    split = args.predict_split
    dataset = split_dataset(bundle, split)
    if bundle.pipeline_task in CLASSIFIERS:
        rows, metrics = _classify(trainer, bundle, dataset, split)
    elif bundle.pipeline_task == "token-classification":
        rows, metrics = _tag(trainer, bundle, dataset, split)
    elif bundle.pipeline_task == "multiple-choice":
        rows, metrics = _choose(trainer, bundle, dataset, split)
    elif bundle.span_answers is not None:
        rows, metrics = _answer_spans(trainer, bundle, dataset, split)
    elif bundle.answers:
        rows = _answer(trainer, bundle, dataset) if trainer.is_world_process_zero() else []
        metrics = evaluate(trainer, dataset, split, bundle, rows)
    else:
        metrics = evaluate(trainer, dataset, split) if has_labels(dataset) else {}
        rows = _generate(trainer, bundle, args.max_new_tokens or DEFAULT_NEW_TOKENS) if trainer.is_world_process_zero() else []
    if trainer.is_world_process_zero():
        path = os.path.join(args.output_dir, f"predictions_{split}.jsonl")
        os.makedirs(args.output_dir, exist_ok=True)
        with open(path, "w") as handle:
            handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        logger.info(f"predictions for {len(rows)} {split} examples written to {path}")
    return metrics


def _report_split(trainer, prefix, metrics, samples):
    """A predicted split's metrics (none for a split without labels) with its example count, logged and saved."""
    if metrics:
        metrics = {**metrics, f"{prefix}_samples": samples}
        _report(trainer, prefix, metrics)
    return metrics


def _report(trainer, prefix, metrics):
    trainer.log_metrics(prefix, metrics)
    trainer.save_metrics(prefix, metrics)


def class_logits(trainer, bundle, dataset, prefix):
    """(logits, label ids or None, metrics) from Trainer.predict, which gathers every process's rows
    in dataset order. Other engines' evaluate() needs labels: a plain Trainer predicts for them."""
    if not isinstance(trainer, Trainer):
        if getattr(trainer, "fsdp", None) or not hasattr(trainer, "accelerator"):
            raise HftuneError(f"do_predict runs on engine: trainer or accelerate without FSDP, not engine: "
                              f"{trainer.args.engine}; predict with the saved model (hftune evaluate --do_predict true).")
        metrics = trainer.evaluate(dataset, metric_key_prefix=prefix) if has_labels(dataset) else {}
        # eval_dataset: Trainer refuses an eval_strategy without one
        trainer = Trainer(model=bundle.model, args=trainer.args, data_collator=bundle.data_collator, eval_dataset=dataset)
        with dataset_order(trainer.args):
            output = trainer.predict(dataset, metric_key_prefix=prefix)
        return output.predictions, output.label_ids, metrics
    with dataset_order(trainer.args):
        output = trainer.predict(dataset, metric_key_prefix=prefix)
    return output.predictions, output.label_ids, output.metrics if has_labels(dataset) else {}


@contextmanager
def dataset_order(args):
    """Trainer evaluates in batches of similar length under group_by_length, and returns the
    predictions in that order: predict in the data set's own order instead."""
    strategy = args.train_sampling_strategy
    args.train_sampling_strategy = "sequential"
    try:
        yield
    finally:
        args.train_sampling_strategy = strategy


def _classify(trainer, bundle, dataset, split):
    prefix = split_prefix(split)
    logits, labels, metrics = class_logits(trainer, bundle, dataset, prefix)
    metrics = _report_split(trainer, prefix, metrics, len(dataset))
    config = bundle.model.config
    describe = {"regression": _score_row, "multi_label_classification": _labels_row}.get(
        problem_type(config), _class_row)
    logits = np.asarray(logits, dtype=np.float64)
    inputs = getattr(bundle, "predict_inputs", None)
    rows = []
    for i, row_logits in enumerate(logits):
        row = {"index": i} if inputs is None else {"index": i, "text": inputs[i]}
        row.update(describe(row_logits, None if labels is None else labels[i], config.id2label))
        rows.append(row)
    return rows, metrics


def _tag(trainer, bundle, dataset, split):
    """One row per example: its words, the tag predicted at each word's first sub-token (None for words
    truncation cut off) and, where the split has labels, the true tags."""
    prefix = split_prefix(split)
    logits, labels, metrics = class_logits(trainer, bundle, dataset, prefix)
    metrics = _report_split(trainer, prefix, metrics, len(dataset))
    names = bundle.model.config.id2label
    rows = []
    for i, words in enumerate(bundle.predict_inputs):
        length = len(dataset[i]["input_ids"])  # the encoding training used (truncated alike)
        word_ids = bundle.processor(words, is_split_into_words=True, truncation=True, max_length=length).word_ids()
        first = {}
        for position, word in enumerate(word_ids):
            first.setdefault(word, position)
        row = {"index": i, "tokens": words,
               "tags": [names[int(np.argmax(logits[i][first[w]]))] if w in first else None for w in range(len(words))]}
        if labels is not None:
            row["true_tags"] = [names[int(labels[i][first[w]])] if w in first else None for w in range(len(words))]
        rows.append(row)
    return rows, metrics


def _answer_spans(trainer, bundle, dataset, split):
    """One row per question (not per feature of a long context): its question, the predicted answer text
    and, where the split has answers, the reference answers."""
    prefix = split_prefix(split)
    logits, _, metrics = class_logits(trainer, bundle, dataset, prefix)
    spans = bundle.span_answers
    questions, references = spans.questions[split], spans.splits[split][2]
    metrics = _report_split(trainer, prefix, metrics, len(questions))
    rows = [{"index": i, "question": q, "answer": a} for i, (q, a) in enumerate(zip(questions, spans.texts(split, logits)))]
    for row, answers in zip(rows, references or ()):
        row["true_answers"] = answers
    return rows, metrics


def _choose(trainer, bundle, dataset, split):
    """One row per example: the ending with the highest score, the softmax over its endings, the true index."""
    prefix = split_prefix(split)
    logits, labels, metrics = class_logits(trainer, bundle, dataset, prefix)
    metrics = _report_split(trainer, prefix, metrics, len(dataset))
    rows = []
    for i, probs in enumerate(softmax(np.asarray(logits, dtype=np.float64))):
        best = int(probs.argmax())
        rows.append({"index": i, "choice": best, "score": float(probs[best]), "probabilities": probs.tolist()})
        if labels is not None:
            rows[-1]["true_choice"] = int(labels[i])
    return rows, metrics


def _class_row(logits, label, names):
    """The softmax's best class, its probability and every class's; the true class where known."""
    probs = softmax(logits)
    best = int(probs.argmax())
    row = dict(label=names[best], score=float(probs[best]),
               probabilities={names[k]: float(p) for k, p in enumerate(probs)})
    if label is not None:
        row["true_label"] = names[int(label)]
    return row


def _score_row(logits, label, names):
    """Regression: the single output as it is (no activation); the true score where known."""
    row = dict(score=float(logits[0]))
    if label is not None:
        row["true_score"] = float(label)
    return row


def _labels_row(logits, label, names):
    """Multi-label: every label whose sigmoid probability exceeds 0.5, and each label's probability."""
    probs = 1.0 / (1.0 + np.exp(-logits))
    row = dict(labels=[names[k] for k, p in enumerate(probs) if p > 0.5],
               probabilities={names[k]: float(p) for k, p in enumerate(probs)})
    if label is not None:
        row["true_labels"] = [names[k] for k, v in enumerate(label) if v > 0.5]
    return row


def softmax(logits):
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def _generate(trainer, bundle, max_new_tokens):
    """Greedy continuation of each text, one at a time (no padding to shift a prompt's positions);
    the prompt keeps its last tokens when it would not fit the context with the new ones."""
    model, tokenizer = bundle.model, bundle.processor
    limits = [getattr(model.config, "max_position_embeddings", None), tokenizer.model_max_length]
    room = min(n for n in limits if n) - max_new_tokens
    if room < 1:
        raise HftuneError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in the model's context.")
    device, training = next(model.parameters()).device, model.training
    model.eval()
    rows = []
    for i, prompt in enumerate(bundle.predict_inputs):
        prompt = "" if prompt is None else str(prompt)
        ids = tokenizer(prompt)["input_ids"][-room:] or [tokenizer.bos_token_id or tokenizer.eos_token_id]
        with torch.no_grad():
            inputs = torch.tensor([ids], device=device)
            output = model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=max_new_tokens,
                                    do_sample=False, num_beams=1, pad_token_id=tokenizer.pad_token_id)
        rows.append({"index": i, "prompt": prompt,
                     "generated": tokenizer.decode(output[0, len(ids):], skip_special_tokens=True)})
    model.train(training)
    return rows
