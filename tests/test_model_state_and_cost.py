"""Tests of the MTViT model's parameters and cost (``models_mtvit.py``): the original release's
state-dict keys and shapes, initialisation, weight decay, a training step's gradients, no host
synchronisation or per-sample/per-token Python loops in forward, FLOPs, and the mapping of a DeiT
state dict onto a multi-scale model. (Forward against the slow reference: tests/test_models.py.)

Run: ``python -m pytest tests/test_model_state_and_cost.py -q`` from the repository root.
"""
import math
import os
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mtvit_reference import (LN_EPS, DispatchRecorder, images, make_model, reduction_sizes,
                             release_keys, release_shapes, tiny_kwargs)

# Imported here, not inside the tests: a missing module or a renamed function fails, never skips.
import models_mtvit  # noqa: F401  (registers the models with timm)
import timm
from checkpoints import adapt_state_dict
from matmul_ops import cuda_forms
from op_costs import count_flops

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


# ---------------------------------------------------------------------------------------------
# State-dict keys of the release
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('multi_scale', [False, True])
def test_release_state_dict_keys(multi_scale):
    depth, dim, img, patch, classes = 5, 32, 64, 16, 9
    model = timm.create_model('deit_small_patch16_shrink_base', pretrained=False, depth=depth,
                              embed_dim=dim, num_heads=2, img_size=img, num_classes=classes,
                              drop_loc=(3, 4), multi_scale=multi_scale)
    keys = release_keys(depth, multi_scale)
    assert len(keys) == len(set(keys))
    model_keys = list(model.state_dict().keys())
    assert sorted(model_keys) == sorted(keys), (
        f'extra: {sorted(set(model_keys) - set(keys))}, missing: {sorted(set(keys) - set(model_keys))}')
    shapes = release_shapes(depth, multi_scale, dim, img // patch, patch, classes, 4 * dim)
    assert set(shapes) == set(keys)
    gen = torch.Generator().manual_seed(0)
    checkpoint = {k: torch.randn(shapes[k], generator=gen) for k in keys}
    result = model.load_state_dict(checkpoint, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    loaded = model.state_dict()
    for k in keys:
        assert torch.equal(loaded[k], checkpoint[k]), k


# ---------------------------------------------------------------------------------------------
# 6. Initialisation and weight decay
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('multi_scale', [False, True])
def test_init(multi_scale):
    torch.manual_seed(11)
    model = timm.create_model('deit_tiny_patch16_shrink_base', pretrained=False, depth=4,
                              img_size=64, num_classes=50, multi_scale=multi_scale,
                              drop_loc=(3,))
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 4 * 4 + 1
    weights = torch.cat([m.weight.detach().flatten() for m in linears])
    assert abs(weights.std().item() - 0.02) < 0.0005
    assert abs(weights.mean().item()) < 0.0005
    assert weights.abs().max().item() <= 2.0  # timm's trunc_normal_ bounds
    kurtosis = (((weights - weights.mean()) / weights.std()) ** 4).mean().item()
    assert 2.7 < kurtosis < 3.3, 'Linear weights should be (truncated) normal, not uniform'
    for m in linears:
        assert abs(m.weight.std().item() - 0.02) < 0.004
        assert m.bias is not None and torch.count_nonzero(m.bias) == 0
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) == 2 * 4 + 1
    for m in norms:
        assert m.eps == LN_EPS
        assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    pos = list(model.pos_embed_list) if multi_scale else [model.pos_embed]
    for p in pos + [model.cls_token]:
        assert torch.count_nonzero(p) == p.numel()
    all_pos = torch.cat([p.detach().flatten() for p in pos])
    assert abs(all_pos.std().item() - 0.02) < 0.002
    assert 0.015 < model.cls_token.std().item() < 0.025
    # convolutions keep PyTorch's default (kaiming-uniform, a=sqrt(5)) init: |w| <= 1/sqrt(fan_in)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == (5 if multi_scale else 1)
    for conv in convs:
        fan_in = conv.weight[0].numel()
        bound = 1 / math.sqrt(fan_in)
        assert conv.weight.abs().max().item() <= bound + 1e-7
        assert conv.weight.std().item() > 0.4 * bound  # not a tiny trunc_normal(0.02)


@pytest.mark.parametrize('multi_scale', [False, True])
def test_no_weight_decay(multi_scale):
    model = timm.create_model('deit_tiny_patch16_shrink_base', pretrained=False, depth=4,
                              embed_dim=32, num_heads=2, img_size=64, num_classes=5,
                              multi_scale=multi_scale, drop_loc=(3,))
    names = set(model.no_weight_decay())
    pos_names = {'pos_embed_list.0', 'pos_embed_list.1'} if multi_scale else {'pos_embed'}
    assert {'cls_token'} | pos_names <= names
    param_names = dict(model.named_parameters())
    for n in names:
        assert n in param_names, f'no_weight_decay names {n!r}, which is not a parameter'
    # End to end through timm's optimizer factory (what main.py uses).
    from timm.optim import create_optimizer_v2
    optimizer = create_optimizer_v2(model, 'adamw', lr=1e-3, weight_decay=0.05)
    decay_of = {}
    for group in optimizer.param_groups:
        for p in group['params']:
            decay_of[id(p)] = group['weight_decay']
    for name, p in param_names.items():
        no_decay = (name in {'cls_token'} | pos_names or name.endswith('.bias')
                    or '.norm' in name or name.startswith('norm.'))
        assert decay_of[id(p)] == (0. if no_decay else 0.05), name


# ---------------------------------------------------------------------------------------------
# 7. Training
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('multi_scale', [False, True])
def test_training_step_gradients(multi_scale):
    kwargs = tiny_kwargs(patch_size=16, img_size=64, drop_loc=(3, 4), base_keep_rate=0.5,
                         multi_scale=multi_scale, drop_path_rate=0.1, drop_rate=0.1)
    model = make_model(seed=7, double=False, train=True, **kwargs)
    x = images(2, 64, seed=9, double=False)
    target = torch.tensor([1, 3])
    logits, reductions = model(x, keep_rate=0.6, get_idx=True)
    assert reduction_sizes(reductions) == [(10, 16), (math.ceil(0.6 * 10), 10)]
    loss = F.cross_entropy(logits, target)
    assert torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f'{name} got no gradient'
        assert torch.isfinite(p.grad).all(), f'{name} has a non-finite gradient'
    # batch size 1, training mode, configured rates and a per-call rate
    model.zero_grad()
    for keep_rate in (None, 0.8):
        out = model(x[:1], keep_rate=keep_rate)
        assert out.shape == (1, 7)
        F.cross_entropy(out, target[:1]).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


# ---------------------------------------------------------------------------------------------
# No host synchronisation and no Python loops over samples or tokens
# ---------------------------------------------------------------------------------------------

def _dispatched_ops(model, x, **kwargs):
    with torch.no_grad(), DispatchRecorder(lambda func, args, out: str(func)) as recorder:
        model(x, **kwargs)
    return recorder.records


SYNC_OPS = ('aten._local_scalar_dense', 'aten.nonzero', 'aten.masked_select', 'aten.unique',
            'aten._unique', 'aten.item', 'aten.equal', 'aten.is_nonzero')


@pytest.mark.parametrize('multi_scale', [False, True])
def test_no_host_sync_and_no_loops_over_samples_or_tokens(multi_scale):
    def build(img):
        return make_model(seed=8, double=False, **tiny_kwargs(
            patch_size=16, img_size=img, drop_loc=(3, 4), base_keep_rate=0.5,
            multi_scale=multi_scale))
    small, large = build(64), build(96)
    # (batch 1 is avoided: reshapes of a batch of one may dispatch view instead of copy)
    ops_b2 = _dispatched_ops(small, images(2, 64, double=False))
    ops_b3 = _dispatched_ops(small, images(3, 64, double=False))
    ops_large = _dispatched_ops(large, images(3, 96, double=False))
    sync = sorted({op for op in ops_b3 if op.startswith(SYNC_OPS)})
    assert not sync, f'host synchronisation inside forward: {sync}'
    assert ops_b2 == ops_b3, 'op count depends on the batch size (loop over samples?)'
    assert ops_b3 == ops_large, 'op count depends on the token count (loop over tokens?)'


@pytest.mark.parametrize('multi_scale', [False, True])
def test_no_host_sync_in_a_training_step_in_the_cuda_forms(multi_scale):
    # speed_test's training step, forward and backward under bf16 autocast, in the forms a CUDA
    # device runs: on the CPU, ahead of tests/test_cuda.py's check on a GPU.
    model = make_model(seed=8, double=False, **tiny_kwargs(
        patch_size=16, img_size=64, drop_loc=(3, 4), base_keep_rate=0.5,
        multi_scale=multi_scale)).train()
    with cuda_forms(), DispatchRecorder(lambda func, args, out: str(func)) as recorder:
        with torch.autocast('cpu', dtype=torch.bfloat16):
            loss = F.cross_entropy(model(images(2, 64, double=False)), torch.tensor([0, 1]))
        loss.backward()
    ops = set(recorder.records)
    # The CUDA forms (not the CPU's row additions), and the backward, were recorded.
    assert 'aten.index_add_.default' not in ops and 'aten.gelu_backward.default' in ops, ops
    sync = sorted(op for op in ops if op.startswith(SYNC_OPS))
    assert not sync, f'host synchronisation inside a training step: {sync}'


# ---------------------------------------------------------------------------------------------
# 8. FLOPs (fvcore, per image, 224x224)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name,kwargs,expected', [
    ('deit_small_patch16_224', {}, 4.61e9),
    ('deit_small_patch16_shrink_base', dict(multi_scale=True, base_keep_rate=0.7), 3.10e9),
    ('deit_small_patch16_shrink_base', dict(multi_scale=False, base_keep_rate=0.7), 3.01e9),
])
def test_flops(name, kwargs, expected):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        flops = count_flops(model, 224)
    assert isinstance(flops, float)
    assert abs(flops - expected) / expected < 0.01, f'{name} {kwargs}: {flops / 1e9:.3f} GFLOPs'


# ---------------------------------------------------------------------------------------------
# DeiT checkpoint -> multi-scale MTViT (checkpoints.adapt_state_dict: a rename fails at import)
# ---------------------------------------------------------------------------------------------

def test_deit_state_dict_maps_onto_multi_scale():
    torch.manual_seed(0)
    deit = timm.create_model('deit_tiny_patch16_224', pretrained=False, img_size=128, depth=4,
                             embed_dim=32, num_heads=2, num_classes=5)
    model = timm.create_model('deit_tiny_patch16_shrink_base', pretrained=False, img_size=128,
                              depth=4, embed_dim=32, num_heads=2, num_classes=5,
                              multi_scale=True, drop_loc=(3,))
    source = deit.state_dict()
    adapted, _ = adapt_state_dict(dict(source), model)
    result = model.load_state_dict(adapted, strict=False)
    assert not result.unexpected_keys
    assert sorted(result.missing_keys) == sorted(
        f'{m}.{p}' for m in ('up.peg', 'up.lka.conv0', 'up.lka.conv_spatial', 'up.lka.conv1')
        for p in ('weight', 'bias'))
    pos = source['pos_embed']  # (1, 1 + 8 * 8, 32)
    torch.testing.assert_close(model.pos_embed_list[1].detach(), pos)
    grid = pos[:, 1:].reshape(1, 8, 8, 32).permute(0, 3, 1, 2)
    low = F.interpolate(grid, size=(4, 4), mode='bicubic', align_corners=False)
    expected_low = torch.cat([pos[:, :1], low.permute(0, 2, 3, 1).reshape(1, 16, 32)], dim=1)
    torch.testing.assert_close(model.pos_embed_list[0].detach(), expected_low)
    for key, value in source.items():
        if not key.startswith('pos_embed'):
            assert torch.equal(model.state_dict()[key], value), key
