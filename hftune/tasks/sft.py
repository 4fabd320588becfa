"""sft: supervised fine-tuning of GPT-style decoders on instructions and conversations.

Each row (hftune.tasks.chat: messages, ShareGPT, prompt-completion, Alpaca) is rendered once by the
chat template and tokenized once; its labels are the tokens of the trained turns
(hftune.tasks.chat_mask), so no template needs `{% generation %}` tags. Rows longer than
max_seq_length follow `truncation_mode`; rows left without a trained token never reach training
and are counted in the results (`<split>_dropped_no_labels`, `<split>_dropped_too_long`,
`<split>_truncated_rows`). Batches are padded (labels -100), or with `padding_free` flattened into one
row (DataCollatorWithFlattening; per-example position ids keep every example to itself).
Evaluation: loss and perplexity on the trained tokens, plus greedy generation on the validation
rows (hftune.results.generation): exact match, token F1, ROUGE-L and stop rate.

Example:
    >>> from hftune.run import main
    >>> main(["--config", "sft", "--max_steps", "2", "--output_dir", "/tmp/sft"])  # doctest: +SKIP
"""

import logging
import os
from collections import Counter
from dataclasses import dataclass, field

import torch
from transformers import DataCollatorForSeq2Seq

from hftune.data import apply_batched, limit_splits
from hftune.errors import HftuneError
from hftune.tasks.causal_lm import (
    FlatteningCollator, context_limit, keep_texts_apart, load_model_and_tokenizer, padding_free_blockers, perplexity,
    turn_off_where_blocked,
)
from hftune.tasks.chat import FORMATS, Columns, detect_format, to_conversation
from hftune.tasks.chat_mask import IGNORE, KEPT, TRAIN_ON, TRUNCATED, TRUNCATION, Labeller
from hftune.tasks.common import TaskBundle, TaskTraits

logger = logging.getLogger("hftune")

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")


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
    turn_off_where_blocked(data_args, "padding_free", padding_free_blockers(model_args, training_args))


def check_train_on(train_on, fmt):
    if train_on == "last_assistant" and fmt in ("prompt-completion", "alpaca"):
        raise HftuneError(f"train_on: last_assistant needs conversations; {fmt} data trains its completion: "
                          "drop train_on.")


def needs_template(dataset, fmt, data_args):
    """Plain prompt-completion text (strings) is trained without a chat template."""
    if fmt != "prompt-completion" or len(dataset) == 0:
        return True
    return not isinstance(dataset[0][columns_of(data_args).of(fmt)["prompt"]], str)


def load_template(tokenizer, model, data_args, name, required=True):
    """The template rows are rendered with, set on the tokenizer so that the saved one carries it
    (None for plain text without one). model: None where only the tokenizer is loaded (inspect)."""
    wanted = data_args.chat_template
    if wanted == "chatml":
        add_chatml_tokens(tokenizer, model)
        template = CHATML
    elif wanted:
        if not os.path.isfile(wanted):
            raise HftuneError(f"chat_template '{wanted}' is not a file; give a Jinja file or chatml.")
        with open(wanted, encoding="utf-8") as handle:
            template = handle.read()
    else:
        template = tokenizer.chat_template
    if not template and not required:
        return None
    if not template:
        raise HftuneError(f"the tokenizer of '{name}' has no chat template; set chat_template: chatml (adds its tokens) "
                          "or a Jinja file.")
    tokenizer.chat_template = template
    return template


def add_chatml_tokens(tokenizer, model):
    """ChatML's markers as special tokens; new embedding rows start at the mean of the old ones."""
    new = [t for t in CHATML_TOKENS if t not in tokenizer.get_vocab()]
    if new:
        tokenizer.add_tokens(new, special_tokens=True)
        if model is not None:
            model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
        logger.info(f"chat_template: chatml added the tokens {new} (embeddings resized to {len(tokenizer)})")


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
    template = load_template(tokenizer, model, data_args, model_args.tokenizer_name or model_args.model_name_or_path,
                             needs_template(raw["train"], fmt, data_args))
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
    apart = flattens(data_args, model)
    return TaskBundle(
        model=model, processor=tokenizer, train_dataset=prepared.get("train"), eval_dataset=prepared.get("validation"),
        test_dataset=prepared.get("test"), data_collator=collator(apart, tokenizer, takes_logits_to_keep(model, data_args)),
        derived_metrics=perplexity,
        main_metric="eval_perplexity", pipeline_task="text-generation", data_counts=counts, answers=True,
    )


def flattens(data_args, model):
    """Whether batches are flattened (padding_free). Unset: only with a flash-attention kernel, which
    attends within each example of a flattened row; SDPA or eager attention (CPU) computes the whole
    row's tokens squared: measured 1.8x slower than padded batches for 32 rows of ~60 tokens."""
    if data_args.padding_free is None and "flash" not in str(model.config._attn_implementation):
        return False
    return keep_texts_apart(data_args, model, "padding_free")


def collator(apart, tokenizer, trained_logits):
    # labels padded with -100, never masked by token id: with pad == eos the trained EOS stays trained
    pad = FlatteningCollator() if apart else DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE)
    return LogitsWhereTrained(pad) if trained_logits else pad


def takes_logits_to_keep(model, data_args):
    if data_args.logits_where_trained is False:
        return False
    import inspect

    takes = "logits_to_keep" in inspect.signature(model.forward).parameters
    if data_args.logits_where_trained and not takes:
        raise HftuneError(f"logits_where_trained: true, but {type(model).__name__} takes no logits_to_keep; drop it.")
    return takes


class LogitsWhereTrained:
    """A collator's batches plus `logits_to_keep` (the positions whose next token is trained in any row)
    and `shift_labels` (those next tokens): the model runs its LM head and loss on these positions only,
    which is the same loss (transformers' causal-LM loss takes shift_labels as they are; Trainer counts
    the tokens from them). One-word answers after 60-token prompts skip ~95% of the vocabulary logits."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, features):
        batch = dict(self.collator(features))
        labels = batch["labels"]
        shifted = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE)], dim=1)
        keep = (shifted != IGNORE).any(dim=0).nonzero().squeeze(-1)
        keep = keep if keep.numel() else torch.zeros(1, dtype=torch.long)  # no trained token: one position, loss 0/0
        return {**batch, "logits_to_keep": keep, "shift_labels": shifted[:, keep]}
