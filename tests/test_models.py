"""Tests of the MTViT model's forward (``models_mtvit.py``) against the slow float64 reference of
tests/mtvit_reference.py: registry and presets, equivalence with timm's DeiT at keep rate 1, token
mergence, the multi-scale front end at every even grid, per-call keep rates and token counts.
(State dict, initialisation, weight decay, training step, host synchronisation and FLOPs:
tests/test_model_state_and_cost.py.)

Run: ``python -m pytest tests/test_models.py -q`` from the repository root.
"""
import contextlib
import math
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mtvit_reference import (LN_EPS, assert_reductions_equal, images, make_model, ref_bilinear_half_align_corners,
                             ref_forward, ref_merge, reduction_sizes, tiny_kwargs)

import models_mtvit
from matmul_ops import cuda_forms
import multi_scale
import timm

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

MODEL_NAMES = ('deit_tiny_patch16_shrink_base', 'deit_small_patch16_shrink_base',
               'deit_base_patch16_shrink_base')


# ---------------------------------------------------------------------------------------------
# Registry, presets, configuration
# ---------------------------------------------------------------------------------------------

def test_registered_and_timm_names_untouched():
    available = set(timm.list_models())
    for name in MODEL_NAMES:
        assert name in available
    # Plain DeiT baselines still come from timm itself.
    from timm.models.vision_transformer import VisionTransformer
    deit = timm.create_model('deit_small_patch16_224', pretrained=False, num_classes=3,
                             img_size=32, depth=1)
    assert type(deit) is VisionTransformer
    assert not isinstance(deit, models_mtvit.MTViT)


@pytest.mark.parametrize('name,dim,heads', [
    ('deit_tiny_patch16_shrink_base', 192, 3),
    ('deit_small_patch16_shrink_base', 384, 6),
    ('deit_base_patch16_shrink_base', 768, 12),
])
def test_presets(name, dim, heads):
    # depth overridden to 1 to keep construction cheap; the default depth is checked separately.
    model = timm.create_model(name, pretrained=False, depth=1, drop_loc=(0,))
    assert isinstance(model, models_mtvit.MTViT)
    assert model.patch_embed.proj.weight.shape == (dim, 3, 16, 16)
    assert tuple(model.patch_embed.proj.stride) == (16, 16)
    assert model.cls_token.shape == (1, 1, dim)
    assert model.pos_embed.shape == (1, 197, dim)
    assert not hasattr(model, 'dist_token') or model.dist_token is None
    block = model.blocks[0]
    assert block.attn.num_heads == heads
    assert block.attn.qkv.weight.shape == (3 * dim, dim) and block.attn.qkv.bias is not None
    assert block.mlp.fc1.weight.shape == (4 * dim, dim)
    assert isinstance(block.mlp.act, nn.GELU) and block.mlp.act.approximate == 'none'
    for ln in (block.norm1, block.norm2, model.norm):
        assert isinstance(ln, nn.LayerNorm) and ln.eps == LN_EPS
    assert model.head.weight.shape == (1000, dim)


def test_defaults_and_keep_rates():
    model = timm.create_model('deit_tiny_patch16_shrink_base', pretrained=False)
    assert len(model.blocks) == 12
    assert not model.multi_scale
    assert list(model.keep_rates) == [1, 1, 1, 0.7, 1, 1, 0.7, 1, 1, 0.7, 1, 1]
    model = timm.create_model('deit_tiny_patch16_shrink_base', pretrained=False,
                              base_keep_rate=0.5, drop_loc=[0, 2], depth=4, num_classes=3)
    assert list(model.keep_rates) == [0.5, 1, 0.5, 1]
    assert model.head.weight.shape[0] == 3
    direct = models_mtvit.MTViT(embed_dim=32, depth=4, num_heads=2, base_keep_rate=0.6,
                                drop_loc=(1,), img_size=32, num_classes=2)
    assert list(direct.keep_rates) == [1, 0.6, 1, 1]


# ---------------------------------------------------------------------------------------------
# 1. Keep rate 1, single scale: identical to timm's DeiT-S with the same weights
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def deit_small_pair():
    torch.manual_seed(0)
    deit = timm.create_model('deit_small_patch16_224', pretrained=False).eval()
    with torch.no_grad():  # non-trivial norms/biases so that a wiring mistake shows
        for pname, param in deit.named_parameters():
            if pname.endswith('.bias') or 'norm' in pname:
                param.add_(0.05 * torch.randn_like(param))
    state = deit.state_dict()
    mt1 = timm.create_model('deit_small_patch16_shrink_base', pretrained=False,
                            base_keep_rate=1.0).eval()
    mt1.load_state_dict(state, strict=True)
    mt7 = timm.create_model('deit_small_patch16_shrink_base', pretrained=False,
                            base_keep_rate=0.7).eval()
    mt7.load_state_dict(state, strict=True)
    x = images(2, 224, seed=3, double=False)
    with torch.no_grad():
        expected = deit(x)
    return deit, mt1, mt7, x, expected


def test_deit_small_equivalence_keep_rate_1(deit_small_pair):
    _, mt1, _, x, expected = deit_small_pair
    assert list(mt1.keep_rates) == [1.0] * 12
    with torch.no_grad():
        out, reductions = mt1(x, get_idx=True)
    assert reductions == []
    assert out.shape == expected.shape == (2, 1000)
    assert (out - expected).abs().max().item() < 1e-4


def test_deit_small_equivalence_call_time_keep_rate_1(deit_small_pair):
    _, _, mt7, x, expected = deit_small_pair
    with torch.no_grad():
        out, reductions = mt7(x, keep_rate=1.0, get_idx=True)
        reduced = mt7(x)
    assert reductions == []
    assert (out - expected).abs().max().item() < 1e-4
    # Sanity: the configured 0.7 does change the output (the test above is not vacuous).
    assert (reduced - expected).abs().max().item() > 1e-4


# ---------------------------------------------------------------------------------------------
# 2. Token mergence
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('forms', ['cpu', 'cuda'])
@pytest.mark.parametrize('num_patches', [16, 49, 196])
@pytest.mark.parametrize('batch', [1, 3])
@pytest.mark.parametrize('rate', [0.3, 0.5, 0.7, 0.9])
def test_merge_tokens_matches_reference(rate, batch, num_patches, forms):
    dim = 24
    gen = torch.Generator().manual_seed(1000 * batch + num_patches + int(rate * 10))
    x = torch.randn(batch, num_patches + 1, dim, generator=gen, dtype=torch.float64)
    # class attention: a softmax over all N tokens, restricted to the patches (not renormalised)
    scores = torch.randn(batch, num_patches + 1, generator=gen, dtype=torch.float64)
    scores = scores.mul(2).softmax(dim=-1)[:, 1:]
    num_keep = math.ceil(rate * num_patches)
    x_in, scores_in = x.clone(), scores.clone()
    # Row indexing on the CPU, element-wise gather and scatter in the CUDA forms.
    with cuda_forms() if forms == 'cuda' else contextlib.nullcontext():
        out, kept_index, assignment = models_mtvit.merge_tokens(x, scores, num_keep)
    assert torch.equal(x, x_in) and torch.equal(scores, scores_in), 'inputs modified in place'
    assert out.shape == (batch, num_keep + 1, dim)
    assert kept_index.shape == (batch, num_keep) and kept_index.dtype == torch.int64
    assert assignment.shape == (batch, num_patches) and assignment.dtype == torch.int64
    for b in range(batch):
        ref_out, kept, assign = ref_merge(x[b], scores[b], num_keep)
        assert torch.equal(out[b, 0], x[b, 0]), 'class token must pass through unchanged'
        assert kept_index[b].tolist() == kept
        assert assignment[b].tolist() == assign
        torch.testing.assert_close(out[b], ref_out, rtol=1e-10, atol=1e-12)
        # kept tokens in descending score order
        kept_scores = scores[b, kept_index[b]]
        assert bool((kept_scores[:-1] >= kept_scores[1:]).all())


def test_merge_tokens_forms_have_equal_gradients():
    # The CPU's row indexing and the CUDA forms' gather / scatter, through the backward; two
    # prefix tokens, so that the row offsets skip them.
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 2 + 30, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    scores = torch.rand(3, 30, generator=gen, dtype=torch.float64).requires_grad_()
    out_grad = torch.randn(3, 2 + 12, 16, generator=gen, dtype=torch.float64)
    results = []
    for forms in (contextlib.nullcontext(), cuda_forms()):
        with forms:
            out, kept_index, assignment = models_mtvit.merge_tokens(x, scores, 12,
                                                                    num_prefix_tokens=2)
        results.append((out, kept_index, assignment,
                        *torch.autograd.grad(out, (x, scores), out_grad)))
    for name, cpu, cuda in zip(('tokens', 'kept', 'assignment', 'x grad', 'score grad'),
                               *results):
        torch.testing.assert_close(cpu, cuda, rtol=1e-13, atol=1e-13, msg=name)
    assert results[0][4].abs().max() > 1e-3, 'the scores get a gradient'


def test_merge_tokens_hand_made_example():
    # 1 sample, 4 patch tokens in 2-d; scores pick tokens 2 and 0 (in that order).
    x = torch.tensor([[[9., 9.],                 # class token
                       [1., 0.], [0.9, 0.1], [0., 1.], [0.1, 2.]]], dtype=torch.float64)
    s = torch.tensor([[0.2, 0.05, 0.4, 0.1]], dtype=torch.float64)
    out, kept_index, assignment = models_mtvit.merge_tokens(x, s, 2)
    assert kept_index.tolist() == [[2, 0]]
    # token 1 (0.9, 0.1) is closest in angle to token 0 (1, 0) -> position 1;
    # token 3 (0.1, 2) to token 2 (0, 1) -> position 0.
    assert assignment.tolist() == [[1, 1, 0, 0]]
    expected = torch.tensor([[[9., 9.],
                              [(0.4 * 0 + 0.1 * 0.1) / 0.5, (0.4 * 1 + 0.1 * 2) / 0.5],
                              [(0.2 * 1 + 0.05 * 0.9) / 0.25, (0.2 * 0 + 0.05 * 0.1) / 0.25]]],
                            dtype=torch.float64)
    torch.testing.assert_close(out, expected)


def test_kept_tokens_nothing_merges_into_pass_through_exactly():
    # Each token's share of its destination is divided out before the scatter, so a kept token
    # that receives no merged token is itself times w / w = 1: bit-exact, in float32 too
    # (dividing x * w by w afterwards, as before, left 357 of these 384 tokens an ulp off).
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(64, 9, 48, generator=gen)
    scores = torch.rand(64, 8, generator=gen)
    out, kept_index, assignment = models_mtvit.merge_tokens(x, scores, 7)
    patches = x[:, 1:]
    alone = 0
    for b in range(64):
        receives = assignment[b].bincount(minlength=7)
        for position, index in enumerate(kept_index[b].tolist()):
            if receives[position] == 1:
                alone += 1
                assert torch.equal(out[b, 1 + position], patches[b, index])
    assert alone == 64 * 6


def test_merge_uses_cosine_not_dot_product_or_distance():
    # Pruned token p = (10, 1). Kept a = (1, 0) (cosine 0.995, dot 10, distance 9.05);
    # kept b = (3, 3) (cosine 0.78, dot 33, distance 7.3). Cosine picks a; dot and L2 pick b.
    x = torch.tensor([[[0., 0.], [1., 0.], [3., 3.], [10., 1.]]], dtype=torch.float64)
    s = torch.tensor([[0.5, 0.3, 0.1]], dtype=torch.float64)
    _, kept_index, assignment = models_mtvit.merge_tokens(x, s, 2)
    assert kept_index.tolist() == [[0, 1]]
    assert assignment.tolist() == [[0, 1, 0]]


@pytest.mark.parametrize('base_keep_rate,expected_sizes', [
    (0.5, [(25, 49), (13, 25), (7, 13)]),
    (0.7, [(35, 49), (25, 35), (18, 25)]),
])
def test_whole_model_single_scale_matches_reference(base_keep_rate, expected_sizes):
    model = make_model(seed=1, **tiny_kwargs(base_keep_rate=base_keep_rate))
    x = images(3, 56, seed=1)
    with torch.no_grad():
        logits, reductions = model(x, get_idx=True)
    ref_logits, ref_reductions = ref_forward(model, x)
    assert reduction_sizes(reductions) == expected_sizes
    assert_reductions_equal(reductions, ref_reductions)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-9, atol=1e-10)


def test_samples_do_not_interact():
    model = make_model(seed=2, **tiny_kwargs(base_keep_rate=0.6))
    x = images(3, 56, seed=2)
    with torch.no_grad():
        together, red_together = model(x, get_idx=True)
        for b in range(3):
            alone, red_alone = model(x[b:b + 1], get_idx=True)
            torch.testing.assert_close(alone[0], together[b], rtol=1e-9, atol=1e-10)
            for (k1, a1), (k2, a2) in zip(red_alone, red_together):
                assert torch.equal(k1[0], k2[b]) and torch.equal(a1[0], a2[b])


# ---------------------------------------------------------------------------------------------
# 3. Multi-scale front end
# ---------------------------------------------------------------------------------------------

def test_reference_bilinear_matches_torch():
    # Self-check of the written-out bilinear resize of the reference.
    img = images(1, 96, seed=5)[0]
    expected = F.interpolate(img[None], size=(48, 48), mode='bilinear', align_corners=True)[0]
    torch.testing.assert_close(ref_bilinear_half_align_corners(img), expected)


@pytest.mark.parametrize('img_size,batch', [(64, 2), (96, 1)])
def test_multi_scale_matches_reference(img_size, batch):
    model = make_model(seed=3, **tiny_kwargs(patch_size=16, img_size=img_size, drop_loc=(3, 5),
                                             base_keep_rate=0.6, multi_scale=True))
    g = img_size // 16
    assert not hasattr(model, 'pos_embed') or not isinstance(
        getattr(model, 'pos_embed'), nn.Parameter), 'no pos_embed parameter in multi-scale mode'
    assert model.pos_embed_list[0].shape == (1, (g // 2) ** 2 + 1, 32)
    assert model.pos_embed_list[1].shape == (1, g * g + 1, 32)
    # make the fusion convolutions matter
    with torch.no_grad():
        for conv in (model.up.lka.conv0, model.up.lka.conv_spatial, model.up.lka.conv1,
                     model.up.peg):
            conv.weight.mul_(3.)
    x = images(batch, img_size, seed=3)
    with torch.no_grad():
        logits, reductions = model(x, get_idx=True)
    ref_logits, ref_reductions = ref_forward(model, x)
    n = g * g
    k1 = math.ceil(0.6 * n)
    assert reduction_sizes(reductions) == [(k1, n), (math.ceil(0.6 * k1), k1)]
    assert_reductions_equal(reductions, ref_reductions)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-9, atol=1e-10)


def test_multi_scale_samples_do_not_interact():
    model = make_model(seed=4, **tiny_kwargs(patch_size=16, img_size=64, drop_loc=(3, 4),
                                             base_keep_rate=0.5, multi_scale=True))
    x = images(3, 64, seed=4)
    with torch.no_grad():
        together = model(x)
        for b in range(3):
            torch.testing.assert_close(model(x[b:b + 1])[0], together[b], rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize('img_size', [64, 96, 160, 224, 288])
def test_multi_scale_any_even_grid_batch_1_matches_reference(img_size):
    model = make_model(seed=0, embed_dim=16, depth=4, num_heads=2, num_classes=5,
                       img_size=img_size, drop_loc=(3,), base_keep_rate=0.7, multi_scale=True)
    x = images(1, img_size, seed=img_size)
    with torch.no_grad():
        logits, reductions = model(x, get_idx=True)
    ref_logits, ref_reductions = ref_forward(model, x)
    n = (img_size // 16) ** 2
    assert reduction_sizes(reductions) == [(math.ceil(0.7 * n), n)]
    assert_reductions_equal(reductions, ref_reductions)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-9, atol=1e-10)


def test_multi_scale_stochastic_depth_draws_per_sample_and_stream():
    # The front end runs both streams through a block as one tensor; stochastic depth must still
    # drop each stream of each sample on its own draw, as when the streams ran one by one.
    block = models_mtvit.Block(8, 2, drop_path=0.5).train()
    num_low, num_high, batch = 5, 17, 400
    torch.manual_seed(0)
    out = multi_scale.drop_path_streams(block, torch.ones(batch, num_low + num_high, 8), num_low)
    low, high = out[:, :num_low], out[:, num_low:]
    for stream in (low, high):
        kept = stream[:, 0, 0]
        assert set(kept.unique().tolist()) == {0., 2.}  # dropped, or kept and scaled by 1 / 0.5
        assert (stream == kept[:, None, None]).all()  # one draw for the whole stream of a sample
        assert 0.4 < (kept > 0).float().mean() < 0.6
    both_kept = ((low[:, 0, 0] > 0) & (high[:, 0, 0] > 0)).float().mean()
    assert 0.18 < both_kept < 0.32  # independent draws: about 0.25; one shared draw: 0.5
    block.eval()
    x = torch.randn(3, num_low + num_high, 8)
    assert multi_scale.drop_path_streams(block, x, num_low) is x


def test_two_scales_route_stochastic_depth_per_stream(monkeypatch):
    # The joint front end must send every residual branch through drop_path_streams (one draw
    # per sample and stream), never through the block's DropPath over both streams at once.
    model = make_model(seed=6, train=True, **tiny_kwargs(
        patch_size=16, img_size=64, drop_loc=(3,), base_keep_rate=0.6, multi_scale=True,
        drop_path_rate=0.3))
    calls = []

    def recording(block, x, num_low):
        calls.append((x.shape[1], num_low))
        return x

    monkeypatch.setattr(multi_scale, 'drop_path_streams', recording)
    for block in model.blocks:
        monkeypatch.setattr(block, 'drop_path', None)  # called directly, it would raise
    num_low, num_tokens = 1 + 2 * 2, 1 + 2 * 2 + 1 + 4 * 4
    tokens = torch.randn(2, num_tokens, 32, dtype=torch.float64)
    low, high = multi_scale.run_two_scales(model.blocks[:multi_scale.MULTI_SCALE_BLOCKS], tokens,
                                           (4, 4))
    assert low.shape == (2, num_low, 32) and high.shape == (2, num_tokens - num_low, 32)
    attention, mlp = (2 * num_low, num_low), (num_tokens, num_low)
    assert calls == [(num_tokens, num_low), mlp, attention, mlp, attention, mlp]


# ---------------------------------------------------------------------------------------------
# 4. Per-call keep_rate and tokens
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def override_model():
    # 64 patch tokens (img 64, patch 8); reductions configured at blocks 2 and 4 with rate 0.7.
    return make_model(seed=5, **tiny_kwargs(img_size=64, drop_loc=(2, 4), base_keep_rate=0.7))


OVERRIDE_CASES = [
    # (keep_rate, tokens, expected [(K, N_in - 1), ...])
    (None, None, [(45, 64), (32, 45)]),
    (0.5, None, [(32, 64), (16, 32)]),
    ([0.5, 0.5, 0.6, 0.5, 0.9, 0.5], None, [(39, 64), (36, 39)]),
    ([0.5, 0.5, 1.0, 0.5, 0.9, 0.5], None, [(58, 64)]),
    (1.0, None, []),
    (1, None, []),
    ((0.5,) * 6, None, [(32, 64), (16, 32)]),
    (None, 20, [(20, 64)]),
    (0.5, 20, [(20, 64)]),
    (None, [None, 40, None, None, 10, None], [(40, 64), (28, 40), (10, 28)]),
    (None, [None, 64, None, None, None, None], [(45, 64), (32, 45)]),
    (None, [None, None, 45, None, None, None], [(45, 64), (32, 45)]),
    (1.0, [None, None, None, None, 10, None], [(10, 64)]),
    (0.5, [None, None, None, 32, None, None], [(32, 64), (16, 32)]),
    (None, [30, None, None, None, None, 7], [(30, 64), (21, 30), (15, 21), (7, 15)]),
]


@pytest.mark.parametrize('keep_rate,tokens,expected', OVERRIDE_CASES)
def test_overrides_number_of_tokens(override_model, keep_rate, tokens, expected):
    x = images(2, 64, seed=5)
    with torch.no_grad():
        logits, reductions = override_model(x, keep_rate=keep_rate, tokens=tokens, get_idx=True)
    assert reduction_sizes(reductions) == expected
    assert logits.shape == (2, 7)


@pytest.mark.parametrize('keep_rate,tokens', [
    (0.5, None),
    ([0.5, 0.5, 0.6, 0.5, 0.9, 0.5], None),
    (None, [None, 40, None, None, 10, None]),
    (1.0, [None, None, None, None, 10, None]),
    (None, 20),
])
def test_overrides_match_reference(override_model, keep_rate, tokens):
    x = images(2, 64, seed=6)
    with torch.no_grad():
        logits, reductions = override_model(x, keep_rate=keep_rate, tokens=tokens, get_idx=True)
    ref_logits, ref_reductions = ref_forward(override_model, x, keep_rate, tokens)
    assert_reductions_equal(reductions, ref_reductions)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-9, atol=1e-10)


def test_keep_rate_1_equals_model_without_reduction(override_model):
    x = images(2, 64, seed=7)
    with torch.no_grad():
        out = override_model(x, keep_rate=1.0)
    ref_logits, ref_reductions = ref_forward(override_model, x, keep_rate=1.0)
    assert ref_reductions == [[], []]
    torch.testing.assert_close(out, ref_logits, rtol=1e-9, atol=1e-10)


def test_multi_scale_tokens_and_keep_rate():
    model = make_model(seed=6, **tiny_kwargs(patch_size=16, img_size=96, drop_loc=(3, 5),
                                             base_keep_rate=0.7, multi_scale=True))
    x = images(2, 96, seed=8)
    with torch.no_grad():
        assert model(x, keep_rate=1.0, get_idx=True)[1] == []
        sizes = reduction_sizes(model(x, keep_rate=0.5, get_idx=True)[1])
        assert sizes == [(18, 36), (9, 18)]
        sizes = reduction_sizes(model(x, tokens=[None, None, None, None, 10, None],
                                      get_idx=True)[1])
        # k = ceil(r * n) evaluated as the definition says (0.7 * 10 is 7.000000000000001 in floats)
        assert sizes == [(26, 36), (10, 26), (math.ceil(0.7 * 10), 10)]
        # the front end never reduces: an int count first applies to the fused stream
        for count in (12, np.int64(12), torch.tensor(12)):
            assert reduction_sizes(model(x, tokens=count, get_idx=True)[1]) == [(12, 36)]
        for rate in (np.float32(0.5), torch.tensor(0.5)):
            assert reduction_sizes(model(x, keep_rate=rate, get_idx=True)[1]) == [(18, 36), (9, 18)]
    ref_logits, _ = ref_forward(model, x, None, [None, None, None, None, 10, None])
    with torch.no_grad():
        logits = model(x, tokens=[None, None, None, None, 10, None])
    torch.testing.assert_close(logits, ref_logits, rtol=1e-9, atol=1e-10)


def test_split_heads_gives_timms_views_with_a_cheaper_backward():
    import op_costs
    import token_merging
    qkv = torch.randn(2, 5, 3 * 4 * 8, requires_grad=True)
    heads = qkv.reshape(2, 5, 3, 4, 8)
    ours = token_merging.split_heads(heads)
    timms = heads.permute(2, 0, 3, 1, 4).unbind(0)
    for got, expected in zip(ours, timms):
        assert got.shape == expected.shape == (2, 4, 5, 8)
        assert got.stride() == expected.stride() and got.data_ptr() == expected.data_ptr()
    gradients = {}
    for name, parts in (('ours', ours), ('timm', timms)):
        with op_costs.KernelOps() as ops:
            (grad,) = torch.autograd.grad(sum((p * w).sum() for p, w in zip(parts, (1, 2, 3))),
                                          qkv)
        gradients[name] = (grad, [cost.name for cost in ops.costs if cost.bytes > 1000])
    torch.testing.assert_close(gradients['ours'][0], gradients['timm'][0], rtol=0, atol=0)
    # Both stack the three gradients; only timm's layout then needs a copy.
    assert gradients['ours'][1].count('stack') == gradients['timm'][1].count('stack') == 1
    assert 'clone' in gradients['timm'][1] and 'clone' not in gradients['ours'][1]


@pytest.mark.parametrize('num_prefix', [1, 2])
@pytest.mark.parametrize('keys', ['qkv view', 'qkv view, batch 1', 'contiguous'])
def test_class_attention_reads_the_keys_where_they_are(num_prefix, keys):
    """The class attention equals the class row of each head's softmax, averaged over heads,
    with the same gradients, and never copies the keys: a view of qkv (a block-diagonal
    product per image, or per head at batch 1) or contiguous keys (after a k norm; per head).
    Traced (the FLOP counters), it is the per-head product."""
    import op_costs
    from token_merging import class_attention, split_heads
    torch.manual_seed(0)
    batch = 1 if 'batch 1' in keys else 3
    qkv = torch.randn(batch, 7, 3, 4, 8, dtype=torch.float64, requires_grad=True)
    q, k, _ = split_heads(qkv)
    if keys == 'contiguous':
        k = k.contiguous()
    scale = 8 ** -0.5
    per_head = torch.softmax(q[:, :, :1] @ k.transpose(-2, -1) * scale, dim=-1)[:, :, 0]
    expected = per_head[:, :, num_prefix:].mean(dim=1)
    with op_costs.KernelOps() as ops:
        scores = class_attention(q, k, scale, num_prefix)
    assert scores.shape == (batch, 7 - num_prefix)
    torch.testing.assert_close(scores, expected, rtol=1e-12, atol=1e-15)
    key_bytes = k.numel() * k.element_size()
    assert not {'clone', 'copy_', 'contiguous'} & {
        cost.name for cost in ops.costs if cost.bytes >= key_bytes}, ops.costs
    weights = torch.randn(scores.shape, dtype=torch.float64)
    (grad,) = torch.autograd.grad((scores * weights).sum(), qkv)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), qkv)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-13)
    traced = torch.jit.trace(lambda q_, k_: class_attention(q_, k_, scale, num_prefix),
                             (q.detach(), k.detach()))
    assert 'aten::bmm' not in str(traced.graph) and 'aten::matmul' in str(traced.graph)
    torch.testing.assert_close(traced(q.detach(), k.detach()), expected.detach(), rtol=1e-12,
                               atol=1e-15)


def test_class_attention_under_bfloat16_autocast():
    """Under bf16 autocast (CPU) the class attention of qkv views stays within bf16's precision
    of float32's and sums to at most 1 per image."""
    from token_merging import class_attention, split_heads
    torch.manual_seed(0)
    qkv = torch.randn(3, 9, 3, 4, 8)
    scale = 8 ** -0.5
    expected = class_attention(*split_heads(qkv)[:2], scale)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        scores = class_attention(*split_heads(qkv.bfloat16())[:2], scale)
    scores = scores.float()  # CPU autocast leaves the softmax in bf16 (CUDA's: float32)
    assert torch.isfinite(scores).all()
    torch.testing.assert_close(scores, expected, rtol=2e-2, atol=2e-3)
    assert (scores.sum(dim=1) <= 1 + 1e-2).all()


@pytest.mark.parametrize('forms', ['cuda', 'cpu'])
def test_parameter_gradients_have_the_parameters_strides(forms):
    # DDP compares each gradient's strides with its bucket's (the parameter's) and warns on
    # every process where they differ, as they did for the position tables on CUDA (seen on an
    # H200 with nccl): their gradients were slices of a (1, N_low + N, C) concatenation's; and
    # on the CPU for the fusion's 1x1 convolution, whose weight gradient oneDNN strides by the
    # thread count (with two threads, differently on the size-1 dimensions).
    model = make_model(seed=2, double=False, train=True, **tiny_kwargs(
        patch_size=16, img_size=64, drop_loc=(3,), base_keep_rate=0.6, multi_scale=True))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with cuda_forms() if forms == 'cuda' else contextlib.nullcontext():
            model(images(2, 64, seed=3, double=False)).logsumexp(dim=1).sum().backward()
    finally:
        torch.set_num_threads(threads)
    strided = {name: (param.grad.stride(), param.stride())
               for name, param in model.named_parameters() if param.grad.stride() != param.stride()}
    assert not strided, strided
