"""What the language-model tasks (causal-lm, masked-lm) share: a split's texts joined into one token
stream, cut into fixed-size blocks, and perplexity from the evaluation loss.

Example:
    >>> ds = Dataset.from_dict({"input_ids": [[1, 2, 3], [4, 5], [6, 7, 8]]})
    >>> stream, lengths = token_stream(ds, "train", 3)
    >>> blocks_dataset({"input_ids": stream[:6].reshape(-1, 3)})[:]["input_ids"]
    [[1, 2, 3], [4, 5, 6]]
"""

import math

import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset

from hftune.errors import HftuneError


def token_stream(tokenized, split, block_size, column="input_ids", key="block_size"):
    """(the split's `column` joined row after row into one numpy array, each row's length). A column of
    pairs (offset_mapping) comes back as (tokens, 2). Arrow hands the stream over without Python lists,
    and respects select/shuffle. Fewer tokens than one block: an error naming `key`."""
    rows = tokenized.with_format("arrow")[:].column(column).combine_chunks()
    lengths = pc.list_value_length(rows).to_numpy()
    values = pc.list_flatten(rows)
    while pa.types.is_list(values.type) or pa.types.is_fixed_size_list(values.type):
        values = pc.list_flatten(values)
    stream = values.to_numpy(zero_copy_only=False).reshape(int(lengths.sum()), -1)
    if len(stream) < block_size:
        raise HftuneError(f"the {split} split has only {len(stream)} tokens, fewer than {key}={block_size}; "
                          f"lower {key} or add text.")
    return (stream[:, 0] if stream.shape[1] == 1 else stream), lengths


def fixed_lists(array):
    """A numpy array as nested Arrow fixed-size lists, one row per entry of its first axis."""
    values = pa.array(array.ravel())
    for width in reversed(array.shape[1:]):
        values = pa.FixedSizeListArray.from_arrays(values, width)
    return values


def blocks_dataset(columns):
    """A Dataset of {name: (blocks, block_size, ...) array} columns, built in Arrow."""
    return Dataset(pa.table({name: fixed_lists(column) for name, column in columns.items()}))


def perplexity(metrics):
    """`<prefix>_perplexity` = exp(`<prefix>_loss`) for each evaluation loss in a log line; inf
    once the loss is too large for exp (> ~709). The validation one also as plain `perplexity`, the
    key run_clm.py and run_mlm.py write.

    >>> perplexity({"eval_loss": 0.0, "loss": 2.0})
    {'eval_perplexity': 1.0, 'perplexity': 1.0}
    """
    derived = {}
    for key, loss in metrics.items():
        if key.endswith("_loss") and key != "train_loss":
            try:
                derived[key[: -len("loss")] + "perplexity"] = math.exp(loss)
            except OverflowError:
                derived[key[: -len("loss")] + "perplexity"] = float("inf")
    if "eval_perplexity" in derived:
        derived["perplexity"] = derived["eval_perplexity"]
    return derived
