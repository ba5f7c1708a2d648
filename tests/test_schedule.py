"""The keep-rate schedule (SPEC 2): engine.keep_rate_at, and what train_one_epoch feeds the model."""
import math
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import engine  # noqa: E402


def spec_keep_rate(it, iters, start, shrink, base):
    """SPEC 2, written out independently of engine.py."""
    epoch = it // iters
    if epoch < start:
        return 1.0
    if epoch >= start + shrink:
        return base
    phase = math.pi * (it - iters * start) / (iters * shrink)
    return base + (1.0 - base) * (math.cos(phase) + 1.0) / 2.0


CASES = [
    # (iters_per_epoch, shrink_start_epoch, shrink_epochs, base_keep_rate)
    (7, 2, 3, 0.7),
    (1, 0, 4, 0.5),     # one iteration per epoch
    (1, 3, 1, 0.7),
    (5, 0, 0, 0.7),     # no shrinking: the base rate from epoch 0
    (5, 3, 0, 0.6),     # jump from 1 to the base rate at epoch 3
    (4, 0, 1, 0.25),
    (3, 10, 100, 0.7),  # the release's defaults (scaled down I)
    (6, 1, 2, 1.0),     # base rate 1: always 1
]


@pytest.mark.parametrize('iters,start,shrink,base', CASES)
def test_keep_rate_at_matches_spec_at_every_iteration(iters, start, shrink, base):
    total_epochs = start + shrink + 3
    for it in range(iters * total_epochs):
        got = engine.keep_rate_at(it, iters_per_epoch=iters, base_keep_rate=base,
                                  shrink_start_epoch=start, shrink_epochs=shrink)
        want = spec_keep_rate(it, iters, start, shrink, base)
        assert got == pytest.approx(want, rel=1e-12, abs=1e-12), (it, got, want)


@pytest.mark.parametrize('iters,start,shrink,base', [c for c in CASES if c[2] > 0])
def test_keep_rate_boundaries(iters, start, shrink, base):
    rate = partial(engine.keep_rate_at, iters_per_epoch=iters, base_keep_rate=base,
                   shrink_start_epoch=start, shrink_epochs=shrink)
    # Before the shrink starts: exactly 1; at its first iteration the cosine is at its top.
    for it in range(iters * start):
        assert rate(it) == 1.0
    assert rate(iters * start) == pytest.approx(1.0, abs=1e-15)
    # Last iteration of the shrink phase: still above the base (unless base is 1).
    last = iters * (start + shrink) - 1
    expected_last = base + (1 - base) * (math.cos(math.pi * (last - iters * start)
                                                   / (iters * shrink)) + 1) / 2
    assert rate(last) == pytest.approx(expected_last, rel=1e-12)
    if base < 1:
        assert rate(last) > base
    # From epoch start + shrink on: exactly the base rate.
    for it in range(iters * (start + shrink), iters * (start + shrink + 2)):
        assert rate(it) == base
    # Non-increasing over the whole run.
    values = [rate(it) for it in range(iters * (start + shrink + 2))]
    assert all(a >= b - 1e-15 for a, b in zip(values, values[1:]))


def test_keep_rate_midpoint_and_known_values():
    # Halfway through the shrink: exactly halfway between 1 and the base.
    assert engine.keep_rate_at(10 * 2 + 15, 10, 0.7, 2, 3) == pytest.approx(0.85, rel=1e-12)
    # I=1, E=2: epoch S -> 1, epoch S+1 -> cos(pi/2) -> (1+b)/2, epoch S+2 -> b.
    assert engine.keep_rate_at(5, 1, 0.5, 5, 2) == pytest.approx(1.0)
    assert engine.keep_rate_at(6, 1, 0.5, 5, 2) == pytest.approx(0.75, rel=1e-12)
    assert engine.keep_rate_at(7, 1, 0.5, 5, 2) == 0.5
    # --shrink_epochs 0: 1 before S, b from the first iteration of epoch S.
    assert engine.keep_rate_at(3 * 4 - 1, 4, 0.7, 3, 0) == 1.0
    assert engine.keep_rate_at(3 * 4, 4, 0.7, 3, 0) == 0.7


class RecordingModel(nn.Module):
    """Stub classifier that records the keep_rate keyword of every call."""

    def __init__(self, in_features=12, num_classes=3):
        super().__init__()
        self.fc = nn.Linear(in_features, num_classes)
        self.calls = []

    def forward(self, x, **kwargs):
        self.calls.append(dict(kwargs, training=self.training))
        return self.fc(x.flatten(1))


def _loader(num_batches, batch_size=4, in_features=12, num_classes=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch_size, in_features, generator=generator),
             torch.randint(0, num_classes, (batch_size,), generator=generator))
            for _ in range(num_batches)]


def _criterion(samples, outputs, targets):
    # train_one_epoch calls criterion(samples, outputs, targets) like DeiT's DistillationLoss.
    return F.cross_entropy(outputs, targets)


def _train_epochs(model, loader, epochs, schedule, set_training_mode=True):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler('cpu', enabled=False)
    stats = []
    for epoch in range(epochs):
        stats.append(engine.train_one_epoch(
            model, _criterion, loader, optimizer, torch.device('cpu'), epoch, scaler,
            keep_rate_schedule=schedule, set_training_mode=set_training_mode, print_freq=1000))
    return stats


@pytest.mark.parametrize('iters,start,shrink,base', [(5, 1, 2, 0.7), (1, 0, 3, 0.5),
                                                     (3, 2, 0, 0.6), (4, 0, 1, 0.7)])
def test_train_one_epoch_passes_the_schedule_to_the_model(iters, start, shrink, base):
    epochs = start + shrink + 2
    model = RecordingModel()
    schedule = partial(engine.keep_rate_at, iters_per_epoch=iters, base_keep_rate=base,
                       shrink_start_epoch=start, shrink_epochs=shrink)
    stats = _train_epochs(model, _loader(iters), epochs, schedule)

    received = [call['keep_rate'] for call in model.calls]
    expected = [spec_keep_rate(it, iters, start, shrink, base) for it in range(iters * epochs)]
    assert len(received) == len(expected)  # one model call per training step
    assert received == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert all(call['training'] for call in model.calls)
    # The epoch's stats carry the rate reached at its end (used by the evaluation after it).
    for epoch, epoch_stats in enumerate(stats):
        assert epoch_stats['keep_rate'] == pytest.approx(
            spec_keep_rate((epoch + 1) * iters - 1, iters, start, shrink, base), rel=1e-12)


def test_no_schedule_passes_no_keep_rate():
    # Plain timm models (the DeiT baselines) take no keep_rate argument.
    model = RecordingModel()
    stats = _train_epochs(model, _loader(3), 2, None)
    assert len(model.calls) == 6
    assert all('keep_rate' not in call for call in model.calls)
    assert 'keep_rate' not in stats[-1]


def test_finetune_mode_keeps_model_in_eval_mode():
    model = RecordingModel()
    schedule = partial(engine.keep_rate_at, iters_per_epoch=2, base_keep_rate=0.7,
                       shrink_start_epoch=0, shrink_epochs=0)
    _train_epochs(model, _loader(2), 1, schedule, set_training_mode=False)
    assert [call['keep_rate'] for call in model.calls] == [0.7, 0.7]
    assert not any(call['training'] for call in model.calls)


def test_evaluate_passes_the_given_rate_or_none():
    model = RecordingModel()
    loader = _loader(2)
    engine.evaluate(loader, model, torch.device('cpu'), keep_rate=0.8)
    assert [call['keep_rate'] for call in model.calls] == [0.8, 0.8]
    assert not any(call['training'] for call in model.calls)
    model.calls.clear()
    stats = engine.evaluate(loader, model, torch.device('cpu'))
    assert all('keep_rate' not in call for call in model.calls)
    assert stats['num_samples'] == 8
