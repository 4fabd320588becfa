"""causal-lm: GPT-style decoders (AutoModelForCausalLM) trained on next-token prediction;
metric perplexity = exp(eval_loss).

Two ways to turn texts into examples (`concatenate_texts`):
- true: every text plus an EOS, joined into one token stream cut into `block_size` blocks, as
  transformers' run_clm.py does: no padding. By default (`isolate_texts`) the blocks also carry
  position ids that restart with every text, from which the model's mask keeps each text to itself,
  and each text's first token is not predicted from the text before it; `isolate_texts: false`
  gives run_clm.py's blocks, where a text attends to the texts before it in its block.
- false: each text on its own, truncated to `max_seq_length`. By default (`padding_free`) each
  batch is flattened into one row with no padding (transformers' DataCollatorWithFlattening):
  position ids restart at 0 for every text, from which the model's mask keeps every text to
  itself, and each text's first label is -100, so no token predicts across a boundary: the same
  logits and token-weighted loss as padded batches, without computing padding. With
  `padding_free: false`, or where the model would let the texts see each other, the collator pads
  each batch and sets the padded positions of the labels to -100 so they carry no loss.

Example:
    >>> from hftune.run import main
    >>> main(["--config", "causal_lm", "--max_steps", "2", "--output_dir", "/tmp/clm"])  # doctest: +SKIP
"""

import copy
import logging
import math
from dataclasses import dataclass, field
from functools import partial
from itertools import chain

import numpy as np
import torch
from datasets import Dataset
from transformers import (
    AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, DataCollatorWithFlattening, default_data_collator,
)

from hftune.compression.adapters import PEFT_METHODS, quantized_loading
from hftune.columns import detect_columns
from hftune.data import apply_batched, drop_empty_texts, is_stream, limit_splits, require_columns
from hftune.errors import HftuneError
from hftune.tasks.common import (
    TaskBundle, TaskTraits, TextFields, check_room, load_config, load_weights, pretrained_source, processor_path,
)
from hftune.tasks.language_modeling import blocks_dataset, perplexity, token_stream

logger = logging.getLogger("hftune")


@dataclass
class DataFields(TextFields):
    """causal-lm's own data fields."""

    block_size: int = field(
        default=None,
        metadata={"help": "causal-lm: length of training blocks (default: max_seq_length)."},
    )
    concatenate_texts: bool = field(
        default=True,
        metadata={
            "help": "causal-lm: concatenate all texts and cut them into block_size blocks (true), "
            "or truncate each text on its own (false)."
        },
    )
    padding_free: bool = field(
        default=None,
        metadata={
            "help": "causal-lm with concatenate_texts: false: flatten each batch into one row without padding "
            "(DataCollatorWithFlattening; position ids keep every text to itself). Default: on wherever the "
            "model keeps the texts apart exactly, else padded batches; false: always pad."
        },
    )
    keep_linebreaks: bool = field(
        default=False, metadata={"help": "A .txt train_file: keep each line's line break in its text (run_clm.py's "
                                         "option; its default is true, hftune's stays datasets' false)."}
    )
    isolate_texts: bool = field(
        default=None,
        metadata={
            "help": "causal-lm with concatenate_texts: true: keep each text in a block to itself (position ids "
            "restart per text, so no token attends to or predicts across a text boundary). Default: on wherever "
            "the model keeps the texts apart exactly; false: run_clm.py's blocks, where texts see the ones before."
        },
    )


TRAITS = TaskTraits(auto_model="AutoModelForCausalLM", output="tokens", inputs="text", peft_task_type="CAUSAL_LM")


def load_model_and_tokenizer(model_args):
    path, common = pretrained_source(model_args)
    tokenizer = AutoTokenizer.from_pretrained(processor_path(model_args, path), **common)
    if tokenizer.eos_token is None:
        raise HftuneError(
            f"the tokenizer of '{model_args.tokenizer_name or model_args.model_name_or_path}' has no eos_token, "
            "which causal-lm needs to mark "
            "where a text ends; use a causal-LM checkpoint or give its tokenizer an eos_token."
        )
    if tokenizer.pad_token is None:  # GPT-2 style tokenizers have none; padding positions are masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    # float32 weights whatever the checkpoint's dtype (transformers 5 defaults to it, often bf16):
    # pure-bf16 AdamW steps lose small updates; `bf16: true` adds autocast on top of float32 weights.
    config = load_config(model_args, path, common)
    model = load_weights(
        AutoModelForCausalLM, model_args, path, config, dtype=torch.float32,
        **quantized_loading(model_args, "causal-lm"), **common
    )
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "loss_type", None) is None:
        # Classes not named *ForCausalLM (GPT2LMHeadModel) leave loss_type unset and fall back to the causal-LM
        # loss; Trainer then counts their label tokens unshifted and scales every loss by (n - 1) / n.
        model.loss_type = "ForCausalLM"
    return model, tokenizer


def context_limit(data_args, tokenizer, model):
    """Tokens per example: block_size (or max_seq_length), capped by what the model can attend to."""
    name = "max_seq_length" if data_args.block_size is None else "block_size"
    wanted = getattr(data_args, name)
    if wanted is None or wanted < 1:
        raise HftuneError(f"{name} must be a positive number of tokens, got {wanted}.")
    # A token is learnt from the ones before it: 2 tokens per example at the least (1 gives loss 0, perplexity nan),
    # plus the special tokens a text gets where texts are not concatenated.
    if data_args.concatenate_texts:  # blocks of a token stream: no special tokens of their own
        if wanted < 2:
            raise HftuneError(f"{name} {wanted} leaves nothing to learn (a token is predicted from the ones before "
                              f"it); set {name} to at least 2 (128 or more is usual).")
    else:
        check_room(tokenizer, wanted, name, real=2)
    limits = [tokenizer.model_max_length, getattr(model.config, "max_position_embeddings", None)]
    limit = min(n for n in limits if n)
    if wanted > limit:
        logger.warning("block_size/max_seq_length %d exceeds the model's context; using %d.", wanted, limit)
    return min(wanted, limit)


def tokenize(dataset, tokenizer, text, split, max_length=None, num_proc=None):
    """input_ids per non-empty text, each ending with EOS (unless truncation cut the text short,
    or the tokenizer already added one): the model learns where texts end."""
    eos = tokenizer.eos_token_id
    if not is_stream(dataset) and len(dataset) == 0:  # a stream is checked once prepared (build)
        raise HftuneError(f"the {split} split has no non-empty text in text_column '{text}'; check the data.")

    def encode(batch):
        texts = [str(t) for t in batch[text]]
        ids = tokenizer(texts, truncation=max_length is not None, max_length=max_length)["input_ids"]
        room = max_length or math.inf
        return {"input_ids": [i + [eos] if len(i) < room and (not i or i[-1] != eos) else i for i in ids]}

    return apply_batched(dataset, "map", encode, num_proc=num_proc, desc=f"tokenizing {split}",
                         remove_columns=dataset.column_names)


def cut_blocks(stream, lengths, block_size, isolate):
    """{column: (blocks, block_size) array} of a token stream made of texts of `lengths` tokens; the
    last partial block is dropped. `isolate`: position ids restart with every text (and block), from
    which the model's mask keeps each text to itself, and each text's first token gets label -100
    instead of being predicted from the text before it: the predictions padded batches train on.

    >>> cut_blocks(np.array([1, 2, 3, 4, 5, 6, 7]), np.array([3, 2, 2]), 3, isolate=True)["position_ids"]
    array([[0, 1, 2],
           [0, 1, 0]])
    """
    n = len(stream) // block_size * block_size
    columns = {"input_ids": stream[:n], "labels": stream[:n]}
    if isolate:
        index = np.arange(n)
        offset = index - np.repeat(np.cumsum(lengths) - lengths, lengths)[:n]  # position within its text
        columns["labels"] = np.where(offset == 0, -100, stream[:n])
        columns["position_ids"] = np.minimum(offset, index % block_size)
    return {name: column.reshape(-1, block_size) for name, column in columns.items()}


def pack_blocks(tokenized, block_size, split, isolate=False):
    """Cut the split's whole token stream into block_size blocks (cut_blocks); only its last partial
    block is dropped (run_clm.py drops one per 1000-text batch).

    >>> ds = Dataset.from_dict({"input_ids": [[1, 2, 3], [4, 5], [6, 7, 8]]})
    >>> pack_blocks(ds, 3, "train")[:]["input_ids"]
    [[1, 2, 3], [4, 5, 6]]
    """
    stream, lengths = token_stream(tokenized, split, block_size)
    return blocks_dataset(cut_blocks(stream, lengths, block_size, isolate))


def pack_stream(tokenized, block_size, texts_per_batch=1000, isolate=False):
    """pack_blocks for a stream, as run_clm.py packs: each batch of `texts_per_batch` texts is
    joined and cut into block_size blocks, its last partial block dropped.

    >>> ds = Dataset.from_dict({"input_ids": [[1, 2, 3], [4, 5], [6, 7, 8]]}).to_iterable_dataset()
    >>> [row["input_ids"] for row in pack_stream(ds, 3, texts_per_batch=2)]
    [[1, 2, 3], [6, 7, 8]]
    """
    def group(batch):
        stream = np.fromiter(chain.from_iterable(batch["input_ids"]), dtype=np.int64)
        lengths = np.array([len(ids) for ids in batch["input_ids"]])
        return {name: column.tolist() for name, column in cut_blocks(stream, lengths, block_size, isolate).items()}

    return tokenized.map(group, batched=True, batch_size=texts_per_batch, remove_columns=["input_ids"])


def prepare(raw, tokenizer, data_args, length, skipped, apart):
    """Examples of every split: blocks (texts kept `apart` or not) or single texts."""
    text, workers = data_args.text_column, data_args.preprocessing_num_workers
    prepared = {}
    for split, dataset in raw.items():
        dataset, skipped[split] = drop_empty_texts(dataset, split, [text], num_proc=workers)
        if data_args.concatenate_texts:
            tokenized = tokenize(dataset, tokenizer, text, split, num_proc=workers)
            pack = pack_stream if is_stream(tokenized) else partial(pack_blocks, split=split)
            prepared[split] = pack(tokenized, length, isolate=apart)
        else:
            tokenized = tokenize(dataset, tokenizer, text, split, max_length=length, num_proc=workers)
            prepared[split] = apply_batched(tokenized, "map", lambda b: {"labels": b["input_ids"]}, num_proc=workers)
    return prepared


class FlatteningCollator(DataCollatorWithFlattening):
    """DataCollatorWithFlattening plus `use_cache=False`: masking_utils reads packed texts from the
    position ids only when the forward builds no KV cache, and a causal LM builds one by default
    (in training too), which silently lets every text attend to the texts before it."""

    def __call__(self, features, return_tensors=None, separator_id=None):
        return {**super().__call__(features, return_tensors, separator_id), "use_cache": False}


def apart_key(data_args):
    """The setting that keeps texts apart: isolate_texts for packed blocks, padding_free for single texts."""
    return "isolate_texts" if data_args.concatenate_texts else "padding_free"


def padding_free_blockers(model_args, args, key="padding_free"):
    """{what: blocked}: settings under which examples cannot be kept apart by position ids. The pipeline
    engine passes packed blocks' position ids through its stages, but not rows flattened into one."""
    return {
        f"peft: {model_args.peft} (its virtual tokens break the packed row's position ids)":
            model_args.peft in PEFT_METHODS and not PEFT_METHODS[model_args.peft].wraps_modules,
        "engine: pipeline (it builds its own attention mask over the flattened row)":
            args.engine == "pipeline" and key != "isolate_texts",
        "a teacher_model_name_or_path (the teacher's attention is not checked)":
            bool(model_args.teacher_model_name_or_path),
    }


def check_padding_free(model_args, data_args, args):
    """Config-only checks of `padding_free` / `isolate_texts` (true, false, or unset: on where it is
    exact); an unset value becomes false where texts cannot be kept apart by position ids."""
    key = apart_key(data_args)
    other = "padding_free" if data_args.concatenate_texts else "isolate_texts"
    if getattr(data_args, other) is not None:
        mode = "false (single texts)" if other == "padding_free" else "true (packed blocks)"
        raise HftuneError(f"{other} applies to concatenate_texts: {mode}; drop {other} or change concatenate_texts.")
    turn_off_where_blocked(data_args, key, padding_free_blockers(model_args, args, key))


def turn_off_where_blocked(data_args, key, blockers):
    """A speed setting (true, false, or unset: on where it applies) under settings that rule it out:
    true is refused naming the blocker; unset becomes false."""
    for what, blocked in blockers.items():
        if blocked and getattr(data_args, key):
            raise HftuneError(f"{key}: true cannot be used with {what}; set {key}: false.")
        if blocked:
            setattr(data_args, key, False)


check_config = check_padding_free  # the task's parse-time check (hftune.tasks)


def packing_leak(model, collator):
    """None when the model keeps flattened texts apart (the second of two packed texts gets the
    logits it gets alone), else what goes wrong. Only the model's code can tell: masking_utils
    isolates texts by their position ids, models with a mask of their own do not."""
    model = one_layer_copy(model)
    first, second = list(range(1, 6)), list(range(6, 9))
    packed = {k: v for k, v in collator([{"input_ids": first}, {"input_ids": second}]).items() if k != "labels"}
    try:
        with torch.no_grad():
            together = model(**packed).logits[0, len(first):]
            alone = model(input_ids=torch.tensor([second]), use_cache=False).logits[0]
    except (TypeError, ValueError, RuntimeError) as err:
        return f"its forward fails on a flattened batch ({type(err).__name__}: {str(err).splitlines()[0]})"
    error = (together - alone).abs().max().item()
    if error > 1e-4 * max(1.0, alone.abs().max().item()):  # float32 round-off is ~1e-7; a leak, >1e-3
        return f"its attention lets packed texts see each other (logits off by {error:.2g})"
    return None


def one_layer_copy(model, vocab=64):
    """A 1-layer, randomly initialised model of the same class and attention code, on the CPU: its
    mask behaves as the model's (the code decides it, not the weights), and it is built without
    the real weights, so the check also runs where ZeRO-3 partitions them, and costs little for a
    large model. The global RNG is left as it was (the real run's initialisation and data order)."""
    config = copy.deepcopy(model.config)
    config.num_hidden_layers, config.vocab_size = 1, vocab
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:1]
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if isinstance(getattr(config, name, None), int) and getattr(config, name) >= vocab:
            setattr(config, name, 0)
    with torch.random.fork_rng(devices=[]):
        return type(model)(config).float().eval()


def keep_texts_apart(data_args, model, key=None):
    """Whether examples keep their texts apart by position ids (padding_free / isolate_texts true or
    unset), checked on the model; a model that would let them mix gets padded batches or plain blocks."""
    key = key or apart_key(data_args)
    if getattr(data_args, key) is False:
        return False
    leak = packing_leak(model, FlatteningCollator())
    if leak is None:
        return True
    name = f"{model.config.model_type} ({model.config._attn_implementation} attention)"
    if getattr(data_args, key):
        raise HftuneError(f"{key}: true, but for {name} {leak}; set {key}: false "
                          "(Llama, GPT-2 and other models whose mask follows position_ids support it).")
    fallback = "run_clm.py's blocks, where a text sees the texts before it" if key == "isolate_texts" else \
        "padded batches"
    logger.info("%s: keeping texts apart would be inexact for %s: %s.", fallback, name, leak)
    return False


def isolated_blocks_collator(features):
    """Blocks with per-text position ids, and `use_cache=False` (see FlatteningCollator)."""
    return {**default_data_collator(features), "use_cache": False}


def collator_for(data_args, apart, tokenizer):
    if data_args.concatenate_texts:
        return isolated_blocks_collator if apart else default_data_collator
    # labels padded with -100 by the collator, not masked by token id: with pad == eos,
    # DataCollatorForLanguageModeling(mlm=False) would also hide every real EOS from the loss.
    return FlatteningCollator() if apart else DataCollatorForSeq2Seq(tokenizer)


def build(model_args, data_args, raw):
    raw = detect_columns(raw, data_args)  # unset columns (load_raw_datasets has found them already)
    for split, dataset in raw.items():
        require_columns(dataset, split, text_column=data_args.text_column)
    if data_args.block_size is not None and not data_args.concatenate_texts:  # would be ignored
        raise HftuneError("block_size only applies with concatenate_texts: true; drop it or use max_seq_length.")
    model, tokenizer = load_model_and_tokenizer(model_args)
    length = context_limit(data_args, tokenizer, model)
    apart = keep_texts_apart(data_args, model)
    skipped = {}  # split -> empty texts dropped
    prepared = limit_splits(prepare(raw, tokenizer, data_args, length, skipped, apart), data_args)  # counts blocks
    if is_stream(prepared["train"]) and next(iter(prepared["train"]), None) is None:
        raise HftuneError(
            f"the train stream yields no example: no non-empty text in text_column '{data_args.text_column}'"
            + (f", or fewer than block_size={length} tokens per 1,000 texts" if data_args.concatenate_texts else "")
            + "; check the data or lower block_size."
        )
    collator = collator_for(data_args, apart, tokenizer)
    return TaskBundle(
        model=model, processor=tokenizer, train_dataset=prepared.get("train"),
        eval_dataset=prepared.get("validation"), test_dataset=prepared.get("test"),
        data_collator=collator, derived_metrics=perplexity,
        main_metric="eval_perplexity", pipeline_task="text-generation", skipped_rows=skipped,
    )
