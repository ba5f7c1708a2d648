"""The slow float64 reference of MTViT and the original release's state-dict layout, shared by
the model tests (tests/test_models.py, tests/test_model_state_and_cost.py,
tests/test_fast_paths.py) and the release-checkpoint test (tests/test_failures.py); and
``DispatchRecorder``, with which tests see which operations run.

Every reference is written straight from the method's definition, slowly and obviously:
explicit Python loops over samples, heads and tokens, explicit softmax attention from the
``qkv``/``proj`` weights, explicit patch embedding, bilinear resize and nearest upsampling. None
of them calls a helper of the model under test; they only read parameters (of a model, or of a
plain state dict through ``reference_model``). References run in float64.
"""
import math
import os
import sys
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import timm  # noqa: E402
import models_mtvit  # noqa: E402,F401  (registers the models)

LN_EPS = 1e-6


# ---------------------------------------------------------------------------------------------
# Recording what runs
# ---------------------------------------------------------------------------------------------

class DispatchRecorder(TorchDispatchMode):
    """Within it, ``records`` collects ``record(func, args, out)`` for each aten operation
    dispatched (``func`` its overload, ``out`` its result), where that is not None."""

    def __init__(self, record):
        super().__init__()
        self.record = record
        self.records = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        entry = self.record(func, args, out)
        if entry is not None:
            self.records.append(entry)
        return out


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
# Slow references. Tensors without batch dimension: (N, C).
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
    """Token mergence on one sample (docs/DESIGN.md). x (N, C) class token first; scores (N-1,).

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
    """The kept count k for a block receiving num_patches patch tokens."""
    if tokens is not None:
        return tokens
    if configured < 1 and in_force < 1:
        return math.ceil(in_force * num_patches)
    return num_patches


def ref_block(x, block, num_keep=None):
    """One block on one sample; returns (x, reduction or None)."""
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
    """Checks the conv's configuration against the definition, then applies it with its weights."""
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
    """Whole forward of one image (3, H, W) from the definition; returns (logits, reductions)."""
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
# The original release's state-dict layout, and the reference reading such a state dict
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


def release_state_dict(depth, multi_scale, dim, grid, patch, classes, hidden, seed):
    """A float32 state dict in the release's layout (``release_keys`` order, ``release_shapes``),
    built from the names and shapes alone. Values are scaled so that every part matters:
    weights ~ N(0, 1 / fan_in), norm weights near 1, biases and embeddings of a fair size."""
    shapes = release_shapes(depth, multi_scale, dim, grid, patch, classes, hidden)
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key in release_keys(depth, multi_scale):
        noise = torch.randn(shapes[key], generator=gen)
        is_norm = key.startswith('norm.') or '.norm' in key
        if is_norm and key.endswith('.weight'):
            state[key] = 1 + 0.1 * noise
        elif key.endswith('.bias'):
            state[key] = 0.1 * noise
        elif key.endswith('.weight'):
            state[key] = noise / math.sqrt(noise[0].numel())
        else:  # cls_token and position embeddings
            state[key] = 0.5 * noise
    return state


def reference_model(state_dict, num_heads, keep_rates):
    """What ``ref_forward`` reads, taken from a state dict alone: an attribute tree over its
    dotted keys (``blocks.3.attn.qkv.weight`` -> ``.blocks[3].attn.qkv.weight``, numbered parts
    as lists) in float64, plus the configuration (``multi_scale`` from the keys, ``keep_rates``,
    ``num_heads``). No module of the project is involved."""
    tree = {}
    for key, value in state_dict.items():
        *path, leaf = key.split('.')
        node = tree
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = value.detach().double()

    def build(node):
        if not isinstance(node, dict):
            return node
        if all(part.isdigit() for part in node):
            return [build(node[str(index)]) for index in range(len(node))]
        return SimpleNamespace(**{part: build(child) for part, child in node.items()})

    model = build(tree)
    model.multi_scale = 'pos_embed_list' in tree
    model.keep_rates = list(keep_rates)
    for block in model.blocks:
        block.attn.num_heads = num_heads
    return model


# The order in which the release's model registers its parameters, which numbers them in its
# optimizer state: its own parameters, then its submodules as built. Assumed (the release's
# source is not at hand): the order of DeiT's VisionTransformer, with the multi-scale parts
# after the patch embedding, the fusion module's large-kernel attention before its peg.
RELEASE_PARAMETER_ORDER = ('cls_token', 'pos_embed', 'patch_embed.', 'pos_embed_list.', 'up.lka.conv0.',
                           'up.lka.conv_spatial.', 'up.lka.conv1.', 'up.peg.', 'blocks.', 'norm.', 'head.')


def release_parameter_order(keys):
    """``keys`` (in ``release_keys`` order) sorted into ``RELEASE_PARAMETER_ORDER``."""
    def rank(key):
        return next(index for index, prefix in enumerate(RELEASE_PARAMETER_ORDER)
                    if key == prefix or (prefix.endswith('.') and key.startswith(prefix)))
    return sorted(keys, key=rank)  # stable: blocks keep their index order


def release_optimizer_state(state_dict, lr, weight_decay, seed):
    """AdamW state as the release saved it, built from a release state dict's names and shapes:
    an older torch's layout (integer ``step``, no newer group options) and the release's two
    groups, without weight decay (1-d tensors and ``cls_token``) then with it (every other
    weight, the position embeddings included), parameters numbered in
    ``release_parameter_order``."""
    gen = torch.Generator().manual_seed(seed)
    order = release_parameter_order(list(state_dict))
    no_decay = [key for key in order if state_dict[key].ndim <= 1 or key == 'cls_token']
    decay = [key for key in order if key not in no_decay]
    number = {key: index for index, key in enumerate(no_decay + decay)}
    groups = [{'lr': lr, 'betas': (0.9, 0.999), 'eps': 1e-8, 'weight_decay': group_decay,
               'amsgrad': False, 'initial_lr': lr, 'params': [number[key] for key in keys]}
              for group_decay, keys in ((0.0, no_decay), (weight_decay, decay))]
    state = {number[key]: {'step': 1, 'exp_avg': 1e-3 * torch.randn(state_dict[key].shape, generator=gen),
                           'exp_avg_sq': 1e-6 * torch.rand(state_dict[key].shape, generator=gen)}
             for key in order}
    return {'state': state, 'param_groups': groups}
