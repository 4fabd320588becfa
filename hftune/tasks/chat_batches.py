"""How sft's labelled rows become batches: padded (labels -100), flattened (padding_free), or packed
several to a row (packing, trl's best-fit-decreasing pack_dataset); in each, examples keep to
themselves and every trained token weighs alike. Optionally the LM head runs only where a token is
trained (LogitsWhereTrained).
"""

import inspect

import torch
from transformers import DataCollatorForSeq2Seq
from trl import pack_dataset

from hftune.errors import HftuneError
from hftune.tasks.causal_lm import FlatteningCollator, keep_texts_apart
from hftune.tasks.chat_mask import IGNORE


def flattens(data_args, model):
    """Whether batches are flattened (padding_free). Unset: only with a flash-attention kernel, which
    attends within each example of a flattened row; SDPA or eager attention (CPU) computes the whole
    row's tokens squared: measured 1.8x slower than padded batches for 32 rows of ~60 tokens."""
    if data_args.padding_free is None and "flash" not in str(model.config._attn_implementation):
        return False
    return keep_texts_apart(data_args, model, "padding_free")


def packs(data_args, model):
    """Whether the train split is packed (packing: true), checked on the model like padding_free."""
    return bool(data_args.packing) and keep_texts_apart(data_args, model, "packing")


def pack_rows(labelled, length):
    """Examples packed into rows of at most `length` tokens (best fit, longest first), with position
    ids that restart at every example. Fewer, fuller rows: on CPU attention each packed row costs its
    length squared, not the batch's.

    >>> from datasets import Dataset
    >>> pack_rows(Dataset.from_dict({"input_ids": [[1, 2], [3], [4, 5, 6]], "labels": [[1, 2], [3], [4, 5, 6]]}),
    ...           3)[:]["position_ids"]
    [[0, 1, 2], [0, 1, 0]]
    """
    packed = pack_dataset(labelled.select_columns(["input_ids", "labels"]), length, strategy="bfd")
    return packed.map(lambda row: {"position_ids": [p for n in row["seq_lengths"] for p in range(n)]},
                      remove_columns="seq_lengths", desc="position ids of the packed rows")


class PackedRowsCollator:
    """Packed rows -> a batch padded to its longest row, with position ids that restart at every
    example and no attention mask: transformers' masks then keep each example to itself on every
    attention backend (the padding is one more example, all -100). Each example's first label is -100,
    as it is in a padded batch, where no token before it predicts it. A row without position ids (the
    unpacked evaluation rows) is one example."""

    def __init__(self, pad_id):
        self.pad_id = pad_id

    def __call__(self, features):
        width = max(len(f["input_ids"]) for f in features)
        columns = {"input_ids": [], "labels": [], "position_ids": []}
        for feature in features:
            pad = width - len(feature["input_ids"])
            own = feature.get("position_ids", range(len(feature["input_ids"])))
            positions = list(own) + list(range(pad))
            labels = [IGNORE if p == 0 else t for p, t in zip(positions, list(feature["labels"]) + [IGNORE] * pad)]
            columns["input_ids"].append(list(feature["input_ids"]) + [self.pad_id] * pad)
            columns["labels"].append(labels)
            columns["position_ids"].append(positions)
        return {**{k: torch.tensor(v) for k, v in columns.items()}, "use_cache": False}


def collator(layout, tokenizer, trained_logits):
    """layout: padded, flattened or packed."""
    # labels padded with -100, never masked by token id: with pad == eos the trained EOS stays trained
    pad = {"flattened": FlatteningCollator(), "packed": PackedRowsCollator(tokenizer.pad_token_id)}.get(
        layout) or DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE)
    return LogitsWhereTrained(pad) if trained_logits else pad


def takes_logits_to_keep(model, data_args):
    if data_args.logits_where_trained is False:
        return False
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
