"""Tests for samplers: RASampler, and the per-sample seeds of the training loader."""
import math
import random
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from samplers import RASampler, SeededDataset, SeededSampler, sample_seed  # noqa: E402

DATASET_SIZES = (1, 7, 100, 255, 256, 1000)
REPLICA_COUNTS = (1, 2, 3, 8)


def all_ranks(dataset_len, num_replicas, epoch=0, **options):
    """The index lists every rank yields for ``epoch``."""
    shares = []
    for rank in range(num_replicas):
        sampler = RASampler(dataset_len, num_replicas, rank, **options)
        sampler.set_epoch(epoch)
        shares.append(list(sampler))
    return shares


@pytest.mark.parametrize('dataset_len', DATASET_SIZES)
@pytest.mark.parametrize('num_replicas', REPLICA_COUNTS)
def test_every_rank_gets_an_equal_non_empty_share(dataset_len, num_replicas):
    shares = all_ranks(dataset_len, num_replicas)
    expected = math.ceil(dataset_len / num_replicas)
    assert expected > 0
    for rank, share in enumerate(shares):
        assert len(share) == expected
        assert len(RASampler(dataset_len, num_replicas, rank)) == expected
        assert all(0 <= index < dataset_len for index in share)


@pytest.mark.parametrize('dataset_len', DATASET_SIZES)
@pytest.mark.parametrize('num_replicas', REPLICA_COUNTS)
def test_union_of_ranks_is_a_prefix_of_the_epoch_permutation(dataset_len, num_replicas):
    # The ranks together take the first num_replicas * ceil(n / num_replicas) entries of the
    # repeated permutation: ceil(that / 3) distinct images, each seen 3 times (DeiT's design:
    # an epoch has ~n samples, ~n/3 distinct). That count is <= 3n exactly when the list
    # needs no cycling, which holds for n >= (num_replicas - 1) / 2 (so for every n >= 4 here).
    num_repeats = 3
    shares = all_ranks(dataset_len, num_replicas, epoch=5, seed=11, num_repeats=num_repeats)
    taken = num_replicas * math.ceil(dataset_len / num_replicas)
    generator = torch.Generator()
    generator.manual_seed(11 + 5)
    permutation = torch.randperm(dataset_len, generator=generator).tolist()
    counts = Counter(index for share in shares for index in share)
    if taken <= num_repeats * dataset_len:
        distinct = math.ceil(taken / num_repeats)
        assert set(counts) == set(permutation[:distinct])
        assert max(counts.values()) <= num_repeats
        assert sum(count == num_repeats for count in counts.values()) == taken // num_repeats
    else:
        # More slots than repeated entries (here only n=1 on 8 ranks): the list is cycled, and
        # every index is used, evenly up to one extra round of repeats.
        assert set(counts) == set(range(dataset_len))
        rounds = math.ceil(taken / (num_repeats * dataset_len))
        assert max(counts.values()) <= num_repeats * rounds


@pytest.mark.parametrize('dataset_len', DATASET_SIZES)
@pytest.mark.parametrize('num_replicas', REPLICA_COUNTS)
def test_without_repeats_every_index_is_covered_each_epoch(dataset_len, num_replicas):
    shares = all_ranks(dataset_len, num_replicas, epoch=2, num_repeats=1)
    counts = Counter(index for share in shares for index in share)
    assert set(counts) == set(range(dataset_len))
    # Padding up to num_replicas * ceil(n / num_replicas) reuses at most num_replicas - 1 indices.
    assert sum(counts.values()) - dataset_len == num_replicas * math.ceil(dataset_len / num_replicas) - dataset_len
    assert max(counts.values()) <= math.ceil(num_replicas * math.ceil(dataset_len / num_replicas) / dataset_len)


def test_copies_of_an_image_go_to_consecutive_ranks():
    shares = all_ranks(300, 4, epoch=0, num_repeats=3)
    interleaved = [shares[position % 4][position // 4] for position in range(300)]
    for start in range(0, 300, 3):
        assert len(set(interleaved[start:start + 3])) == 1
    assert len(set(shares[0][:10])) == 10


def test_set_epoch_changes_order_deterministically():
    sampler = RASampler(100, 2, 1, seed=3)
    sampler.set_epoch(0)
    epoch0 = list(sampler)
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert epoch0 != epoch1
    assert sorted(epoch0) != sorted(epoch1)
    sampler.set_epoch(0)
    assert list(sampler) == epoch0

    twin = RASampler(100, 2, 1, seed=3)
    twin.set_epoch(1)
    assert list(twin) == epoch1
    other_seed = RASampler(100, 2, 1, seed=4)
    other_seed.set_epoch(1)
    assert list(other_seed) != epoch1


def test_no_shuffle_is_sequential_repeats():
    shares = all_ranks(10, 2, num_repeats=3, shuffle=False)
    assert shares == [[0, 0, 1, 2, 2], [0, 1, 1, 2, 3]]
    assert list(RASampler(4, 1, 0, shuffle=False, num_repeats=2)) == [0, 0, 1, 1]


def test_works_with_a_dataloader():
    dataset = torch.utils.data.TensorDataset(torch.arange(10))
    sampler = RASampler(len(dataset), 1, 0, seed=0)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, sampler=sampler)
    values = torch.cat([batch[0] for batch in loader]).tolist()
    assert values == list(sampler) and len(values) == 10


@pytest.mark.parametrize('arguments,message', [
    (dict(dataset_len=10, num_replicas=2, rank=2), 'rank'),
    (dict(dataset_len=10, num_replicas=2, rank=-1), 'rank'),
    (dict(dataset_len=10, num_replicas=0, rank=0), 'num_replicas'),
    (dict(dataset_len=10, num_replicas=1, rank=0, num_repeats=0), 'num_repeats'),
    (dict(dataset_len=0, num_replicas=1, rank=0), 'dataset_len'),
])
def test_invalid_arguments_raise_value_error(arguments, message):
    with pytest.raises(ValueError, match=message):
        RASampler(**arguments)


# --- per-sample seeds -------------------------------------------------------------------------

class _RandomValues(torch.utils.data.Dataset):
    """Each item draws from python random, numpy and torch: what an augmentation does."""

    def __len__(self):
        return 12

    def __getitem__(self, index):
        return index, random.random(), float(np.random.rand()), float(torch.rand(()))


def _draws(num_workers, persistent, epochs=(0, 1), seed=5):
    sampler = SeededSampler(RASampler(12, num_replicas=1, rank=0, seed=seed), seed=seed, rank=0)
    loader = torch.utils.data.DataLoader(SeededDataset(_RandomValues()), sampler=sampler,
                                         batch_size=4, num_workers=num_workers,
                                         persistent_workers=persistent)
    draws = {}
    for epoch in epochs:
        sampler.set_epoch(epoch)
        draws[epoch] = [column.tolist() for batch in loader for column in batch]
    return draws


def test_seeded_samples_do_not_depend_on_workers_or_their_history():
    in_process = _draws(num_workers=0, persistent=False)
    assert _draws(num_workers=2, persistent=True) == in_process
    # A resumed run starts at epoch 1 with fresh workers: the same draws as the long-lived ones.
    assert _draws(num_workers=2, persistent=True, epochs=(1,))[1] == in_process[1]
    assert in_process[0] != in_process[1]  # other epoch, other shuffle and other draws


def test_sample_seeds_differ_by_position_epoch_rank_and_seed():
    seeds = {sample_seed(seed, epoch, rank, position)
             for seed in (0, 1) for epoch in (0, 1) for rank in (0, 1) for position in range(8)}
    assert len(seeds) == 2 * 2 * 2 * 8
    assert sample_seed(3, 2, 1, 7) == sample_seed(3, 2, 1, 7)
    assert 0 <= sample_seed(-1, 0, 0, 0) < 2 ** 64


def test_seeded_dataset_leaves_the_callers_random_streams_alone():
    dataset = SeededDataset(_RandomValues())
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    expected = (random.random(), float(np.random.rand()), float(torch.rand(())))
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    first = dataset[(3, 123)]
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == expected
    assert dataset[(3, 123)] == first  # the seed decides the draws
    assert dataset[(3, 124)][1:] != first[1:]


def test_seeded_sampler_forwards_the_epoch():
    inner = RASampler(10, num_replicas=2, rank=1, seed=0)
    sampler = SeededSampler(inner, seed=0, rank=1)
    sampler.set_epoch(4)
    assert inner.epoch == 4 and len(sampler) == len(inner)
    assert [index for index, _ in sampler] == list(inner)
