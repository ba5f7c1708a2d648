"""Repeated-augmentation sampler (Hoffer et al. 2020; Berman et al. 2019) as used by DeiT."""
import math
import operator

import torch


class RASampler(torch.utils.data.Sampler):
    """Distributed sampler with repeated augmentation, one instance per process.

    Each epoch, the indices ``0..dataset_len-1`` are shuffled (``torch.randperm`` seeded with
    ``seed + epoch``, or left in order when ``shuffle`` is False) and every index is repeated
    ``num_repeats`` times in a row; that list is cycled if it is shorter than needed. Process
    ``rank`` takes every ``num_replicas``-th entry starting at position ``rank``, so the copies of
    one image land on consecutive ranks and get different random augmentations.

    Epoch length: ``ceil(dataset_len / num_replicas)`` samples per process, the same on every
    process and never zero. DeiT's release yields ``floor(dataset_len // 256 * 256 / num_replicas)``
    instead, which is 0 below 256 images (no training at all) and drops up to 255 images an
    epoch. Like DeiT, one epoch still visits about ``dataset_len`` samples in total across the
    processes, i.e. about ``dataset_len / num_repeats`` distinct images each seen ``num_repeats``
    times; the next epochs' reshuffles reach the others. With ``num_repeats=1`` every index is
    visited in every epoch.
    """

    def __init__(self, dataset_len, num_replicas, rank, shuffle=True, seed=0, num_repeats=3):
        dataset_len = operator.index(dataset_len)
        num_replicas = operator.index(num_replicas)
        rank = operator.index(rank)
        num_repeats = operator.index(num_repeats)
        if dataset_len < 1:
            raise ValueError(f'dataset_len must be at least 1, got {dataset_len}')
        if num_replicas < 1:
            raise ValueError(f'num_replicas must be at least 1, got {num_replicas}')
        if not 0 <= rank < num_replicas:
            raise ValueError(f'rank must be in [0, {num_replicas - 1}], got {rank}')
        if num_repeats < 1:
            raise ValueError(f'num_repeats must be at least 1, got {num_repeats}')
        self.dataset_len = dataset_len
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.seed = seed
        self.num_repeats = num_repeats
        self.epoch = 0
        self.num_samples = math.ceil(dataset_len / num_replicas)

    def set_epoch(self, epoch):
        """Select the shuffle of ``epoch``; identical on every process for the same seed."""
        self.epoch = epoch

    def __iter__(self):
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.dataset_len, generator=generator)
        else:
            order = torch.arange(self.dataset_len)
        repeated = torch.repeat_interleave(order, self.num_repeats)
        # Only the first num_replicas * num_samples positions are ever taken; when the dataset
        # is tiny (fewer repeated entries than processes), cycling keeps every share non-empty.
        needed = self.num_replicas * self.num_samples
        if len(repeated) < needed:
            repeated = repeated.repeat(math.ceil(needed / len(repeated)))
        return iter(repeated[self.rank:needed:self.num_replicas].tolist())

    def __len__(self):
        return self.num_samples


class ShardSampler(torch.utils.data.Sampler):
    """Evaluation shard of one process: indices ``rank, rank + num_replicas, ...`` in order.

    Unlike ``DistributedSampler`` it pads nothing, so the shards are disjoint and together hold
    every sample exactly once; sums over the processes then equal a single-process evaluation.
    """

    def __init__(self, dataset_len, num_replicas, rank):
        if not 0 <= rank < num_replicas:
            raise ValueError(f'rank must be in [0, {num_replicas - 1}], got {rank}')
        self.indices = range(rank, dataset_len, num_replicas)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)
