"""group_by_length: Trainer's length-grouped batches, in shuffled order (hftune.training.sampling)."""

import pytest
import torch
from scipy.stats import spearmanr
from transformers.trainer_pt_utils import LengthGroupedSampler

from conftest import strategy_args
from hftune.training.sampling import ShuffledLengthGroupedSampler

BATCH = 32


@pytest.fixture(scope="module")
def lengths(tweets):
    """Word counts of 3,000 real tweets (a prefix of the corpus: lengths vary as they do in it)."""
    return tweets["text"].str.split().str.len().tolist()[:3000]


def batches(indices, size=BATCH):
    return [indices[i:i + size] for i in range(0, len(indices), size)]


def window_trend(order, lengths, window=23):
    """Mean Spearman correlation of batch position and longest row, over Trainer's mega-batches of `window`."""
    longest = [max(lengths[i] for i in b) for b in batches(order)[:-1]]
    windows = [longest[i:i + window] for i in range(0, len(longest) - window + 1, window)]
    return sum(spearmanr(range(len(w)), w).statistic for w in windows) / len(windows)


def sample(sampler, seed):
    torch.manual_seed(seed)
    return list(sampler)


def test_the_same_batches_as_trainer_in_shuffled_order(lengths):
    grouped = LengthGroupedSampler(BATCH, lengths=lengths)
    trainer, ours = sample(grouped, 0), sample(ShuffledLengthGroupedSampler(grouped), 0)
    assert sorted(ours) == list(range(len(lengths)))  # every row once
    assert sorted(map(sorted, batches(ours))) == sorted(map(sorted, batches(trainer)))  # the same groups
    assert batches(ours)[0] == batches(trainer)[0]  # the longest batch first: an OOM comes at step 1
    assert batches(ours)[-1] == batches(trainer)[-1]  # the partial batch stays last (3000 = 93 x 32 + 24)
    # Trainer walks each mega-batch (23 batches here) from its longest batch to its shortest; in hftune's
    # order the batch lengths are unrelated to the position within those same windows.
    assert window_trend(trainer, lengths) < -0.95
    assert abs(window_trend(ours, lengths)) < 0.3
    # padding stays as low as Trainer's: the same batches
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches(ours))
    assert padded / sum(lengths) < 1.1
    assert sample(ShuffledLengthGroupedSampler(grouped), 0) == ours  # the seed decides
    assert sample(ShuffledLengthGroupedSampler(grouped), 1) != ours


@pytest.mark.parametrize("size", [5, 32, 40])
def test_small_datasets(size):
    lengths = list(range(1, size + 1))
    order = sample(ShuffledLengthGroupedSampler(LengthGroupedSampler(BATCH, lengths=lengths)), 0)
    assert sorted(order) == list(range(size))
    assert lengths[order[0]] == size


@pytest.mark.parametrize("engine", ["trainer", "accelerate"])
def test_both_engines_train_on_shuffled_length_groups(engine, tiny_bert, tweets_csv, tmp_path):
    from hftune.config import parse_config
    from hftune.run import setup

    args = strategy_args(tiny_bert, tmp_path / "out", *tweets_csv, engine=engine, train_sampling_strategy="group_by_length")
    trainer, bundle, _ = setup(*parse_config(args))
    torch.manual_seed(0)
    if engine == "trainer":
        loader = trainer.get_train_dataloader()
    else:
        loader = trainer._dataloader(bundle.train_dataset, training=True)
    widths = [batch["input_ids"].shape[1] for batch in loader]
    real = sum(len(row["input_ids"]) for row in bundle.train_dataset)
    batch = trainer.args.per_device_train_batch_size
    padded = sum(width * batch for width in widths[:-1]) + widths[-1] * (len(bundle.train_dataset) % batch or batch)
    assert padded / real < 1.15  # grouped: little padding
    assert widths[0] == max(widths)  # the longest batch first
    # Trainer walks its 4 mega-batches (5 batches each here) from long to short: at most 3 rises in a row of 20
    rises = sum(later > earlier for earlier, later in zip(widths, widths[1:]))
    assert rises >= 6
