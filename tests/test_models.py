"""Adversarial tests of the MTViT model (``models_mtvit.py``) against SPEC section 1.

Every reference below is written straight from the SPEC, slowly and obviously: explicit Python
loops over samples, heads and tokens, explicit softmax attention from the ``qkv``/``proj``
weights, explicit patch embedding, bilinear resize and nearest upsampling. None of them calls
a helper of the model under test; they only read its parameters. References run in float64.

Run: ``python -m pytest tests/test_models.py -q`` from the repository root.
"""
import math
import os
import sys
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import timm  # noqa: E402
import models_mtvit  # noqa: E402,F401  (registers the models)

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

MODEL_NAMES = ('deit_tiny_patch16_shrink_base', 'deit_small_patch16_shrink_base',
               'deit_base_patch16_shrink_base')
LN_EPS = 1e-6


# ---------------------------------------------------------------------------------------------
# Construction helpers
# ---------------------------------------------------------------------------------------------

def make_model(seed=0, name='deit_tiny_patch16_shrink_base', double=True, train=False, **kwargs):
    """A small MTViT through timm's registry; float64 and eval mode unless asked otherwise."""
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **kwargs)
    # Perturb norms and biases so that a reference ignoring them (or mixing them up) fails.
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed + 1000)
        for pname, param in model.named_parameters():
            if pname.endswith('.bias') or '.norm' in pname or pname.startswith('norm.'):
                param.add_(0.05 * torch.randn(param.shape, generator=gen))
    model = model.double() if double else model
    return model.train() if train else model.eval()


def tiny_kwargs(**overrides):
    kwargs = dict(embed_dim=32, depth=6, num_heads=2, mlp_ratio=4., num_classes=7,
                  patch_size=8, img_size=56, drop_loc=(1, 3, 4), base_keep_rate=0.5,
                  multi_scale=False)
    kwargs.update(overrides)
    return kwargs


def images(batch, size, seed=0, double=True):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, size, size, generator=gen)
    return x.double() if double else x


# ---------------------------------------------------------------------------------------------
# Slow references (SPEC 1.1, 1.2, 1.3). Tensors without batch dimension: (N, C).
# ---------------------------------------------------------------------------------------------

def ref_layer_norm(x, ln):
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + LN_EPS) * ln.weight + ln.bias


def ref_linear(x, lin):
    return x @ lin.weight.t() + lin.bias


def ref_gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def ref_mlp(x, block):
    return ref_linear(ref_gelu(ref_linear(x, block.mlp.fc1)), block.mlp.fc2)


def ref_attention(x, block):
    """Multi-head softmax attention of one sample on already normalised tokens x (N, C).

    Returns the attention output (N, C) and the class attention (N-1,): the softmax weight from
    the class token's query to every patch token, averaged over heads, not renormalised."""
    num_tokens, dim = x.shape
    heads = block.attn.num_heads
    head_dim = dim // heads
    qkv = ref_linear(x, block.attn.qkv)  # (N, 3C): [q | k | v], each head-major
    q_all, k_all, v_all = qkv[:, :dim], qkv[:, dim:2 * dim], qkv[:, 2 * dim:]
    outputs = []
    cls_attention = torch.zeros(num_tokens - 1, dtype=x.dtype)
    for h in range(heads):
        sl = slice(h * head_dim, (h + 1) * head_dim)
        q, k, v = q_all[:, sl], k_all[:, sl], v_all[:, sl]
        logits = (q @ k.t()) / math.sqrt(head_dim)
        weights = torch.exp(logits - logits.max(dim=-1, keepdim=True).values)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        outputs.append(weights @ v)
        cls_attention = cls_attention + weights[0, 1:]
    out = ref_linear(torch.cat(outputs, dim=-1), block.attn.proj)
    return out, cls_attention / heads


def ref_merge(x, scores, num_keep):
    """SPEC 1.2 on one sample. x (N, C) class token first; scores (N-1,).

    Returns (x_out (num_keep+1, C), kept_index list, assignment list)."""
    num_patches = x.shape[0] - 1
    patches = [x[1 + j] for j in range(num_patches)]
    s = [float(scores[j]) for j in range(num_patches)]
    order = sorted(range(num_patches), key=lambda j: -s[j])
    kept, pruned = order[:num_keep], order[num_keep:]
    target = {}
    for j in pruned:
        best, best_sim = None, -float('inf')
        for pos, i in enumerate(kept):
            sim = float(torch.dot(patches[j], patches[i])
                        / (torch.linalg.norm(patches[j]) * torch.linalg.norm(patches[i])))
            if sim > best_sim:
                best, best_sim = pos, sim
        target[j] = best
    new_tokens = []
    for pos, i in enumerate(kept):
        numerator = s[i] * patches[i]
        denominator = s[i]
        for j in pruned:
            if target[j] == pos:
                numerator = numerator + s[j] * patches[j]
                denominator = denominator + s[j]
        new_tokens.append(numerator / denominator)
    assignment = [None] * num_patches
    for pos, i in enumerate(kept):
        assignment[i] = pos
    for j in pruned:
        assignment[j] = target[j]
    return torch.stack([x[0]] + new_tokens), kept, assignment


def ref_num_keep(num_patches, configured, in_force, tokens):
    """k of SPEC 1.2 for a block receiving num_patches patch tokens."""
    if tokens is not None:
        return tokens
    if configured < 1 and in_force < 1:
        return math.ceil(in_force * num_patches)
    return num_patches


def ref_block(x, block, num_keep=None):
    """SPEC 1.1 on one sample; returns (x, reduction or None)."""
    attn, scores = ref_attention(ref_layer_norm(x, block.norm1), block)
    x = x + attn
    reduction = None
    if num_keep is not None and num_keep < x.shape[0] - 1:
        x, kept, assignment = ref_merge(x, scores, num_keep)
        reduction = (kept, assignment)
    x = x + ref_mlp(ref_layer_norm(x, block.norm2), block)
    return x, reduction


def ref_patch_embed(img, proj):
    """img (3, H, W) -> (g*g, C), patches row-major, each a dot product with the conv kernel."""
    patch = proj.weight.shape[-1]
    kernel = proj.weight.reshape(proj.weight.shape[0], -1)
    grid_h, grid_w = img.shape[1] // patch, img.shape[2] // patch
    tokens = []
    for r in range(grid_h):
        for c in range(grid_w):
            cell = img[:, r * patch:(r + 1) * patch, c * patch:(c + 1) * patch].reshape(-1)
            tokens.append(kernel @ cell + proj.bias)
    return torch.stack(tokens)


def ref_bilinear_half_align_corners(img):
    """img (3, H, W) -> (3, H/2, W/2), bilinear with align_corners=True, written out."""
    def matrix(n_in, n_out):
        m = torch.zeros(n_out, n_in, dtype=img.dtype)
        for i in range(n_out):
            src = i * (n_in - 1) / (n_out - 1) if n_out > 1 else 0.
            lo = min(int(math.floor(src)), n_in - 1)
            hi = min(lo + 1, n_in - 1)
            frac = src - lo
            m[i, lo] += 1 - frac
            m[i, hi] += frac
        return m
    mh = matrix(img.shape[1], img.shape[1] // 2)
    mw = matrix(img.shape[2], img.shape[2] // 2)
    return torch.stack([mh @ img[ch] @ mw.t() for ch in range(img.shape[0])])


def ref_depthwise_or_full_conv(u, conv, kernel, padding, dilation, depthwise):
    """Checks the conv's configuration against the SPEC, then applies it with its weights."""
    dim = u.shape[0]
    if depthwise:
        assert tuple(conv.weight.shape) == (dim, 1, kernel, kernel)
        groups = dim
    else:
        assert tuple(conv.weight.shape) == (dim, dim, kernel, kernel)
        groups = 1
    assert conv.bias is not None and tuple(conv.bias.shape) == (dim,)
    return F.conv2d(u.unsqueeze(0), conv.weight, conv.bias, padding=padding,
                    dilation=dilation, groups=groups)[0]


def ref_forward_one(model, img, keep_rates_in_force, tokens):
    """Whole forward of one image (3, H, W) from SPEC 1.1-1.3; returns (logits, reductions)."""
    depth = len(model.blocks)
    configured = list(model.keep_rates)
    cls = model.cls_token[0, 0]
    dim = cls.shape[0]
    patch = model.patch_embed.proj.weight.shape[-1]
    g = img.shape[-1] // patch
    reductions = []
    first = 0
    if not model.multi_scale:
        x = torch.cat([cls[None], ref_patch_embed(img, model.patch_embed.proj)])
        x = x + model.pos_embed[0]
    else:
        first = 3
        low = ref_bilinear_half_align_corners(img)
        xr = torch.cat([cls[None], ref_patch_embed(low, model.patch_embed.proj)])
        xr = xr + model.pos_embed_list[0][0]
        xh = torch.cat([cls[None], ref_patch_embed(img, model.patch_embed.proj)])
        xh = xh + model.pos_embed_list[1][0]
        half = g // 2
        for b in range(3):
            block = model.blocks[b]
            xr, red = ref_block(xr, block, None)
            assert red is None
            if b == 0:
                xh, red = ref_block(xh, block, None)
            else:
                pooled = [xh[0]]
                for i in range(half):
                    for j in range(half):
                        cells = [xh[1 + (2 * i + di) * g + (2 * j + dj)]
                                 for di in range(2) for dj in range(2)]
                        pooled.append(sum(cells) / 4)
                q = torch.stack(pooled)
                attn, _ = ref_attention(ref_layer_norm(q, block.norm1), block)
                up = [attn[0]]
                for r in range(g):
                    for c in range(g):
                        up.append(attn[1 + (r // 2) * half + (c // 2)])
                xh = xh + torch.stack(up)
                xh = xh + ref_mlp(ref_layer_norm(xh, block.norm2), block)
        # Fusion module
        fused_cls = xh[0] + xr[0]
        u = torch.zeros(dim, g, g, dtype=img.dtype)
        for r in range(g):
            for c in range(g):
                u[:, r, c] = xr[1 + (r // 2) * half + (c // 2)]
        lka = model.up.lka
        t = ref_depthwise_or_full_conv(u, lka.conv0, 3, 1, 1, True)
        t = ref_depthwise_or_full_conv(t, lka.conv_spatial, 7, 6, 2, True)
        t = ref_depthwise_or_full_conv(t, lka.conv1, 1, 0, 1, False)
        u = u + t
        high = torch.zeros(dim, g, g, dtype=img.dtype)
        for r in range(g):
            for c in range(g):
                high[:, r, c] = xh[1 + r * g + c]
        u = u + high
        u = u + ref_depthwise_or_full_conv(u, model.up.peg, 3, 1, 1, True)
        x = torch.stack([fused_cls] + [u[:, r, c] for r in range(g) for c in range(g)])
    for b in range(first, depth):
        n = x.shape[0] - 1
        k = ref_num_keep(n, configured[b], keep_rates_in_force[b], tokens[b])
        x, red = ref_block(x, model.blocks[b], k)
        if red is not None:
            reductions.append(red)
    x = ref_layer_norm(x, model.norm)
    logits = ref_linear(x[0], model.head)
    return logits, reductions


def ref_forward(model, x, keep_rate=None, tokens=None):
    """Batch reference: a loop over samples of ``ref_forward_one``."""
    depth = len(model.blocks)
    if keep_rate is None:
        in_force = list(model.keep_rates)
    elif isinstance(keep_rate, (int, float)):
        in_force = [float(keep_rate)] * depth
    else:
        in_force = list(keep_rate)
    if tokens is None or isinstance(tokens, int):
        token_list = [tokens] * depth
    else:
        token_list = list(tokens)
    logits, reductions = [], []
    with torch.no_grad():
        for b in range(x.shape[0]):
            lg, red = ref_forward_one(model, x[b], in_force, token_list)
            logits.append(lg)
            reductions.append(red)
    return torch.stack(logits), reductions


def assert_reductions_equal(got, expected_per_sample):
    """got: model's list of (kept_index (B,K), assignment (B,N-1)); expected: per sample list of
    (kept list, assignment list)."""
    batch = len(expected_per_sample)
    assert len(got) == len(expected_per_sample[0]), (
        f'model made {len(got)} reductions, reference {len(expected_per_sample[0])}')
    for stage, (kept_index, assignment) in enumerate(got):
        assert kept_index.dtype == torch.int64 and assignment.dtype == torch.int64
        for b in range(batch):
            kept, assign = expected_per_sample[b][stage]
            assert tuple(kept_index.shape) == (batch, len(kept))
            assert tuple(assignment.shape) == (batch, len(assign))
            assert kept_index[b].tolist() == kept, f'stage {stage} sample {b}: kept_index differs'
            assert assignment[b].tolist() == assign, f'stage {stage} sample {b}: assignment differs'


def reduction_sizes(reductions):
    """[(K, N_in - 1), ...] of the model's reductions (checked consistent over the batch)."""
    sizes = []
    for kept_index, assignment in reductions:
        assert kept_index.shape[0] == assignment.shape[0]
        sizes.append((kept_index.shape[1], assignment.shape[1]))
    return sizes


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

@pytest.mark.parametrize('num_patches', [16, 49, 196])
@pytest.mark.parametrize('batch', [1, 3])
@pytest.mark.parametrize('rate', [0.3, 0.5, 0.7, 0.9])
def test_merge_tokens_matches_reference(rate, batch, num_patches):
    dim = 24
    gen = torch.Generator().manual_seed(1000 * batch + num_patches + int(rate * 10))
    x = torch.randn(batch, num_patches + 1, dim, generator=gen, dtype=torch.float64)
    # class attention: a softmax over all N tokens, restricted to the patches (not renormalised)
    scores = torch.randn(batch, num_patches + 1, generator=gen, dtype=torch.float64)
    scores = scores.mul(2).softmax(dim=-1)[:, 1:]
    num_keep = math.ceil(rate * num_patches)
    x_in, scores_in = x.clone(), scores.clone()
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
def test_multi_scale_any_even_grid_batch_1(img_size):
    torch.manual_seed(0)
    model = timm.create_model('deit_tiny_patch16_shrink_base', pretrained=False, embed_dim=16,
                              depth=4, num_heads=2, num_classes=5, img_size=img_size,
                              drop_loc=(3,), base_keep_rate=0.7, multi_scale=True).eval()
    x = torch.randn(1, 3, img_size, img_size)
    with torch.no_grad():
        out, reductions = model(x, get_idx=True)
    assert out.shape == (1, 5)
    assert torch.isfinite(out).all()
    n = (img_size // 16) ** 2
    assert reduction_sizes(reductions) == [(math.ceil(0.7 * n), n)]


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
        # k = ceil(r * n) evaluated as in SPEC 1.2 (0.7 * 10 is 7.000000000000001 in floats)
        assert sizes == [(26, 36), (10, 26), (math.ceil(0.7 * 10), 10)]
        # the front end never reduces: an int count first applies to the fused stream
        sizes = reduction_sizes(model(x, tokens=12, get_idx=True)[1])
        assert sizes == [(12, 36)]
    ref_logits, _ = ref_forward(model, x, None, [None, None, None, None, 10, None])
    with torch.no_grad():
        logits = model(x, tokens=[None, None, None, None, 10, None])
    torch.testing.assert_close(logits, ref_logits, rtol=1e-9, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# 5. State-dict keys of the release
# ---------------------------------------------------------------------------------------------

def release_keys(depth, multi_scale):
    keys = ['cls_token']
    keys += ['pos_embed_list.0', 'pos_embed_list.1'] if multi_scale else ['pos_embed']
    keys += ['patch_embed.proj.weight', 'patch_embed.proj.bias']
    for i in range(depth):
        for sub in ('norm1', 'attn.qkv', 'attn.proj', 'norm2', 'mlp.fc1', 'mlp.fc2'):
            keys += [f'blocks.{i}.{sub}.weight', f'blocks.{i}.{sub}.bias']
    if multi_scale:
        for sub in ('up.peg', 'up.lka.conv0', 'up.lka.conv_spatial', 'up.lka.conv1'):
            keys += [f'{sub}.weight', f'{sub}.bias']
    keys += ['norm.weight', 'norm.bias', 'head.weight', 'head.bias']
    return keys


def release_shapes(depth, multi_scale, dim, grid, patch, classes, hidden):
    shapes = {'cls_token': (1, 1, dim), 'patch_embed.proj.weight': (dim, 3, patch, patch),
              'patch_embed.proj.bias': (dim,), 'norm.weight': (dim,), 'norm.bias': (dim,),
              'head.weight': (classes, dim), 'head.bias': (classes,)}
    if multi_scale:
        shapes['pos_embed_list.0'] = (1, (grid // 2) ** 2 + 1, dim)
        shapes['pos_embed_list.1'] = (1, grid ** 2 + 1, dim)
        shapes.update({'up.peg.weight': (dim, 1, 3, 3), 'up.peg.bias': (dim,),
                       'up.lka.conv0.weight': (dim, 1, 3, 3), 'up.lka.conv0.bias': (dim,),
                       'up.lka.conv_spatial.weight': (dim, 1, 7, 7),
                       'up.lka.conv_spatial.bias': (dim,),
                       'up.lka.conv1.weight': (dim, dim, 1, 1), 'up.lka.conv1.bias': (dim,)})
    else:
        shapes['pos_embed'] = (1, grid ** 2 + 1, dim)
    for i in range(depth):
        p = f'blocks.{i}.'
        shapes.update({p + 'norm1.weight': (dim,), p + 'norm1.bias': (dim,),
                       p + 'attn.qkv.weight': (3 * dim, dim), p + 'attn.qkv.bias': (3 * dim,),
                       p + 'attn.proj.weight': (dim, dim), p + 'attn.proj.bias': (dim,),
                       p + 'norm2.weight': (dim,), p + 'norm2.bias': (dim,),
                       p + 'mlp.fc1.weight': (hidden, dim), p + 'mlp.fc1.bias': (hidden,),
                       p + 'mlp.fc2.weight': (dim, hidden), p + 'mlp.fc2.bias': (dim,)})
    return shapes


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
# No host synchronisation and no Python loops over samples or tokens (SPEC 1.2)
# ---------------------------------------------------------------------------------------------

def _dispatched_ops(model, x, **kwargs):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    recorder = Recorder()
    with torch.no_grad(), recorder:
        model(x, **kwargs)
    return recorder.ops


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


# ---------------------------------------------------------------------------------------------
# 8. FLOPs (fvcore, per image, 224x224)
# ---------------------------------------------------------------------------------------------

def _count_flops():
    try:
        import speed_test
    except ImportError as error:
        pytest.skip(f'speed_test.py not importable yet ({error})')
    if not hasattr(speed_test, 'count_flops'):
        pytest.skip('speed_test.count_flops(model, input_size) does not exist yet')
    return speed_test.count_flops


@pytest.mark.parametrize('name,kwargs,expected', [
    ('deit_small_patch16_224', {}, 4.61e9),
    ('deit_small_patch16_shrink_base', dict(multi_scale=True, base_keep_rate=0.7), 3.10e9),
    ('deit_small_patch16_shrink_base', dict(multi_scale=False, base_keep_rate=0.7), 3.01e9),
])
def test_flops(name, kwargs, expected):
    count_flops = _count_flops()
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        flops = count_flops(model, 224)
    assert isinstance(flops, float)
    assert abs(flops - expected) / expected < 0.01, f'{name} {kwargs}: {flops / 1e9:.3f} GFLOPs'


# ---------------------------------------------------------------------------------------------
# DeiT checkpoint -> multi-scale MTViT (SPEC 1.4); only if the model module offers the mapping
# ---------------------------------------------------------------------------------------------

def test_deit_state_dict_maps_onto_multi_scale():
    from checkpoints import adapt_state_dict as adapt
    torch.manual_seed(0)
    deit = timm.create_model('deit_tiny_patch16_224', pretrained=False, img_size=128, depth=4,
                             embed_dim=32, num_heads=2, num_classes=5)
    model = timm.create_model('deit_tiny_patch16_shrink_base', pretrained=False, img_size=128,
                              depth=4, embed_dim=32, num_heads=2, num_classes=5,
                              multi_scale=True, drop_loc=(3,))
    source = deit.state_dict()
    adapted, _ = adapt(dict(source), model)
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
