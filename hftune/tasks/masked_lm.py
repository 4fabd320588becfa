"""masked-lm: continued masked-LM pretraining of an encoder (BERT, RoBERTa, MiniLM, ...) on raw text,
as transformers' run_mlm.py does, to adapt it to a domain before fine-tuning a classifier on it
(`model_name_or_path: <this run's output_dir>`: the head is dropped, the adapted encoder kept).
Metric perplexity = exp(eval_loss), over the masked tokens.

- `line_by_line: false` (default): every text, with its [CLS]/[SEP], joined into one token stream cut
  into `max_seq_length` blocks (the last partial block dropped); `true`: each non-empty text on its
  own, truncated to `max_seq_length` (padded per batch, or to max_seq_length with `pad_to_max_length`).
- Masking is DataCollatorForLanguageModeling's (`mlm_probability` of the tokens, of which 80% become
  [MASK], 10% a random token, 10% stay; special tokens and padding never), or with
  `whole_word_masking` every sub-token of a chosen word. Each training batch draws new masks, from a
  generator seeded by the batch's tokens and the epoch: the same batch gets the same masks whatever
  the process count, dataloader workers or a resume, so runs reproduce exactly, and new ones in every
  epoch, as run_mlm.py's (sequential order included). Evaluation rows are masked once, when the split
  is prepared (seeded by each row's tokens): every evaluation scores the same masks, so eval_loss
  moves only when the model does (run_mlm.py redraws them each time).

Example:
    >>> from hftune.run import main
    >>> main(["--config", "masked_lm", "--max_steps", "2", "--output_dir", "/tmp/mlm"])  # doctest: +SKIP
"""

import hashlib
import logging
from dataclasses import dataclass, field

import torch
from transformers import AutoModelForMaskedLM, AutoTokenizer, DataCollatorForLanguageModeling, TrainerCallback
from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

from hftune.columns import detect_columns
from hftune.compression.adapters import PEFT_METHODS
from hftune.data import apply_batched, drop_empty_texts, limit_splits, require_columns
from hftune.errors import HftuneError
from hftune.tasks.common import (
    TaskBundle, TaskTraits, TextFields, check_room, load_config, load_weights, pretrained_source, processor_path,
)
from hftune.tasks.language_modeling import blocks_dataset, perplexity, token_stream

logger = logging.getLogger("hftune")
IGNORE = -100


@dataclass
class DataFields(TextFields):
    """masked-lm's own data fields (run_mlm.py's names; max_seq_length is the block length)."""

    mlm_probability: float = field(default=0.15, metadata={"help": "masked-lm: share of the tokens masked."})
    line_by_line: bool = field(
        default=False, metadata={"help": "masked-lm: each text on its own (true), or all texts joined and cut "
                                         "into max_seq_length blocks (false, run_mlm.py's default)."})
    whole_word_masking: bool = field(
        default=False, metadata={"help": "masked-lm: mask every sub-token of a chosen word together."})
    pad_to_max_length: bool = field(
        default=False, metadata={"help": "Pad every text to max_seq_length (run_glue.py's and run_mlm.py's option; "
                                         "masked-lm: with line_by_line; the default pads each batch to its longest "
                                         "text: same results, less compute)."})


# "tokens": a language-model head over the vocabulary (distillation compares it, PEFT keeps it); this one
# fills masks and generates nothing (hftune.results.predict generates only with AutoModelForCausalLM).
TRAITS = TaskTraits(auto_model="AutoModelForMaskedLM", output="tokens", inputs="text")


def check_config(model_args, data_args, training_args):
    """The task's parse-time check (hftune.tasks)."""
    if not 0 < data_args.mlm_probability < 1:
        raise HftuneError(f"mlm_probability must be in (0, 1), got {data_args.mlm_probability}.")
    if training_args.do_predict:
        raise HftuneError("do_predict has nothing to write for masked-lm (a masked LM generates no text); "
                          "use do_eval for eval_loss and perplexity on eval_split.")
    if data_args.pad_to_max_length and not data_args.line_by_line:
        raise HftuneError("pad_to_max_length applies to line_by_line: true (blocks are always full); drop it.")
    if data_args.streaming:
        raise HftuneError("masked-lm reads its data whole (streaming: true is not supported); drop streaming.")
    method = PEFT_METHODS.get(model_args.peft)
    if method is not None and not method.wraps_modules:
        raise HftuneError(f"peft {model_args.peft} prepends virtual tokens for a causal LM; use peft: lora or ia3 "
                          "for masked-lm.")
    if data_args.whole_word_masking:
        # the word offsets the collator reads are no forward() argument: Trainer would drop them first
        # (the prepared rows hold nothing else the model does not take)
        training_args.remove_unused_columns = False
        logger.info("whole_word_masking: remove_unused_columns set to false (the collator reads the word offsets)")
    if training_args.do_train and training_args.dataloader_persistent_workers and training_args.dataloader_num_workers:
        # a persistent worker keeps the copy of the collator it started with, and with it the first epoch's masks
        raise HftuneError("masked-lm draws new masks each epoch, which dataloader_persistent_workers would keep at the "
                          "first epoch's (a worker holds the collator it started with); drop "
                          "dataloader_persistent_workers.")


def load_model_and_tokenizer(model_args):
    path, common = pretrained_source(model_args)
    config = load_config(model_args, path, common)
    if config.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        raise HftuneError(f"'{model_args.model_name_or_path or model_args.model_type}' is a {config.model_type} model, "
                          "which has no masked-LM head (AutoModelForMaskedLM); masked-lm adapts an encoder (BERT, "
                          "RoBERTa, DeBERTa, ...): use one, or task: causal-lm for a decoder.")
    tokenizer = AutoTokenizer.from_pretrained(processor_path(model_args, path), **common)
    if tokenizer.mask_token is None:
        raise HftuneError(f"the tokenizer of '{model_args.tokenizer_name or model_args.model_name_or_path}' has no "
                          "mask_token, which masked-lm needs; use the encoder's own tokenizer.")
    if model_args.model_type:
        model = load_weights(AutoModelForMaskedLM, model_args, path, config, dtype=torch.float32, **common)
    else:
        model, info = load_weights(AutoModelForMaskedLM, model_args, path, config, dtype=torch.float32,
                                   loading_info=True, **common)
        if info["missing_keys"]:  # e.g. a sentence-transformers BertModel: an encoder without its MLM head
            logger.warning(f"'{model_args.model_name_or_path}' has no masked-LM head weights: transformers added a new "
                           "one (its decoder tied to the word embeddings); its first steps train it.")
    # BERT-style masked LMs take **kwargs but average their loss over each micro-batch's masked tokens, ignoring
    # num_items_in_batch: Trainer must divide by the accumulation steps itself (as in run_mlm.py's runs).
    model.accepts_loss_kwargs = False
    return model, tokenizer


class MaskingCollator(DataCollatorForLanguageModeling):
    """DataCollatorForLanguageModeling whose masks follow from the tokens masked and the epoch: each
    batch's generator is seeded by a hash of its input ids and `epoch` (set by MaskEpoch). Rows that
    already hold labels (evaluation, masked once when prepared) are only padded. It pads itself:
    transformers' own padding cannot pad word offsets."""

    epoch = 0  # the training epoch the batches belong to

    def torch_call(self, examples):
        width = max(len(e["input_ids"]) for e in examples)

        def pad(key, value, default=None):
            rows = [e.get(key, default) for e in examples]
            return torch.tensor([list(r) + [value] * (width - len(r)) for r in rows])

        ids = pad("input_ids", self.tokenizer.pad_token_id)
        batch = {"input_ids": ids, "attention_mask": pad("attention_mask", 0, [1] * width)}
        if "labels" in examples[0]:
            return {**batch, "labels": pad("labels", IGNORE)}
        special = torch.isin(ids, torch.tensor(self.tokenizer.all_special_ids))  # [CLS], [SEP], padding, ...
        offsets = pad("offset_mapping", (0, 0)) if self.whole_word_mask else None
        batch["input_ids"], batch["labels"] = self.torch_mask_tokens(ids, special, offsets)
        return batch

    def torch_mask_tokens(self, inputs, special_tokens_mask=None, offset_mapping=None):
        digest = hashlib.blake2b(inputs.numpy().tobytes(), digest_size=8)
        if self.epoch:  # epoch 0 keeps the tokens-only seed, so evaluation rows (masked at 0) keep their masks
            digest.update(self.epoch.to_bytes(8, "little"))
        self.generator = torch.Generator().manual_seed(int.from_bytes(digest.digest(), "little"))
        return super().torch_mask_tokens(inputs, special_tokens_mask, offset_mapping)


class MaskEpoch(TrainerCallback):
    """Sets the collator's epoch as each training epoch begins. Both engines call on_epoch_begin before
    the epoch's first batch is drawn, and so before its (non-persistent) dataloader workers start and
    copy the collator: the accelerate engine makes the epoch's iterator earlier, but accelerate's loader
    starts nothing before the first batch is asked for. A resume calls it for the resumed epoch."""

    def __init__(self, collator):
        self.collator = collator

    def on_epoch_begin(self, args, state, control, **kwargs):
        # state.epoch: the epochs done, whole at an epoch's start; a resume restores a fraction into this one
        self.collator.epoch = int(state.epoch)


def word_offsets(word_ids):
    """Offsets of words, not characters, for transformers' whole-word masking, which reads words off the
    offsets: the sub-tokens of one word (tokenizer.word_ids, BERT's words) touch, other words do not.
    Character offsets would split a word where the normalizer dropped a character (doesn’t: doesn ##t).

    >>> word_offsets([None, 0, 0, 1, None])
    [(0, 0), (1, 2), (2, 3), (4, 5), (0, 0)]
    """
    return [(0, 0) if word is None else (i + word, i + word + 1) for i, word in enumerate(word_ids)]


def tokenize(dataset, tokenizer, data_args, split, length):
    """input_ids (with the tokenizer's special tokens) per text; word offsets for whole-word masking."""
    keep = ["input_ids"] + (["attention_mask"] if data_args.line_by_line else [])
    keep += ["offset_mapping"] if data_args.whole_word_masking else []

    def encode(batch):
        encoded = tokenizer([str(t) for t in batch[data_args.text_column]], truncation=data_args.line_by_line,
                            max_length=length if data_args.line_by_line else None,
                            padding="max_length" if data_args.pad_to_max_length else False)
        if data_args.whole_word_masking:
            encoded["offset_mapping"] = [word_offsets(encoded.word_ids(i)) for i in range(len(encoded["input_ids"]))]
        return {k: encoded[k] for k in keep}

    return apply_batched(dataset, "map", encode, num_proc=data_args.preprocessing_num_workers,
                         desc=f"tokenizing {split}", remove_columns=dataset.column_names)


def group(tokenized, split, length):
    """run_mlm.py's group_texts: the split's token stream (and offsets) cut into `length`-token blocks."""
    columns = {}
    for column in tokenized.column_names:
        stream, _ = token_stream(tokenized, split, length, column=column, key="max_seq_length")
        blocks = len(stream) // length
        columns[column] = stream[: blocks * length].reshape(blocks, length, *stream.shape[1:])
    return blocks_dataset(columns)


def mask_once(dataset, collator):
    """Evaluation rows with fixed masks: each row masked alone, seeded by its own tokens."""
    def mask(row):
        batch = collator([row])
        return {"input_ids": batch["input_ids"][0].tolist(), "labels": batch["labels"][0].tolist()}

    return dataset.map(mask, remove_columns=[c for c in dataset.column_names if c != "attention_mask"],
                       desc="masking evaluation rows")


def build(model_args, data_args, raw):
    raw = detect_columns(raw, data_args)
    for split, dataset in raw.items():
        require_columns(dataset, split, text_column=data_args.text_column)
    model, tokenizer = load_model_and_tokenizer(model_args)
    check_room(tokenizer, data_args.max_seq_length)
    if data_args.whole_word_masking and not tokenizer.is_fast:
        raise HftuneError(f"whole_word_masking finds words with a fast tokenizer; {type(tokenizer).__name__} "
                          "is not one: use a checkpoint with tokenizer.json.")
    length = min(data_args.max_seq_length, tokenizer.model_max_length)
    skipped, prepared = {}, {}
    for split, dataset in raw.items():
        dataset, skipped[split] = drop_empty_texts(dataset, split, [data_args.text_column],
                                                   num_proc=data_args.preprocessing_num_workers)
        tokenized = tokenize(dataset, tokenizer, data_args, split, length)
        prepared[split] = tokenized if data_args.line_by_line else group(tokenized, split, length)
    prepared = limit_splits(prepared, data_args)  # max_*_samples count blocks, as in run_mlm.py
    # whole words: transformers replaces every chosen token by [MASK] (no 10% random / 10% kept); said here, not warned
    replace = dict(mask_replace_prob=1.0, random_replace_prob=0.0) if data_args.whole_word_masking else {}
    collator = MaskingCollator(tokenizer, mlm_probability=data_args.mlm_probability,
                               whole_word_mask=data_args.whole_word_masking, **replace)
    for split in ("validation", "test"):
        if split in prepared:
            prepared[split] = mask_once(prepared[split], collator)
    return TaskBundle(
        model=model, processor=tokenizer, train_dataset=prepared.get("train"),
        eval_dataset=prepared.get("validation"), test_dataset=prepared.get("test"), data_collator=collator,
        derived_metrics=perplexity, main_metric="eval_perplexity", pipeline_task="fill-mask", skipped_rows=skipped,
        callbacks=(MaskEpoch(collator),),
    )
