"""Which samples each process sees, and with which randomness: DeiT's repeated-augmentation
sampler (Hoffer et al. 2020; Berman et al. 2019), evaluation shards, and per-sample seeds."""
import itertools
import math
import operator
import random
from contextlib import contextmanager
from typing import Iterator, Tuple

import numpy as np
import torch

from utils import NUMPY_SEED_MODULUS


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


def sample_seed(seed: int, epoch: int, rank: int, position: int) -> int:
    """A 64-bit seed for the sample at ``position`` of ``rank``'s stream in ``epoch``."""
    words = np.random.SeedSequence([seed % 2 ** 64, epoch, rank, position]).generate_state(2)
    return int(words[0]) << 32 | int(words[1])


class SeededSampler(torch.utils.data.Sampler):
    """Pairs every index of ``sampler`` with that sample's random seed (see ``SeededDataset``).

    Each data-loader worker otherwise draws augmentations from its own random stream, seeded
    when the worker starts: the result then depends on which worker loads a sample and, with
    persistent workers, on every epoch the worker has served, so that a resumed run would see
    other augmentations than an uninterrupted one. Seeds drawn from (seed, epoch, rank,
    position) make the augmentation of every sample a function of its place in the run, with
    any number of workers, persistent or not, and across a resume.
    """

    def __init__(self, sampler: torch.utils.data.Sampler, seed: int, rank: int):
        self.sampler = sampler
        self.seed = seed
        self.rank = rank
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0):
        """Selects the seeds (and the wrapped sampler's shuffle, if it has epochs) of ``epoch``,
        and where its pass begins: ``start`` > 0 skips the first positions (a run resumed inside
        the epoch), the others keep their indices and seeds."""
        if not 0 <= start <= len(self.sampler):
            raise ValueError(f'start {start} is outside the {len(self.sampler)} positions')
        self.epoch = epoch
        self.start = start
        if hasattr(self.sampler, 'set_epoch'):
            self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        positions = itertools.islice(enumerate(self.sampler), self.start, None)
        for position, index in positions:
            yield index, sample_seed(self.seed, self.epoch, self.rank, position)

    def __len__(self) -> int:
        return len(self.sampler) - self.start


def build_train_sampler(dataset: torch.utils.data.Dataset, *, num_replicas: int, rank: int,
                        repeated_aug: bool, seed: int) -> torch.utils.data.Sampler:
    """The training sampler of process ``rank`` of ``num_replicas`` (1 for a single process):
    ``RASampler`` with repeated augmentation, as the release used even for one process, else a
    shuffling ``DistributedSampler``. Both shuffle with ``seed + epoch``, so an epoch's order can
    be rebuilt when a run resumes inside it."""
    if repeated_aug:
        return RASampler(len(dataset), num_replicas=num_replicas, rank=rank, shuffle=True,
                         seed=seed)
    return torch.utils.data.DistributedSampler(dataset, num_replicas=num_replicas, rank=rank,
                                               shuffle=True, seed=seed)


@contextmanager
def seeded_random_state(seed: int):
    """Seeds python ``random``, numpy and torch's CPU generator for the block, then restores them,
    so that the stream of the process around it (Mixup, dropout) is left as it was.

    In a data-loader worker nothing else draws from these generators, and every sample seeds
    them afresh: the restore (a third of a millisecond, mostly numpy's) is skipped there.
    """
    in_worker = torch.utils.data.get_worker_info() is not None
    saved = None if in_worker else (random.getstate(), np.random.get_state(), torch.get_rng_state())
    random.seed(seed)
    np.random.seed(seed % NUMPY_SEED_MODULUS)
    torch.default_generator.manual_seed(seed)  # not torch.manual_seed: it reseeds CUDA too
    try:
        yield
    finally:
        if saved is not None:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.set_rng_state(saved[2])


class SeededDataset(torch.utils.data.Dataset):
    """``dataset`` indexed by the ``(index, seed)`` pairs of a ``SeededSampler``: each sample is
    loaded and augmented with the random generators seeded by its own seed."""

    def __init__(self, dataset: torch.utils.data.Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: Tuple[int, int]):
        index, seed = item
        with seeded_random_state(seed):
            return self.dataset[index]
