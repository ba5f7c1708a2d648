"""The fast paths of MTViT and of the training loop, each checked against a slow or plain one.

1. ScaleFusion's dense (per-channel matrix product) fusion against its convolutions and against
   the float64 reference of tests/mtvit_reference.py, values and gradients.
2. The matrix-product patch embeddings and resize, and the front end's two streams as one
   tensor, against the convolutions, one stream after the other, and the reference (the
   functions themselves: tests/test_matmul_ops.py).
3. ``MTViT.token_counts``: ``tokens=model.token_counts(rate)`` is ``keep_rate=rate``.
4. bf16 autocast on CPU against float32; the mergence's weighted sums as bags.
5. ``utils.check_finite_losses``, ``engine.reduction_kwargs``, and ``engine.train_one_epoch``
   reading the losses on the host only at progress lines.

Run: ``python -m pytest tests/test_fast_paths.py -q`` from the repository root.
"""
import contextlib
import math
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
for path in (REPO, TESTS):
    if path not in sys.path:
        sys.path.insert(0, path)

import engine  # noqa: E402
from matmul_ops import cuda_forms  # noqa: E402
import models_mtvit  # noqa: E402
from multi_scale import MULTI_SCALE_BLOCKS, run_per_stream, run_two_scales  # noqa: E402
from op_costs import KernelOps  # noqa: E402
import token_merging  # noqa: E402
from token_merging import weighted_sum_tokens  # noqa: E402
import utils  # noqa: E402
from mtvit_reference import (DispatchRecorder, assert_reductions_equal, images,  # noqa: E402
                             make_model, ref_forward, reduction_sizes, tiny_kwargs)

FUSION_CONVS = ('lka.conv0', 'lka.conv_spatial', 'lka.conv1', 'peg')


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    # These models are tiny: on a 2-core machine shared with other jobs, two OpenMP threads
    # wait on each other at every op (float64 forwards measured 10-35x slower than with one).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def relative_error(got, expected):
    return ((got.double() - expected.double()).norm() / expected.double().norm()).item()


# ---------------------------------------------------------------------------------------------
# 1. Dense fusion == convolution fusion == SPEC reference
# ---------------------------------------------------------------------------------------------

def multi_scale_model(img_size, seed=3, train=False, **overrides):
    """A float64 multi-scale model (patch 16) whose fusion convolutions matter."""
    kwargs = tiny_kwargs(patch_size=16, img_size=img_size, drop_loc=(3, 5), base_keep_rate=0.6,
                         multi_scale=True)
    kwargs.update(overrides)
    model = make_model(seed=seed, train=train, **kwargs)
    with torch.no_grad():
        for name in FUSION_CONVS:
            model.up.get_submodule(name).weight.mul_(3.)
    return model


class FuseCounter:
    """Counts which fusion implementation ran, so that forcing one is seen to take effect."""

    def __init__(self, fusion):
        self.calls = {'dense': 0, 'conv': 0}
        for kind, method in (('dense', fusion._fuse_dense), ('conv', fusion._fuse_conv)):
            setattr(fusion, f'_fuse_{kind}', self._wrap(kind, method))

    def _wrap(self, kind, method):
        def wrapped(*args, **kwargs):
            self.calls[kind] += 1
            return method(*args, **kwargs)
        return wrapped


def run_forced(model, dense, x, **kwargs):
    model.up.dense_depthwise = dense
    counter = FuseCounter(model.up)
    try:
        out = model(x, **kwargs)
    finally:
        del model.up._fuse_dense, model.up._fuse_conv  # back to the class's methods
    expected = {'dense': 1, 'conv': 0} if dense else {'dense': 0, 'conv': 1}
    assert counter.calls == expected, f'dense_depthwise={dense} ran {counter.calls}'
    return out


@pytest.mark.parametrize('img_size', [64, 96])
def test_dense_fusion_equals_conv_fusion_and_reference(img_size):
    model = multi_scale_model(img_size)
    grid = img_size // 16
    assert model.up.placement_3x3 is not None
    x = images(3, img_size, seed=img_size)
    n = grid * grid
    for keep_rate in (0.5, 0.7, 1.0):
        ref_logits, ref_reductions = ref_forward(model, x, keep_rate=keep_rate)
        for batch in (1, 3):
            with torch.no_grad():
                dense, dense_red = run_forced(model, True, x[:batch], keep_rate=keep_rate,
                                              get_idx=True)
                conv, conv_red = run_forced(model, False, x[:batch], keep_rate=keep_rate,
                                            get_idx=True)
            assert dense.dtype == torch.float64
            torch.testing.assert_close(dense, conv, rtol=1e-9, atol=1e-10)
            torch.testing.assert_close(dense, ref_logits[:batch], rtol=1e-9, atol=1e-10)
            torch.testing.assert_close(conv, ref_logits[:batch], rtol=1e-9, atol=1e-10)
            assert_reductions_equal(dense_red, ref_reductions[:batch])
            assert_reductions_equal(conv_red, ref_reductions[:batch])
            if keep_rate < 1:
                k1 = math.ceil(keep_rate * n)
                assert reduction_sizes(dense_red) == [(k1, n), (math.ceil(keep_rate * k1), k1)]
            else:
                assert dense_red == []


def test_dense_depthwise_constructor_argument():
    x = images(2, 64, seed=11)
    forced = {}
    for dense in (None, True, False):
        model = multi_scale_model(64, dense_depthwise=dense)
        assert model.up.dense_depthwise is dense
        counter = FuseCounter(model.up)
        with torch.no_grad():
            forced[dense] = model(x)
        # None picks by device: the convolutions on CPU.
        assert counter.calls['dense'] == (1 if dense else 0)
        assert counter.calls['conv'] == (0 if dense else 1)
    torch.testing.assert_close(forced[True], forced[False], rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(forced[None], forced[False], rtol=0, atol=0)


@pytest.mark.parametrize('keep_rate', [0.5, 1.0])
def test_dense_fusion_gradients_equal_conv_gradients(keep_rate):
    # Training mode, float64, no dropout or drop-path (tiny_kwargs sets none).
    model = multi_scale_model(96, seed=5, train=True)
    assert model.training
    x = images(3, 96, seed=12)
    weights = torch.randn(3, 7, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    target = torch.tensor([0, 4, 6])
    grads = {}
    for dense in (True, False):
        model.zero_grad(set_to_none=True)
        logits = run_forced(model, dense, x, keep_rate=keep_rate)
        loss = F.cross_entropy(logits, target) + (logits * weights).sum()
        loss.backward()
        grads[dense] = {}
        for name, param in model.named_parameters():
            assert param.grad is not None, f'dense={dense}: {name} got no gradient'
            assert torch.isfinite(param.grad).all(), f'dense={dense}: {name} non-finite gradient'
            grads[dense][name] = param.grad.clone()
    for name in grads[True]:
        torch.testing.assert_close(grads[True][name], grads[False][name], rtol=1e-8, atol=1e-10,
                                   msg=lambda m, name=name: f'{name}: {m}')
    # The fusion's weights do receive gradient (the comparison above is not of zeros).
    for conv in FUSION_CONVS:
        assert grads[True][f'up.{conv}.weight'].abs().max() > 1e-6, conv


# ---------------------------------------------------------------------------------------------
# 2. Matrix-product patch embeddings and resize
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('multi_scale', [False, True])
def test_matmul_embedding_equals_convolution_and_reference(multi_scale, monkeypatch):
    # The CUDA path (patch embeddings and the half-resolution resize as matrix products),
    # forced on the CPU in float64, against the convolutions and the written-out reference.
    model = make_model(seed=7, **tiny_kwargs(patch_size=16, img_size=64, drop_loc=(3, 5),
                                             base_keep_rate=0.6, multi_scale=multi_scale))
    x = images(3, 64, seed=8)
    for keep_rate in (0.5, 0.7, 1.0):
        ref_logits, ref_reductions = ref_forward(model, x, keep_rate=keep_rate)
        for batch in (1, 3):
            outputs = {}
            for matmul in (True, False):
                model.matmul_embed = matmul
                with monkeypatch.context() as patch:
                    if matmul:  # the convolutions, F.interpolate, one stream at a time: not run
                        patch.setattr(model.patch_embed, 'forward', None)
                        patch.setattr(models_mtvit.F, 'interpolate', None)
                        patch.setattr(models_mtvit, 'run_per_stream', None)
                    else:
                        patch.setattr(models_mtvit, 'run_two_scales', None)
                    with torch.no_grad():
                        outputs[matmul] = model(x[:batch], keep_rate=keep_rate, get_idx=True)
            for logits, reductions in outputs.values():
                torch.testing.assert_close(logits, ref_logits[:batch], rtol=1e-9, atol=1e-10)
                assert_reductions_equal(reductions, ref_reductions[:batch])
    model.matmul_embed = None  # by device: the convolution on the CPU
    with monkeypatch.context() as patch:
        patch.setattr(models_mtvit, 'embed_patches_as_matmul', None)
        with torch.no_grad():
            torch.testing.assert_close(model(x), ref_forward(model, x)[0], rtol=1e-9, atol=1e-10)


def test_matmul_embedding_gradients_equal_convolution_gradients():
    model = make_model(seed=9, train=True, **tiny_kwargs(
        patch_size=16, img_size=64, drop_loc=(3, 5), base_keep_rate=0.6, multi_scale=True))
    x = images(3, 64, seed=10)
    grads = {}
    for matmul in (True, False):
        model.matmul_embed = matmul
        model.zero_grad(set_to_none=True)
        logits = model(x)
        (logits * torch.arange(7.)).sum().backward()
        grads[matmul] = {name: param.grad.clone() for name, param in model.named_parameters()}
    assert grads[True]['patch_embed.proj.weight'].abs().max() > 1e-6
    for name, grad in grads[True].items():
        torch.testing.assert_close(grad, grads[False][name], rtol=1e-8, atol=1e-10,
                                   msg=lambda m, name=name: f'{name}: {m}')


def test_two_scales_as_one_tensor_equal_and_fewer_operations():
    # The CUDA front end (both streams as one tensor) against one stream after the other: the
    # same tokens, with a third fewer operations (each a kernel launch on a GPU).
    model = make_model(seed=2, **tiny_kwargs(patch_size=16, img_size=64, drop_loc=(3,),
                                             base_keep_rate=0.6, multi_scale=True))
    x = images(2, 64, seed=3)
    low_res = F.interpolate(x, scale_factor=0.5, mode='bilinear', align_corners=True)
    blocks = model.blocks[:MULTI_SCALE_BLOCKS]
    with torch.no_grad():
        x_low = model._embed([low_res], model.pos_embed_list[:1])
        x_high = model._embed([x], model.pos_embed_list[1:])
        with KernelOps() as per_stream:
            expected = run_per_stream(blocks, x_low, x_high, model.grid)
        joint_input = torch.cat([x_low, x_high], 1)
        with KernelOps() as joint:
            got = run_two_scales(blocks, joint_input, model.grid)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert joint.count <= 0.65 * per_stream.count, (joint.count, per_stream.count)


def slice_gradient_shape(func, args, out):
    """The shape of the gradient a slice's backward writes (None for other operations)."""
    return tuple(out.shape) if func.overloadpacket.__name__ == 'slice_backward' else None


@pytest.mark.parametrize('joint', [False, True])
def test_front_end_backward_writes_no_sliced_token_gradients(joint):
    # The streams and class tokens are split, not sliced: a slice's backward writes a
    # zero-filled gradient of the whole token tensor (summed after), a split's one
    # concatenation. Only the class attention slices, its (B, H, N, D) query and its
    # (B, H, N) scores; no (B, N, C) token gradient comes from a slice.
    model = make_model(seed=2, double=False, train=True, **tiny_kwargs(
        patch_size=16, img_size=64, drop_loc=(3,), base_keep_rate=0.6, multi_scale=True))
    model.matmul_embed = joint
    logits = model(images(2, 64, seed=3, double=False))
    with DispatchRecorder(slice_gradient_shape) as slices:
        logits.logsumexp(dim=1).sum().backward()
    assert slices.records, 'the class attention slices: the recording is not empty'
    assert all(len(shape) == 4 or shape[-1] != model.embed_dim for shape in slices.records), \
        slices.records


@pytest.mark.parametrize('img_size', [(64, 96), (96, 64)])
@pytest.mark.parametrize('multi_scale', [False, True])
def test_matmul_embedding_non_square(img_size, multi_scale):
    # Rows and columns of the patches and of the resize (the reference is square-only).
    model = make_model(seed=5, **tiny_kwargs(patch_size=16, img_size=img_size, drop_loc=(3, 5),
                                             base_keep_rate=0.6, multi_scale=multi_scale))
    x = torch.randn(2, 3, *img_size, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(6))
    outputs = []
    for matmul in (True, False):
        model.matmul_embed = matmul
        with torch.no_grad():
            outputs.append(model(x, get_idx=True))
    torch.testing.assert_close(outputs[0][0], outputs[1][0], rtol=1e-9, atol=1e-10)
    assert len(outputs[0][1]) == 2
    for got, expected in zip(outputs[0][1], outputs[1][1]):
        assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_resize_weights_stay_exact_through_half_precision():
    model = make_model(seed=5, **tiny_kwargs(patch_size=16, img_size=64, drop_loc=(3, 5),
                                             multi_scale=True))
    exact = models_mtvit.bilinear_resize_matrix(64, 32)
    model.bfloat16().float()
    assert model.patch_embed.proj.weight.dtype == torch.float32
    assert model.resize_rows.dtype == torch.float64 and torch.equal(model.resize_rows, exact)
    model.matmul_embed = True
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        # float64 inputs are not cast by autocast, nor by the matrix-product path
        assert model.double()(images(1, 64, seed=1)).dtype == torch.float64


# ---------------------------------------------------------------------------------------------
# 3. MTViT.token_counts
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def token_models():
    single = make_model(seed=21, **tiny_kwargs())  # 49 patches, drop_loc (1, 3, 4), rate 0.5
    multi = make_model(seed=22, **tiny_kwargs(patch_size=16, img_size=96, drop_loc=(3, 5),
                                              base_keep_rate=0.7, multi_scale=True))  # 36 patches
    return {'single': (single, images(3, 56, seed=21)), 'multi': (multi, images(3, 96, seed=22))}


PER_BLOCK_RATES = [0.6, 0.8, 0.5, 0.9, 0.7, 0.4]


def test_token_counts_by_hand(token_models):
    single, multi = token_models['single'][0], token_models['multi'][0]
    assert single.token_counts(1.0) == [49] * 6
    assert single.token_counts(0.5) == [49, 25, 25, 13, 7, 7]
    assert single.token_counts(0.9) == [49, 45, 45, 41, 37, 37]
    # Only the configured blocks (1, 3, 4) reduce, at their own entry of the list.
    assert single.token_counts(PER_BLOCK_RATES) == [49, 40, 40, 36, 26, 26]
    assert multi.token_counts(1.0) == [None, None, None, 36, 36, 36]
    assert multi.token_counts(0.5) == [None, None, None, 18, 18, 9]
    assert multi.token_counts(0.7) == [None, None, None, 26, 26, 19]
    assert multi.token_counts(PER_BLOCK_RATES) == [None, None, None, 33, 33, 14]


@pytest.mark.parametrize('kind', ['single', 'multi'])
@pytest.mark.parametrize('rate', [1.0, 0.9, 0.7, 0.5, PER_BLOCK_RATES], ids=str)
def test_token_counts_equal_keep_rate(token_models, kind, rate):
    model, x = token_models[kind]
    counts = model.token_counts(rate)
    assert len(counts) == len(model.blocks)
    first = 3 if kind == 'multi' else 0
    assert counts[:first] == [None] * first
    assert all(isinstance(c, int) for c in counts[first:])
    with torch.no_grad():
        by_rate, rate_red = model(x, keep_rate=rate, get_idx=True)
        by_count, count_red = model(x, tokens=counts, get_idx=True)
        assert torch.equal(model(x, keep_rate=rate), by_rate)
        assert torch.equal(model(x, tokens=counts), by_rate)
    assert torch.equal(by_count, by_rate)
    assert len(count_red) == len(rate_red)
    for (kept_a, assign_a), (kept_b, assign_b) in zip(count_red, rate_red):
        assert torch.equal(kept_a, kept_b) and torch.equal(assign_a, assign_b)
    # Each reduction keeps the count of its block, out of the previous block's count.
    num_patches = model.grid[0] * model.grid[1]
    expected_sizes, previous = [], num_patches
    for count in counts[first:]:
        if count < previous:
            expected_sizes.append((count, previous))
        previous = count
    assert reduction_sizes(count_red) == expected_sizes
    if rate == 1.0:
        assert counts[first:] == [num_patches] * (len(counts) - first)
        assert count_red == []


# ---------------------------------------------------------------------------------------------
# 4. bf16 autocast on CPU
# ---------------------------------------------------------------------------------------------

BF16_CASES = [(False, None), (False, True), (True, False), (True, True)]


def bf16_model(multi_scale, dense, sharpen=1.):
    model = make_model(seed=31, double=False, **tiny_kwargs(
        patch_size=16, img_size=64, drop_loc=(3, 4), base_keep_rate=0.5,
        multi_scale=multi_scale))
    model.matmul_embed = dense
    if multi_scale:
        model.up.dense_depthwise = dense
    with torch.no_grad():
        # Scaling the query and key weights sharpens the attention, as training does; the
        # class attention of a random-init model is nearly uniform, so that bf16 rounding
        # reorders which tokens are kept (see test_bf16_autocast_with_reductions).
        for block in model.blocks:
            block.attn.qkv.weight[:2 * model.embed_dim].mul_(sharpen)
    return model


def bf16_vs_fp32(model, x, **kwargs):
    with torch.no_grad():
        fp32 = model(x, **kwargs)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            bf16 = model(x, **kwargs)
    assert fp32.dtype == torch.float32
    assert bf16.dtype == torch.bfloat16, 'autocast did not reach the model'
    assert torch.isfinite(bf16.float()).all() and torch.isfinite(fp32).all()
    return relative_error(bf16, fp32)


@pytest.mark.parametrize('multi_scale,dense', BF16_CASES)
def test_bf16_autocast_without_reduction(multi_scale, dense):
    # Random init, no reduction: no discrete decision, only rounding. Measured 0.3-0.7 % here
    # (0.2-0.9 % over 8 seeds and embed_dim 32/64).
    model = bf16_model(multi_scale, dense)
    error = bf16_vs_fp32(model, images(4, 64, seed=32, double=False), keep_rate=1.0)
    assert error < 1e-2, f'bf16 relative error {error:.4f}'


@pytest.mark.parametrize('multi_scale,dense', BF16_CASES)
def test_bf16_autocast_with_reductions(multi_scale, dense):
    # With the configured reductions (rate 0.5 at blocks 3 and 4) and a sharpened attention.
    # Measured 0.3-0.6 % here (0.2-0.6 % over 8 seeds). The same random-init model unsharpened
    # gives 1.0-1.3 % on these inputs (0.4-1.4 % over seeds, up to 4.8 % at embed_dim 64),
    # nearly all of it from tokens kept or merged differently.
    model = bf16_model(multi_scale, dense, sharpen=6.)
    x = images(4, 64, seed=33, double=False)
    with torch.no_grad():
        assert len(model(x, get_idx=True)[1]) == 2
    error = bf16_vs_fp32(model, x)
    assert error < 1e-2, f'bf16 relative error {error:.4f}'


@pytest.mark.parametrize('forms,gather', [('cuda', 'gather'), ('cpu', 'index_select')])
def test_mergence_gathers_similarity_tokens_in_half_precision(forms, gather):
    # Under autocast the similarities' tokens are cast before the gather (half the bytes), with
    # the merge itself in float32 and the same choices as in float32 on well-separated tokens.
    gen = torch.Generator().manual_seed(8)
    kept = F.normalize(torch.randn(2, 6, 32, generator=gen), dim=-1) * 4
    pruned = kept[:, [3, 0, 5, 1]] + 0.2 * torch.randn(2, 4, 32, generator=gen)
    x = torch.cat([torch.randn(2, 1, 32, generator=gen), kept, pruned], dim=1)
    scores = torch.cat([torch.linspace(0.2, 0.1, 6), torch.full((4,), 0.01)]).expand(2, -1)
    fp32 = models_mtvit.merge_tokens(x, scores, 6)
    with cuda_forms() if forms == 'cuda' else contextlib.nullcontext(), \
            torch.autocast('cpu', dtype=torch.bfloat16), KernelOps() as ops:
        bf16 = models_mtvit.merge_tokens(x, scores, 6)
    gathers = [cost for cost in ops.costs if cost.name == gather and cost.bytes > 2 * 10 * 32]
    assert len(gathers) == 1
    # (2, 10, 32) tokens written and read at 2 bytes each, plus 2 x 10 int64 indices read
    assert gathers[0].bytes == 2 * (2 * 10 * 32 * 2) + 2 * 10 * 8
    assert bf16[2].tolist() == fp32[2].tolist() == [[0, 1, 2, 3, 4, 5, 3, 0, 5, 1]] * 2
    assert bf16[0].dtype == torch.float32
    torch.testing.assert_close(bf16[0], fp32[0])


@pytest.mark.parametrize('forms', ['cuda', 'cpu'])
@pytest.mark.parametrize('batch', [1, 3])
def test_weighted_sums_as_bags_equal_the_scatter_and_a_loop(forms, batch, monkeypatch):
    # The mergence's sum without a gradient (F.embedding_bag) and with one (a product and a
    # scatter, each device's form), against a loop over tokens; uneven bags, one of 7 tokens,
    # of other sizes in each image.
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(batch, 10, 16, dtype=torch.float64, generator=gen)
    shares = torch.rand(batch, 10, dtype=torch.float64, generator=gen)
    destination = torch.tensor([[1, 1, 0, 2, 1, 3, 1, 1, 1, 1], [0, 1, 2, 3, 3, 2, 1, 3, 3, 2],
                                [3, 0, 2, 1, 0, 0, 0, 0, 2, 1]])[:batch]
    expected = torch.zeros(batch, 4, 16, dtype=torch.float64)
    for b, n in np.ndindex(batch, 10):
        expected[b, destination[b, n]] += shares[b, n] * x[b, n]
    with cuda_forms() if forms == 'cuda' else contextlib.nullcontext():
        with KernelOps() as few_tokens:  # below BAG_MIN_TOKENS: the scatter (fewer launches)
            scattered_few = weighted_sum_tokens(x, shares, destination, 4)
        with monkeypatch.context() as patch, KernelOps() as ops:
            patch.setattr(token_merging, 'BAG_MIN_TOKENS', batch * 10)
            as_bags = weighted_sum_tokens(x, shares, destination, 4)
            scattered = weighted_sum_tokens(x.requires_grad_(), shares, destination, 4)
    # On the CPU the rows are added as they were (the bags did not beat them there).
    assert sum('embedding_bag' in cost.name for cost in ops.costs) == (forms == 'cuda')
    assert not any('embedding_bag' in cost.name for cost in few_tokens.costs)
    torch.testing.assert_close(scattered_few, expected, rtol=0, atol=1e-14)
    torch.testing.assert_close(as_bags, expected, rtol=0, atol=1e-14)
    torch.testing.assert_close(scattered, expected, rtol=0, atol=1e-14)


@pytest.mark.parametrize('multi_scale', [False, True])
def test_models_summing_as_bags_equal_the_reference(multi_scale, monkeypatch):
    # Every mergence's sums as bags (the CUDA forms, from any token count here), evaluated in
    # float64, against the written-out reference: logits and the reductions made, batch 1 and 3.
    monkeypatch.setattr(token_merging, 'BAG_MIN_TOKENS', 0)
    model = make_model(seed=7, **tiny_kwargs(patch_size=16, img_size=64, drop_loc=(3, 4),
                                             base_keep_rate=0.5, multi_scale=multi_scale))
    x = images(3, 64, seed=9)
    ref_logits, ref_reductions = ref_forward(model, x)
    for batch in (1, 3):
        with cuda_forms(), torch.no_grad(), KernelOps() as ops:
            logits, reductions = model(x[:batch], get_idx=True)
        assert sum('embedding_bag' in cost.name for cost in ops.costs) == 2  # one per mergence
        torch.testing.assert_close(logits, ref_logits[:batch], rtol=1e-9, atol=1e-10)
        assert_reductions_equal(reductions, ref_reductions[:batch])


# ---------------------------------------------------------------------------------------------
# 5. Loss checks and the training loop
# ---------------------------------------------------------------------------------------------

def test_check_finite_losses_returns_floats():
    values = utils.check_finite_losses(torch.tensor([0.5, 1.25, 3.0, 0.1]), 0, 0)
    assert values[:3] == [0.5, 1.25, 3.0]
    assert values[3] == torch.tensor(0.1).item()  # the float32 value, not 0.1
    assert all(type(v) is float for v in values)
    assert utils.check_finite_losses(torch.tensor([2.0], dtype=torch.float64), 4, 7) == [2.0]
    assert utils.check_finite_losses(torch.tensor([1.5], dtype=torch.bfloat16), 0, 0) == [1.5]


@pytest.mark.parametrize('losses,message', [
    ([1.0, 2.0, math.nan, 3.0], 'loss is nan at epoch 3 iteration 12, stopping training'),
    ([1.0, 2.0, math.inf], 'loss is inf at epoch 3 iteration 12, stopping training'),
    ([1.0, 2.0, -math.inf, 0.5], 'loss is -inf at epoch 3 iteration 12, stopping training'),
    # The first non-finite value wins, whatever comes after it.
    ([1.0, 2.0, math.inf, math.nan, -math.inf], 'loss is inf at epoch 3 iteration 12, '
                                                'stopping training'),
    ([1.0, 2.0, -math.inf, math.nan], 'loss is -inf at epoch 3 iteration 12, stopping training'),
    ([math.nan, math.inf], 'loss is nan at epoch 3 iteration 10, stopping training'),
    ([0.0, 0.0, 0.0, 0.0, math.inf], 'loss is inf at epoch 3 iteration 14, stopping training'),
])
def test_check_finite_losses_raises_for_the_first_non_finite(losses, message):
    with pytest.raises(utils.NonFiniteLossError) as info:
        utils.check_finite_losses(torch.tensor(losses), 3, 10)
    assert str(info.value) == message


def test_reduction_kwargs():
    calls = []

    def converter(rate):
        calls.append(rate)
        return [None, 3, int(rate * 10)]

    assert engine.reduction_kwargs(None, None) == {}
    assert engine.reduction_kwargs(None, converter) == {}
    assert calls == []
    assert engine.reduction_kwargs(0.7, None) == {'keep_rate': 0.7}
    assert engine.reduction_kwargs(1.0, None) == {'keep_rate': 1.0}
    assert engine.reduction_kwargs(0.5, converter) == {'tokens': [None, 3, 5]}
    assert calls == [0.5]


class TinyClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))

    def forward(self, x):
        return self.net(x)


class RecordingCriterion:
    """criterion(samples, outputs, targets); the loss of step ``nan_at`` is made NaN."""

    def __init__(self, nan_at=None):
        self.nan_at = nan_at
        self.losses = []

    def __call__(self, samples, outputs, targets):
        loss = F.cross_entropy(outputs, targets)
        if len(self.losses) == self.nan_at:
            loss = loss * math.nan
        self.losses.append(loss.detach().clone())
        return loss


def tiny_loader(num_batches):
    gen = torch.Generator().manual_seed(51)
    return [(torch.randn(4, 3, 2, 2, generator=gen), torch.randint(0, 3, (4,), generator=gen))
            for _ in range(num_batches)]


def run_epoch(monkeypatch, criterion, epoch=0, num_batches=7, print_freq=3):
    checks = []
    real_check = utils.check_finite_losses

    def recording_check(losses, check_epoch, first_iteration):
        checks.append((losses.detach().clone(), check_epoch, first_iteration))
        return real_check(losses, check_epoch, first_iteration)

    monkeypatch.setattr(engine, 'check_finite_losses', recording_check)
    torch.manual_seed(52)
    model = TinyClassifier()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler('cpu', enabled=False)
    try:
        stats = engine.train_one_epoch(model, criterion, tiny_loader(num_batches), optimizer,
                                       torch.device('cpu'), epoch, scaler,
                                       keep_rate_schedule=None, print_freq=print_freq)
        error = None
    except utils.NonFiniteLossError as exc:
        stats, error = None, exc
    return stats, error, checks


def test_train_one_epoch_checks_losses_only_at_progress_lines(monkeypatch):
    criterion = RecordingCriterion()
    stats, error, checks = run_epoch(monkeypatch, criterion)
    assert error is None
    assert len(criterion.losses) == 7
    # Steps 0, 3 and 6 (the last): the losses of steps [0], [1, 2, 3], [4, 5, 6].
    assert [(len(losses), epoch, first) for losses, epoch, first in checks] == [
        (1, 0, 0), (3, 0, 1), (3, 0, 4)]
    received = torch.cat([losses for losses, _, _ in checks])
    assert torch.equal(received, torch.stack(criterion.losses))
    assert len(set(received.tolist())) == 7  # the model did train: every loss differs
    assert stats['loss'] == pytest.approx(torch.stack(criterion.losses).double().mean().item(),
                                          rel=1e-12)


def test_train_one_epoch_checks_the_last_step_too(monkeypatch):
    # 8 batches, progress every 3: steps 0, 3, 6 and the last one, 7.
    _, error, checks = run_epoch(monkeypatch, RecordingCriterion(), epoch=2, num_batches=8)
    assert error is None
    assert [(len(losses), epoch, first) for losses, epoch, first in checks] == [
        (1, 2, 0), (3, 2, 1), (3, 2, 4), (1, 2, 7)]


@pytest.mark.parametrize('epoch', [0, 1])
def test_train_one_epoch_nan_names_the_first_bad_step(monkeypatch, epoch):
    criterion = RecordingCriterion(nan_at=4)
    _, error, checks = run_epoch(monkeypatch, criterion, epoch=epoch)
    assert isinstance(error, utils.NonFiniteLossError)
    # The check at step 6 sees the NaN of step 4 (and of steps 5 and 6, trained on NaN
    # weights); the first wins. The iteration is counted within the epoch, as before the
    # losses were checked in batches (check_finite(loss, epoch, step)).
    assert str(error) == f'loss is nan at epoch {epoch} iteration 4, stopping training'
    assert len(checks) == 3 and checks[-1][2] == 4
    assert all(torch.isnan(loss) for loss in criterion.losses[4:])
    assert all(torch.isfinite(loss) for loss in criterion.losses[:4])
