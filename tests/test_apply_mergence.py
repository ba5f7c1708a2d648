"""Token mergence applied to off-the-shelf timm ViTs (``models_mtvit.apply_mergence``).

* timm DeiT-S with mergence at 0.7 gives MTViT-S's logits (same weights); at keep 1 it is the
  unmodified model.
* Tiny distilled DeiT (two prefix tokens), DINOv2 with registers and layer scale, a CLIP tower
  (pre-norm) and a ViT with q/k norm match a slow per-sample reference built from the
  unmodified model's own timm modules and the reference merge of tests/mtvit_reference.py, with
  the prefix tokens kept in count and place; their FLOPs fall with the keep rate.
* Models and settings it cannot handle are refused, naming why, and left untouched.
"""
import copy
import math
import os
import sys
import warnings

import pytest
import torch
import torch.nn as nn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import timm  # noqa: E402
from timm.models.vision_transformer import ResPostBlock, VisionTransformer  # noqa: E402

import models_mtvit  # noqa: E402
import token_merging  # noqa: E402
from models_mtvit import apply_mergence  # noqa: E402
from mtvit_reference import images, ref_merge  # noqa: E402

TINY = dict(embed_dim=32, depth=4, num_heads=2, num_classes=5)
DROP_LOC = (1, 2)
KEEP_RATE = 0.5

# name -> (timm model name, extra kwargs, input size, prefix tokens)
TINY_MODELS = {
    'distilled': ('deit_tiny_distilled_patch16_224', dict(img_size=64), 64, 2),
    'dinov2_reg4': ('vit_small_patch14_reg4_dinov2', dict(img_size=70), 70, 5),
    'clip': ('vit_base_patch16_clip_224', dict(img_size=64), 64, 1),
    'qk_norm': ('vit_tiny_patch16_224', dict(img_size=64, qk_norm=True, scale_attn_norm=True),
                64, 1),
}


def tiny_vit(kind, seed=0):
    """A tiny timm ViT of ``kind`` in float64 eval mode, every 1-d parameter (biases, norms,
    layer-scale gammas) perturbed so that a wiring mistake shows."""
    name, kwargs, _, _ = TINY_MODELS[kind]
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **TINY, **kwargs)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(0.1 * torch.randn(param.shape, generator=gen))
    return model.double().eval()


def ref_class_attention(attn, y, num_prefix):
    """Class-token attention to the patch tokens of one sample, head by head, from the
    attention's own qkv weights and q/k norms. y (N, C) normalised tokens -> (N - P,)."""
    qkv = attn.qkv(y)
    dim = attn.attn_dim
    scores = torch.zeros(y.shape[0] - num_prefix, dtype=y.dtype)
    for head in range(attn.num_heads):
        cols = slice(head * attn.head_dim, (head + 1) * attn.head_dim)
        q = attn.q_norm(qkv[:, cols])
        k = attn.k_norm(qkv[:, dim:2 * dim][:, cols])
        weights = torch.softmax(q[0] @ k.t() / math.sqrt(attn.head_dim), dim=-1)
        scores = scores + weights[num_prefix:]
    return scores / attn.num_heads


def ref_forward(plain, x, keep_rate, drop_loc):
    """The reduced model, one sample at a time, from the unmodified model's modules (timm's own
    embedding, attention, blocks and head). Returns logits (B, classes) and, per sample, the
    list of (kept, assignment) of each reduction."""
    prefix = plain.num_prefix_tokens
    logits, reductions = [], []
    for sample in x:
        t = plain.norm_pre(plain._pos_embed(plain.patch_embed(sample[None])))
        made = []
        for index, block in enumerate(plain.blocks):
            if index not in drop_loc:
                t = block(t)
                continue
            y = block.norm1(t)
            scores = ref_class_attention(block.attn, y[0], prefix)
            t = t + block.ls1(block.attn(y))
            num_keep = math.ceil(keep_rate * (t.shape[1] - prefix))
            # ref_merge passes its first row through: the last prefix token; the others before it.
            merged, kept, assignment = ref_merge(t[0, prefix - 1:], scores, num_keep)
            t = torch.cat([t[0, :prefix - 1], merged])[None]
            t = t + block.ls2(block.mlp(block.norm2(t)))
            made.append((kept, assignment))
        logits.append(plain.forward_head(plain.norm(t))[0])
        reductions.append(made)
    return torch.stack(logits), reductions


# ---------------------------------------------------------------------------------------------
# DeiT-S against MTViT-S
# ---------------------------------------------------------------------------------------------

def test_deit_small_with_mergence_equals_mtvit_small():
    torch.manual_seed(0)
    deit = timm.create_model('deit_small_patch16_224', pretrained=False).eval()
    with torch.no_grad():
        for param in deit.parameters():
            if param.dim() == 1:
                param.add_(0.05 * torch.randn_like(param))
    mtvit = timm.create_model('deit_small_patch16_shrink_base', pretrained=False,
                              base_keep_rate=0.7).eval()
    mtvit.load_state_dict(deit.state_dict(), strict=True)
    plain = copy.deepcopy(deit)
    x = images(2, 224, seed=3, double=False)
    merged = apply_mergence(deit, keep_rate=0.7, drop_loc=(3, 6, 9))
    with torch.no_grad():
        out, reductions = merged(x, get_idx=True)
        expected, expected_reductions = mtvit(x, get_idx=True)
        at_1 = merged(x, keep_rate=1.0)
        unmodified = plain(x)
    assert merged is deit and isinstance(merged, VisionTransformer)
    assert list(merged.state_dict()) == list(plain.state_dict())
    assert (out - expected).abs().max().item() < 1e-4
    assert [r[0].shape[1] for r in reductions] == [138, 97, 68]
    for (kept, assignment), (kept_mt, assignment_mt) in zip(reductions, expected_reductions):
        assert torch.equal(kept, kept_mt) and torch.equal(assignment, assignment_mt)
    assert (at_1 - unmodified).abs().max().item() < 1e-6
    # The reduced logits do differ from the unmodified ones: the comparisons above can fail.
    assert (out - unmodified).abs().max().item() > 1e-3


# ---------------------------------------------------------------------------------------------
# Tiny timm ViTs of other kinds
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('kind', sorted(TINY_MODELS))
def test_matches_reference_with_prefix_tokens_in_place(kind):
    _, _, size, prefix = TINY_MODELS[kind]
    plain = tiny_vit(kind)
    model = apply_mergence(copy.deepcopy(plain), keep_rate=KEEP_RATE, drop_loc=DROP_LOC)
    x = images(2, size, seed=5)
    num_patches = plain.patch_embed.num_patches
    with torch.no_grad():
        out, reductions = model(x, get_idx=True)
        tokens = model.forward_features(x)
        expected, expected_reductions = ref_forward(plain, x, KEEP_RATE, DROP_LOC)
        unmodified = plain(x)
    assert plain.num_prefix_tokens == prefix
    first = math.ceil(KEEP_RATE * num_patches)
    second = math.ceil(KEEP_RATE * first)
    assert tokens.shape == (2, prefix + second, TINY['embed_dim'])
    assert [r[0].shape for r in reductions] == [(2, first), (2, second)]
    assert [r[1].shape for r in reductions] == [(2, num_patches), (2, first)]
    for sample in range(2):
        for (kept, assignment), (ref_kept, ref_assignment) in zip(
                reductions, expected_reductions[sample]):
            assert kept[sample].tolist() == ref_kept
            assert assignment[sample].tolist() == ref_assignment
    assert (out - expected).abs().max().item() < 1e-9
    assert (out - unmodified).abs().max().item() > 1e-4


@pytest.mark.parametrize('kind', sorted(TINY_MODELS))
def test_keep_rate_1_is_the_unmodified_model(kind):
    _, _, size, _ = TINY_MODELS[kind]
    plain = tiny_vit(kind).float()
    model = apply_mergence(copy.deepcopy(plain), keep_rate=KEEP_RATE, drop_loc=DROP_LOC)
    x = images(3, size, seed=7, double=False)
    with torch.no_grad():
        expected = plain(x)
        per_call, reductions = model(x, keep_rate=1.0, get_idx=True)
        configured_1 = apply_mergence(model, keep_rate=1.0, drop_loc=DROP_LOC)(x)
    assert reductions == []
    assert (per_call - expected).abs().max().item() < 1e-6
    assert (configured_1 - expected).abs().max().item() < 1e-6


def test_prefix_tokens_pass_through_merge_tokens_unchanged():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3 + 6, 4, generator=gen, dtype=torch.float64)
    scores = torch.tensor([[0.1, 0.3, 0.3, 0.05, 0.2, 0.05],
                           [0.2, 0.2, 0.2, 0.2, 0.1, 0.1]], dtype=torch.float64)
    out, kept_index, assignment = token_merging.merge_tokens(x, scores, 3, num_prefix_tokens=3)
    assert torch.equal(out[:, :3], x[:, :3])
    # Ties are broken by position: the earlier of two equal scores is kept first.
    assert kept_index.tolist() == [[1, 2, 4], [0, 1, 2]]
    for sample in range(2):
        merged, kept, ref_assignment = ref_merge(x[sample, 2:], scores[sample], 3)
        torch.testing.assert_close(out[sample, 3:], merged[1:])
        assert kept_index[sample].tolist() == kept
        assert assignment[sample].tolist() == ref_assignment


def test_token_counts_equal_keep_rates():
    model = apply_mergence(tiny_vit('dinov2_reg4').float(), keep_rate=0.6, drop_loc=(0, 2))
    x = images(2, 70, seed=2, double=False)
    assert model.token_counts(0.6) == [15, 15, 9, 9]
    assert model.token_counts([1., 0.3, 0.3, 1.]) == [25, 25, 8, 8]
    with torch.no_grad():
        by_rate = model(x, keep_rate=0.3)
        by_tokens = model(x, tokens=model.token_counts(0.3))
    torch.testing.assert_close(by_tokens, by_rate, rtol=0, atol=0)


def test_flops_fall_with_the_keep_rate():
    from op_costs import count_flops
    plain = tiny_vit('distilled').float()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        unmodified = count_flops(copy.deepcopy(plain), 64)
        flops = [count_flops(apply_mergence(copy.deepcopy(plain), keep_rate=rate,
                                            drop_loc=DROP_LOC), 64)
                 for rate in (1.0, 0.7, 0.5)]
    assert flops[0] == unmodified
    assert flops[0] > flops[1] > flops[2]


def test_training_step_reaches_every_parameter():
    model = apply_mergence(tiny_vit('distilled').float(), keep_rate=KEEP_RATE, drop_loc=DROP_LOC)
    model.train()
    x = images(4, 64, seed=1, double=False)
    loss = model(x).logsumexp(dim=-1).mean()
    loss.backward()
    missing = [name for name, param in model.named_parameters()
               if param.grad is None or not param.grad.abs().sum() > 0]
    assert torch.isfinite(loss) and missing == []


def test_one_shared_implementation():
    assert models_mtvit.merge_tokens is token_merging.merge_tokens
    assert models_mtvit.apply_mergence is token_merging.apply_mergence
    mtvit = timm.create_model('deit_tiny_patch16_shrink_base', pretrained=False, img_size=32,
                              embed_dim=32, depth=4, num_heads=2, drop_loc=(3,))
    vit = apply_mergence(_vit(), keep_rate=0.7, drop_loc=(3,))
    for rate, expected in ((None, 7), (0.5, 5), (1.0, 10)):
        assert mtvit.blocks[3].num_keep(10, rate) == vit.blocks[3].num_keep(10, rate) == expected


# ---------------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------------

def _vit(**kwargs):
    return VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=4, num_heads=2,
                             num_classes=3, **kwargs)


@pytest.mark.parametrize('build,kwargs,message', [
    (lambda: nn.Linear(4, 4), {}, 'Linear is not a timm VisionTransformer'),
    (lambda: _vit(class_token=False, global_pool='avg'), {}, 'has no class token'),
    (lambda: _vit(block_fn=ResPostBlock), {}, 'block 0 is a ResPostBlock'),
    (lambda: _vit(attn_layer='diff'), {}, 'block 0 has a DiffAttention'),
    (_vit, dict(keep_rate=0.), r'keep rate 0.0 must be in \(0, 1\]'),
    (_vit, dict(keep_rate=1.5), r'keep rate 1.5 must be in \(0, 1\]'),
    (_vit, dict(drop_loc=(2, 4)), r'drop_loc \(2, 4\) must name blocks in 0..3'),
])
def test_refused_naming_why_and_left_untouched(build, kwargs, message):
    model = build()
    before_class, before_blocks = type(model), list(getattr(model, 'blocks', []))
    with pytest.raises(ValueError, match=message):
        apply_mergence(model, **kwargs)
    assert type(model) is before_class and list(getattr(model, 'blocks', [])) == before_blocks


def test_applying_again_replaces_the_setting():
    plain = tiny_vit('clip')
    model = apply_mergence(copy.deepcopy(plain), keep_rate=0.5, drop_loc=(1, 2))
    blocks = list(model.blocks)
    apply_mergence(model, keep_rate=0.8, drop_loc=(2,))
    assert list(model.blocks) == blocks  # the same block objects, reconfigured
    assert model.keep_rates == [1., 1., 0.8, 1.] and model.drop_loc == (2,)
    assert [block.keep_rate for block in model.blocks] == [1., 1., 0.8, 1.]
    x = images(2, 64, seed=4)
    with torch.no_grad():
        _, reductions = model(x, get_idx=True)
        expected, _ = ref_forward(plain, x, 0.8, (2,))
        torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-9)
    assert [r[0].shape[1] for r in reductions] == [13]
