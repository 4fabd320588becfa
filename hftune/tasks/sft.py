"""sft: supervised fine-tuning of GPT-style decoders on instructions and conversations.

Each row (hftune.tasks.chat: messages, ShareGPT, prompt-completion, Alpaca) is rendered once by the
chat template and tokenized once; its labels are the tokens of the trained turns
(hftune.tasks.chat_mask), so no template needs `{% generation %}` tags. Rows longer than
max_seq_length follow `truncation_mode`; rows left without a trained token never reach training
and are counted in the results (`<split>_dropped_no_labels`, `<split>_dropped_too_long`,
`<split>_truncated_rows`). Batches are padded (labels -100), flattened into one row (`padding_free`),
or the training examples are packed several to a row (`packing`); per-example position ids keep
every example to itself (hftune.tasks.chat_batches).
Evaluation: loss and perplexity on the trained tokens, plus greedy generation on the validation
rows (hftune.results.generation): exact match, token F1, ROUGE-L and stop rate.

Example:
    >>> from hftune.run import main
    >>> main(["--config", "sft", "--max_steps", "2", "--output_dir", "/tmp/sft"])  # doctest: +SKIP
"""

import logging
from collections import Counter
from dataclasses import dataclass, field

from hftune.data import apply_batched, limit_splits
from hftune.errors import HftuneError
from hftune.tasks.causal_lm import (
    context_limit, load_model_and_tokenizer, padding_free_blockers, perplexity, turn_off_where_blocked,
)
from hftune.tasks.chat import FORMATS, Columns, detect_format, to_conversation
from hftune.tasks.chat_batches import collator, flattens, pack_rows, packs, takes_logits_to_keep
from hftune.tasks.chat_mask import IGNORE, KEPT, TRAIN_ON, TRUNCATED, TRUNCATION, Labeller
from hftune.tasks.chat_template import load_template, needs_template
from hftune.tasks.common import TaskBundle, TaskTraits

logger = logging.getLogger("hftune")

@dataclass
class DataFields:
    """sft's own data fields."""

    data_format: str = field(
        default=None, metadata={"help": f"sft: the rows' format, one of {', '.join(FORMATS)}. Default: detected from "
                                        "the columns (messages, conversations, prompt + completion, instruction + output)."}
    )
    messages_column: str = field(
        default=None, metadata={"help": "sft: column of the conversations (default messages; ShareGPT: conversations)."}
    )
    prompt_column: str = field(
        default=None, metadata={"help": "sft: column of the prompts (default prompt; Alpaca: instruction)."}
    )
    completion_column: str = field(
        default=None, metadata={"help": "sft: column of the completions (default completion; Alpaca: output)."}
    )
    chat_template: str = field(
        default=None,
        metadata={"help": "sft: the chat template: a Jinja file, or chatml (adds ChatML's <|im_start|>/<|im_end|> "
                          "tokens to a model without them). Default: the tokenizer's own. The saved tokenizer "
                          "carries the template used."},
    )
    train_on: str = field(
        default="assistant",
        metadata={"help": f"sft: which tokens carry loss: {', '.join(TRAIN_ON)} (every assistant turn, the last "
                          "one only, or the whole text). Prompt-completion data trains the completion."},
    )
    truncation_mode: str = field(
        default="keep_start",
        metadata={"help": "sft: a row longer than max_seq_length: keep_start (cut the end), drop_turns (drop the "
                          "earliest exchanges, keeping the system message), drop_row, or error."},
    )
    max_seq_length: int = field(
        default=128, metadata={"help": "Longest tokenized input; longer texts are truncated."}
    )
    logits_where_trained: bool = field(
        default=None,
        metadata={"help": "sft: run the LM head (and the loss) only at positions whose next token is trained "
                          "(logits_to_keep + shift_labels): the same loss, without logits over the vocabulary for "
                          "every prompt token. Default: on where the model takes logits_to_keep, off under label "
                          "smoothing, distillation or the pipeline engine."},
    )
    padding_free: bool = field(
        default=None,
        metadata={"help": "Flatten each batch into one row without padding (position ids keep every example to "
                          "itself). causal-lm default: on wherever the model keeps examples apart exactly; sft "
                          "default: on with a flash-attention kernel only (on CPU attention it is slower than padding)."},
    )
    packing: bool = field(
        default=False,
        metadata={"help": "sft: pack the training examples into rows of up to max_seq_length tokens (trl's best-fit "
                          "decreasing), position ids restarting at every example, so that none attends to another "
                          "on any attention backend. Evaluation keeps one example per row."},
    )


TRAITS = TaskTraits(auto_model="AutoModelForCausalLM", output="tokens", inputs="chat", peft_task_type="CAUSAL_LM")


def check_config(model_args, data_args, training_args):
    for name, value, allowed in (("train_on", data_args.train_on, TRAIN_ON),
                                 ("truncation_mode", data_args.truncation_mode, TRUNCATION),
                                 ("data_format", data_args.data_format, FORMATS + (None,))):
        if value not in allowed:
            raise HftuneError(f"{name} '{value}' is not one of {[a for a in allowed if a]}.")
    if data_args.streaming:
        raise HftuneError("sft does not stream yet: its rows are labelled and counted before training; "
                          "drop streaming (or use max_train_samples).")
    check_train_on(data_args.train_on, data_args.data_format)
    logits_blockers = {
        "label_smoothing_factor (Trainer smooths over every position's logits)": training_args.label_smoothing_factor > 0,
        "a teacher_model_name_or_path (distillation compares every position's logits)":
            bool(model_args.teacher_model_name_or_path),
        "engine: pipeline (its loss takes every position's logits)": training_args.engine == "pipeline",
    }
    turn_off_where_blocked(data_args, "logits_where_trained", logits_blockers)
    if data_args.packing and data_args.padding_free:
        raise HftuneError("packing and padding_free both rearrange the batch; set one of them to false.")
    for key in ("padding_free", "packing"):
        turn_off_where_blocked(data_args, key, padding_free_blockers(model_args, training_args))


def check_train_on(train_on, fmt):
    if train_on == "last_assistant" and fmt in ("prompt-completion", "alpaca"):
        raise HftuneError(f"train_on: last_assistant needs conversations; {fmt} data trains its completion: "
                          "drop train_on.")


def columns_of(data_args):
    return Columns(data_args.messages_column, data_args.prompt_column, data_args.completion_column)


def label_split(dataset, split, fmt, labeller, data_args):
    """{input_ids, labels, status} per row (status: kept, truncated, dropped_...)."""
    columns = columns_of(data_args)

    def encode(batch, indices):
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        out = [labeller.example(to_conversation(row, fmt, columns, i, split), i, split) for row, i in zip(rows, indices)]
        return {key: [o[key] for o in out] for key in ("input_ids", "labels", "status")}

    return apply_batched(dataset, "map", encode, with_indices=True, remove_columns=dataset.column_names,
                         num_proc=data_args.preprocessing_num_workers, desc=f"rendering and labelling {split}")


def keep_trained(labelled, split, counts):
    """Rows with a trained token; the others counted by reason (a row never reaches training unlabelled)."""
    tally = Counter(labelled["status"])
    for status, n in tally.items():
        if status != KEPT:
            counts[f"{split}_{'truncated_rows' if status == TRUNCATED else status}"] = n
    dropped = {s: n for s, n in tally.items() if s not in (KEPT, TRUNCATED)}
    if dropped:
        logger.warning(f"{split}: {sum(dropped.values())} of {len(labelled)} rows dropped ({dict(dropped)}).")
    kept = labelled.filter(lambda status: status in (KEPT, TRUNCATED), input_columns="status") if dropped else labelled
    if len(kept) == 0:
        raise HftuneError(f"every row of the {split} split was dropped ({dict(dropped)}); raise max_seq_length, "
                          "choose another truncation_mode or check train_on.")
    return kept.remove_columns("status")


def stop_tokens(tokenizer, model, dataset):
    """EOS ids of the saved generation config: the tokenizer's EOS and the token that ends each
    trained turn (the template's end-of-turn), so generation stops where training taught it to."""
    ends = {labels[max(i for i, t in enumerate(labels) if t != IGNORE)] for labels in dataset.select(
        range(min(len(dataset), 64)))["labels"]}
    ids = sorted({tokenizer.eos_token_id, *ends} - {None})
    model.generation_config.eos_token_id = ids if len(ids) > 1 else ids[0]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return ids


def build(model_args, data_args, raw):
    model, tokenizer = load_model_and_tokenizer(model_args)
    fmt = detect_format(raw["train"].column_names, data_args.data_format, columns_of(data_args))
    check_train_on(data_args.train_on, fmt)
    template = load_template(tokenizer, model, data_args.chat_template,
                             model_args.tokenizer_name or model_args.model_name_or_path,
                             needs_template(raw["train"], columns_of(data_args), fmt))
    length = context_limit(data_args, tokenizer, model)
    labeller = Labeller(tokenizer, template, data_args.train_on, length, data_args.truncation_mode)
    logger.info(f"sft: {fmt} rows, train_on: {data_args.train_on}, truncation_mode: {data_args.truncation_mode}, "
                f"max_seq_length {length}")
    counts = {}
    raw = limit_splits(raw, data_args)  # rows, as the example scripts limit them
    prepared = {split: keep_trained(label_split(dataset, split, fmt, labeller, data_args), split, counts)
                for split, dataset in raw.items()}
    stops = stop_tokens(tokenizer, model, prepared["train"])
    logger.info(f"sft: generation stops at {tokenizer.convert_ids_to_tokens(stops)}")
    layout = "packed" if packs(data_args, model) else "flattened" if flattens(data_args, model) else "padded"
    if layout == "packed":
        examples, prepared["train"] = len(prepared["train"]), pack_rows(prepared["train"], length)
        counts["train_packed_rows"] = len(prepared["train"])
        logger.info(f"sft: {examples} training examples packed into {len(prepared['train'])} rows of up to {length} "
                    "tokens")
    return TaskBundle(
        model=model, processor=tokenizer, train_dataset=prepared.get("train"), eval_dataset=prepared.get("validation"),
        test_dataset=prepared.get("test"), data_collator=collator(layout, tokenizer, takes_logits_to_keep(model, data_args)),
        derived_metrics=perplexity,
        main_metric="eval_perplexity", pipeline_task="text-generation", data_counts=counts, answers=True,
    )
