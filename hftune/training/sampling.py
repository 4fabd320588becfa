"""Length-grouped batches in shuffled order: hftune's `train_sampling_strategy: group_by_length`.

Trainer's LengthGroupedSampler permutes the rows, cuts them into mega-batches of up to 50 batches
and sorts each mega-batch by length, so every mega-batch is walked from its longest batch to its
shortest. That length curriculum feeds label-skewed stretches of batches wherever length and label
go together (in the tweet corpus 64% of the longest quarter is negative, 46% of the shortest
quarter neutral). hftune keeps Trainer's
grouping (the same padding saving, the longest batch first so an out-of-memory error comes at
step 1) and shuffles the order of the other batches.
"""

import torch
from torch.utils.data import Sampler
from transformers.trainer_pt_utils import LengthGroupedSampler


class ShuffledLengthGroupedSampler(Sampler):
    """Wraps a LengthGroupedSampler: the same batches, the first one first, the rest in random order
    (torch's global RNG unless the wrapped sampler has a generator, as Trainer's)."""

    def __init__(self, grouped: LengthGroupedSampler):
        self.grouped = grouped

    def __len__(self):
        return len(self.grouped)

    def __iter__(self):
        indices, size = list(self.grouped), self.grouped.batch_size
        full = len(indices) // size  # a last, partial batch stays last: moving it would shift every later batch
        rest = (torch.randperm(full - 1, generator=self.grouped.generator) + 1).tolist() if full > 1 else []
        order = [0, *rest] if full else []
        return iter([i for b in order for i in indices[b * size:(b + 1) * size]] + indices[full * size:])


def shuffle_batches(sampler):
    """`sampler` with its batches shuffled when it is a LengthGroupedSampler; any other sampler as it is."""
    return ShuffledLengthGroupedSampler(sampler) if isinstance(sampler, LengthGroupedSampler) else sampler
