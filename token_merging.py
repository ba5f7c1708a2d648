"""Token mergence: the token maths shared by MTViT and by any timm ViT it is applied to.

At a reducing block, after attention, only the patch tokens the class token attends to most are
kept; every other patch token is merged into the kept token it is most similar to (cosine
similarity), as a class-attention-weighted mean. Prefix tokens (class, distillation, register
tokens) pass through untouched.

``apply_mergence(model, keep_rate, drop_loc)`` gives an off-the-shelf timm ``VisionTransformer``
(DeiT, distilled DeiT, AugReg, DINOv2 with registers, CLIP image towers, ...) the reducing blocks
of MTViT, reusing its own weights: the same object comes back, with the same state-dict keys,
and takes ``keep_rate=`` / ``tokens=`` per call as MTViT does.
"""
import math
import numbers
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import Block, VisionTransformer

from matmul_ops import to_autocast_dtype, uses_cpu_forms

__all__ = ['apply_mergence', 'class_attention', 'is_scalar', 'keep_count', 'keep_counts',
           'merge_tokens', 'per_block', 'reduce_through', 'split_heads', 'MergingBlock',
           'MergingVisionTransformer', 'MergingVisionTransformerDistilled']

Reduction = Tuple[torch.Tensor, torch.Tensor]
"""What a reducing block reports: ``(kept_index (B, K), assignment (B, N_patches))``."""


def is_scalar(value) -> bool:
    """Whether ``value`` is one number for every block: a Python or NumPy number, a 0-d tensor."""
    return isinstance(value, numbers.Number) or (isinstance(value, torch.Tensor)
                                                 and value.dim() == 0)


def per_block(value, depth: int, name: str) -> list:
    """A scalar (or None) repeated for every block, or a per-block sequence checked for length."""
    if value is None or is_scalar(value):
        if isinstance(value, torch.Tensor):
            value = value.item()
        return [value] * depth
    values = list(value)
    if len(values) != depth:
        raise ValueError(f'{name} has {len(values)} entries, the model has {depth} blocks')
    return values


def keep_count(num_patches: int, configured_rate: float, keep_rate: Optional[float] = None,
               tokens: Optional[int] = None) -> int:
    """Patch tokens a block keeps out of the ``num_patches`` it receives (equal: no reduction).

    ``tokens`` fixes the count whatever the rates; otherwise the block reduces only when both
    its configured rate and the rate in force (``keep_rate``, default the configured one) are
    below 1, keeping ``ceil(rate * num_patches)``.
    """
    if tokens is not None:
        if not 0 < tokens <= num_patches:
            raise ValueError(f'tokens={tokens} is outside 1..{num_patches}, '
                             f'the patch tokens this block receives')
        return tokens
    keep_rate = configured_rate if keep_rate is None else keep_rate
    if keep_rate <= 0:
        raise ValueError(f'keep rate {keep_rate} must be in (0, 1]')
    if configured_rate >= 1 or keep_rate >= 1:
        return num_patches
    return math.ceil(keep_rate * num_patches)


def keep_counts(configured_rates: Sequence[float], num_patches: int,
                keep_rates: Sequence[Optional[float]]) -> List[int]:
    """Patch tokens each block of a chain keeps, the first receiving ``num_patches``: the
    ``tokens`` argument equivalent to ``keep_rates`` (one per block, None: the configured one)."""
    counts = []
    for configured, rate in zip(configured_rates, keep_rates):
        num_patches = keep_count(num_patches, configured, rate)
        counts.append(num_patches)
    return counts


def class_attention(q: torch.Tensor, k: torch.Tensor, scale: float,
                    num_prefix_tokens: int = 1) -> torch.Tensor:
    """The class token's attention to each patch token, averaged over heads.

    Only the class token's row of the attention matrix is computed: softmax over all tokens
    (prefix tokens included, as in the attention itself), then the patch entries.

    Args:
        q, k: (B, H, N, D) queries and keys (after any q/k norm), class token first.
        scale: the attention's logit scale (D ** -0.5).
        num_prefix_tokens: P, the tokens before the patch tokens.
    Returns:
        (B, N - P) softmax weights.
    """
    batch, heads, _, head_dim = q.shape
    if torch.jit.is_tracing() or batch == 1 or k.stride(0) == heads * k.stride(1):
        # (B, H) is one batch dimension of the keys (batch 1; contiguous keys, after a k norm):
        # a product per head. Traced models (the FLOP counters) count this one.
        cls_logits = ((q[:, :, :1] * scale) @ k.transpose(-2, -1))[:, :, 0]
    else:
        # Keys that are a view of qkv (B, N, 3, H, D): the per-head product would first copy
        # them (3.5x the time on the CPU). Instead one product per image of the keys as the
        # (N, C) rows they are in qkv with an (H, C) block diagonal of the scaled class
        # queries, built in one pass: each head's query followed by C zeros, flattened and cut
        # to H rows of C, puts head h's query at columns h * D .. (h + 1) * D of row h.
        channels = heads * head_dim
        keys = k.transpose(1, 2).reshape(batch, -1, channels)
        queries = F.pad(q[:, :, 0] * scale, (0, channels)).flatten(1)[:, :heads * channels]
        cls_logits = torch.bmm(queries.reshape(batch, heads, channels), keys.transpose(1, 2))
    return cls_logits.softmax(dim=-1)[:, :, num_prefix_tokens:].mean(dim=1)  # (B, H, N) -> (B, N - P)


def split_heads(qkv: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, N, 3, H, D) -> q, k, v, each a (B, H, N, D) view.

    The views are those of ``qkv.permute(2, 0, 3, 1, 4).unbind(0)`` (timm's), but unbound
    along the 3 before transposing: the backward stacks the three gradients straight into the
    layout of ``qkv``, instead of stacking them along a new first dimension and copying the
    result into that layout (one pass over the (B, N, 3C) gradient less per attention).
    """
    return tuple(part.transpose(1, 2) for part in qkv.unbind(2))


def _argsort_descending(scores: torch.Tensor) -> torch.Tensor:
    """(B, N) scores -> (B, N) int64 indices, descending, ties: the earlier first."""
    return torch.argsort(scores, dim=1, descending=True, stable=True)


descending_order = torch.library.custom_op('mtvit::descending_order', mutates_args=())(
    _argsort_descending)
"""``_argsort_descending`` as an operation that torch.compile calls rather than compiles.

Inductor turns a sort of up to 512 elements into a Triton bitonic-sort kernel, into which the
class attention's softmax and mean fuse; for MTViT-S those kernels took about 90 of the 104 s its
Triton kernels took to compile for an H100 (one thread), DeiT-S's all of them 2 s. Through this
operation the compiled model runs aten's sort kernel and compiles nothing for it. Eager code
calls ``_argsort_descending`` directly (``ranked_patches``).
"""


@descending_order.register_fake
def _descending_order_shape(scores: torch.Tensor) -> torch.Tensor:
    return torch.empty(scores.shape, dtype=torch.long, device=scores.device)


def ranked_patches(cls_attention: torch.Tensor) -> torch.Tensor:
    """Patch positions by descending class attention, ties: the earlier token first.

    Args: cls_attention (B, N). Returns (B, N) int64. The order is discrete: no gradient.
    """
    # Exported graphs (ONNX) keep the plain sort, which exporters translate.
    if torch.compiler.is_compiling() and not exporting():
        return descending_order(cls_attention.detach())
    return _argsort_descending(cls_attention)


def exporting() -> bool:
    """Whether torch.export is tracing, strict (through Dynamo) or non-strict: the flag it sets.

    Not ``torch.compiler.is_exporting()``: PyTorch 2.11's Dynamo answers it with True under
    torch.compile as well, which had compiled MTViT's sorts into the Triton kernels that
    ``descending_order`` avoids (docs/gpu_notes.md: MTViT-S's compilation took 116 s on an
    H200). PyTorch 2.14's Dynamo answers ``is_exporting()`` from this flag. ``torch.jit.trace``
    and the TorchScript-based ONNX exporter never ask: they are not compiling.
    """
    flag = getattr(torch.compiler, '_is_exporting_flag', None)
    return torch.compiler.is_exporting() if flag is None else flag


def _flat_rows(index: torch.Tensor, num_tokens: int, start: int = 0) -> torch.Tensor:
    """(B, M) token positions -> (B * M,) rows of the (B * num_tokens, C) flattened tokens."""
    first_rows = torch.arange(start, start + index.shape[0] * num_tokens, num_tokens,
                              device=index.device)  # of each image's tokens: one operation
    return (index + first_rows.unsqueeze(1)).flatten()


# On the CPU, whole-row index_select and index_add_ over the flattened tokens take a quarter of
# the time of gather and scatter_add_, which index element by element (MTViT-S, batch 32: 1.4
# against 0.3 ms, 1.8 against 0.5 ms). CUDA (and other devices) keeps the element-wise kernels
# it was measured with.

def take_tokens(x: torch.Tensor, index: torch.Tensor, start: int = 0) -> torch.Tensor:
    """Tokens of x (B, T, C) at positions ``start + index`` (index (B, M)) -> (B, M, C)."""
    batch, num_tokens, dim = x.shape
    if uses_cpu_forms(x):
        rows = _flat_rows(index, num_tokens, start)
        return x.reshape(batch * num_tokens, dim).index_select(0, rows).view(batch, -1, dim)
    return x[:, start:].gather(1, index.unsqueeze(-1).expand(-1, -1, dim))


def sum_tokens(x: torch.Tensor, destination: torch.Tensor, num_out: int) -> torch.Tensor:
    """Each token of x (B, N, C) added into output token ``destination`` (B, N) of (B, num_out,
    C) zeros."""
    batch, _, dim = x.shape
    if uses_cpu_forms(x):
        rows = _flat_rows(destination, num_out)
        summed = x.new_zeros(batch * num_out, dim).index_add_(0, rows, x.reshape(-1, dim))
        return summed.view(batch, num_out, dim)
    return x.new_zeros(batch, num_out, dim).scatter_add_(
        1, destination.unsqueeze(-1).expand(-1, -1, dim), x)


BAG_MIN_TOKENS = 4096
"""Fewest tokens (of the whole batch) whose mergence sums run as bags (``weighted_sum_tokens``):
below, a forward is bound by the host's launches, and the bags' 7 small operations more cost it
more than the two passes over the tokens they save (MTViT-S: about 20 images of 197 tokens)."""


def weighted_sum_tokens(x: torch.Tensor, shares: torch.Tensor, destination: torch.Tensor,
                        num_out: int) -> torch.Tensor:
    """Each token of x (B, N, C) times its share (B, N) added into output token
    ``destination`` (B, N) of (B, num_out, C) zeros; every output token receives one at least.

    Where no gradient is wanted (eager evaluation), from ``BAG_MIN_TOKENS`` tokens up, as
    ``F.embedding_bag``'s weighted sums: one pass that reads each token once and writes each
    output once, where a product, a zero fill and a scatter of the products take three (MTViT-S
    at batch 256 on an H100: about 0.07 ms less per mergence, from the bytes). The bags are the
    output tokens, their tokens in input order. Their backward would sort every index again;
    compilers fuse the other form; on the CPU, whose row additions (``sum_tokens``) the bags
    did not beat (MTViT-S at batch 32: 1045.4 against 1045.3 ms per batch), the rows stay.
    """
    wants_gradient = torch.is_grad_enabled() and (x.requires_grad or shares.requires_grad)
    if (wants_gradient or x.shape[0] * x.shape[1] < BAG_MIN_TOKENS or uses_cpu_forms(x)
            or torch.compiler.is_compiling() or exporting() or torch.jit.is_tracing()):
        return sum_tokens(x * shares.unsqueeze(-1), destination, num_out)
    batch, num_tokens, dim = x.shape
    sources = torch.sort(destination, dim=1, stable=True).indices  # bag by bag
    sizes = destination.new_zeros(batch, num_out).scatter_add_(
        1, destination, destination.new_ones(()).expand_as(destination)).flatten()
    summed = F.embedding_bag(_flat_rows(sources, num_tokens), x.reshape(-1, dim),
                             sizes.cumsum(0) - sizes, mode='sum',
                             per_sample_weights=shares.gather(1, sources).flatten().to(x.dtype))
    return summed.view(batch, num_out, dim)


def merge_tokens(
        x: torch.Tensor,
        cls_attention: torch.Tensor,
        num_keep: int,
        num_prefix_tokens: int = 1,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep the ``num_keep`` most attended patch tokens and merge every other one into its
    most similar kept token.

    A kept token becomes the class-attention-weighted mean of itself and the tokens merged
    into it. Kept tokens come out in descending score order (ties: the earlier token first);
    the prefix tokens pass through unchanged, in place.

    Args:
        x: (B, P + N, C) tokens, the P prefix tokens first (class token at 0).
        cls_attention: (B, N) class-token attention to each patch token (head mean).
        num_keep: K, patch tokens kept, 1 <= K <= N.
        num_prefix_tokens: P.
    Returns:
        x: (B, P + K, C); kept_index: (B, K) positions among the input patch tokens of the kept
        ones, in output order; assignment: (B, N) output patch position of each input patch.
    """
    batch = x.shape[0]
    order = ranked_patches(cls_attention)
    kept_index = order[:, :num_keep]

    # The choice of merge target is discrete: no gradient flows through the similarities.
    with torch.no_grad():
        # Patch tokens in score order, kept ones first (one gather). Eagerly, in the precision
        # autocast gives the product below, cast once first, so that the gather and the
        # normalisation move half the bytes; compiled, inductor folds the cast into the kernels
        # that read the gathered tokens, where a cast first would be written out in full.
        # Only the kept ones are normalised: a pruned token's length scales its whole row of
        # similarities, so its argmax over the kept tokens is that of the cosine similarity.
        # Each product is at most that length: float16 holds it for tokens shorter than its
        # largest value, 65504 (ViT tokens are orders of magnitude shorter; bfloat16 has
        # float32's range).
        features = x if torch.compiler.is_compiling() else to_autocast_dtype(x)
        ranked = take_tokens(features, order, start=num_prefix_tokens)
        tiny = max(1e-12, torch.finfo(ranked.dtype).tiny)  # 1e-12 is 0 in half precision
        kept_unit = F.normalize(ranked[:, :num_keep], dim=-1, eps=tiny)
        target = (ranked[:, num_keep:] @ kept_unit.transpose(1, 2)).argmax(dim=-1)
        kept_position = torch.arange(num_keep, device=x.device).expand(batch, num_keep)
        assignment = torch.empty_like(order).scatter_(1, order,
                                                      torch.cat([kept_position, target], 1))

    # One sum of every token, in input order, into the token it goes to (a kept token goes
    # to itself; a prefix token too, with weight 1, so it passes through exactly): no gathered
    # copies on the gradient path, no strided views, no concatenation. The weights are divided
    # by their destination's total first (small tensors), so that the sum gives the means
    # and no pass over the merged tokens divides them afterwards.
    weights = F.pad(cls_attention, (num_prefix_tokens, 0), value=1.)  # (B, P + N)
    destination = torch.cat([torch.arange(num_prefix_tokens, device=x.device).expand(
        batch, num_prefix_tokens), assignment + num_prefix_tokens], 1)  # (B, P + N)
    total = weights.new_zeros(batch, num_prefix_tokens + num_keep).scatter_add_(
        1, destination, weights)
    shares = weights / total.gather(1, destination)
    merged = weighted_sum_tokens(x, shares, destination, num_prefix_tokens + num_keep)
    return merged.to(x.dtype), kept_index, assignment


def reduce_through(blocks: Sequence[nn.Module], x: torch.Tensor, keep_rates: Sequence,
                   token_counts: Sequence) -> Tuple[torch.Tensor, List[Reduction]]:
    """Runs ``x`` (B, P + N, C) through reducing blocks (each ``block(x, keep_rate=, tokens=)``
    returning ``(x, reduction or None)``), one rate and one token count (or None) per block.
    Returns the tokens (B, P + K, C) and the reductions made, in block order."""
    reductions = []
    for block, rate, count in zip(blocks, keep_rates, token_counts):
        x, reduction = block(x, keep_rate=rate, tokens=count)
        if reduction is not None:
            reductions.append(reduction)
    return x, reductions


# ---------------------------------------------------------------------------------------------
# Any timm VisionTransformer
# ---------------------------------------------------------------------------------------------

def attend(attn: nn.Module, x: torch.Tensor, num_prefix_tokens: Optional[int] = None
           ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """timm's ``Attention`` (q/k norm, scale norm, gate included) on its own weights, with the
    fused kernel, also returning the class attention when ``num_prefix_tokens`` is given.

    Args: x (B, N, C) normalised tokens. Returns (B, N, C) and the class attention (B, N - P)
    or None.
    """
    batch, num_tokens, _ = x.shape
    gate = attn.gate(x).sigmoid() if attn.gate is not None else None
    q, k, v = split_heads(attn.qkv(x).reshape(batch, num_tokens, 3, attn.num_heads,
                                              attn.head_dim))
    q, k = attn.q_norm(q), attn.k_norm(k)
    out = F.scaled_dot_product_attention(
        q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.)
    out = attn.norm(out.transpose(1, 2).reshape(batch, num_tokens, attn.attn_dim))
    if gate is not None:
        out = out * gate
    out = attn.proj_drop(attn.proj(out))
    cls_attention = None
    if num_prefix_tokens is not None:
        cls_attention = class_attention(q, k, attn.scale, num_prefix_tokens)
    return out, cls_attention


class MergingBlock(nn.Module):
    """A timm pre-norm ``Block`` (layer scale, drop path) that reduces its tokens by mergence
    between attention and MLP, as MTViT's blocks do. It adopts the block's own submodules under
    the same names, so the model's state-dict keys do not change."""

    def __init__(self, block: nn.Module, keep_rate: float, num_prefix_tokens: int):
        super().__init__()
        self.keep_rate = keep_rate
        self.num_prefix_tokens = num_prefix_tokens
        for name in ('norm1', 'attn', 'ls1', 'drop_path1', 'norm2', 'mlp', 'ls2', 'drop_path2'):
            setattr(self, name, getattr(block, name))

    def num_keep(self, num_patches: int, keep_rate: Optional[float] = None,
                 tokens: Optional[int] = None) -> int:
        """Patch tokens this block keeps out of ``num_patches`` (see ``keep_count``)."""
        return keep_count(num_patches, self.keep_rate, keep_rate, tokens)

    def forward(self, x: torch.Tensor, keep_rate: Optional[float] = None,
                tokens: Optional[int] = None) -> Tuple[torch.Tensor, Optional[Reduction]]:
        """Args: x (B, P + N, C). Returns x (B, P + K, C) and the reduction made, or None."""
        num_patches = x.shape[1] - self.num_prefix_tokens
        num_keep = self.num_keep(num_patches, keep_rate, tokens)
        reduces = num_keep < num_patches
        attn, cls_attention = attend(self.attn, self.norm1(x),
                                     self.num_prefix_tokens if reduces else None)
        x = x + self.drop_path1(self.ls1(attn))
        reduction = None
        if reduces:
            x, kept_index, assignment = merge_tokens(x, cls_attention, num_keep,
                                                     num_prefix_tokens=self.num_prefix_tokens)
            reduction = (kept_index, assignment)
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x, reduction


class _MergenceForward:
    """The forward of a timm ViT whose blocks are ``MergingBlock``s: MTViT's call signature.
    Mixed into the model's own class by ``apply_mergence``; everything else stays timm's."""

    def token_counts(self, keep_rate: Union[float, Sequence[float]]) -> List[int]:
        """The ``tokens`` argument equivalent to ``keep_rate`` at the model's input size
        (``model(x, tokens=model.token_counts(rate))`` equals ``model(x, keep_rate=rate)``)."""
        keep_rates = per_block(keep_rate, len(self.blocks), 'keep_rate')
        grid = self.patch_embed.grid_size
        return keep_counts(self.keep_rates, grid[0] * grid[1], keep_rates)

    def forward_tokens(self, x: torch.Tensor, keep_rate=None, tokens=None
                       ) -> Tuple[torch.Tensor, List[Reduction]]:
        """Args: x (B, 3, H, W); keep_rate / tokens as in ``forward``. Returns the normalised
        tokens (B, P + K, C), prefix tokens first, and the reductions made, in block order."""
        depth = len(self.blocks)
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
        x, reductions = reduce_through(self.blocks, x, per_block(keep_rate, depth, 'keep_rate'),
                                       per_block(tokens, depth, 'tokens'))
        return self.norm(x), reductions

    def forward_features(self, x: torch.Tensor, keep_rate=None, tokens=None) -> torch.Tensor:
        """timm's ``forward_features`` at a keep rate: (B, 3, H, W) -> (B, P + K, C)."""
        return self.forward_tokens(x, keep_rate=keep_rate, tokens=tokens)[0]

    def forward(self, x: torch.Tensor,
                keep_rate: Optional[Union[float, Sequence[float]]] = None,
                tokens: Optional[Union[int, Sequence[Optional[int]]]] = None,
                get_idx: bool = False):
        """Classifies images as MTViT does: ``keep_rate`` (a float or one per block, None: the
        configured rates, 1: no reduction), ``tokens`` (kept patch tokens, an int or one per
        block, overriding the rates where given), ``get_idx`` (also return one
        ``(kept_index, assignment)`` per reduction). Returns the model's head output."""
        x, reductions = self.forward_tokens(x, keep_rate=keep_rate, tokens=tokens)
        logits = self.forward_head(x)
        return (logits, reductions) if get_idx else logits


class MergingVisionTransformer(_MergenceForward, VisionTransformer):
    """timm's ``VisionTransformer`` with token mergence; made by ``apply_mergence``."""


class MergingVisionTransformerDistilled(_MergenceForward, VisionTransformerDistilled):
    """timm's distilled DeiT with token mergence; made by ``apply_mergence``."""


# The class each supported class becomes (a merging class stays what it is).
MERGING_CLASSES = {
    VisionTransformer: MergingVisionTransformer,
    VisionTransformerDistilled: MergingVisionTransformerDistilled,
    MergingVisionTransformer: MergingVisionTransformer,
    MergingVisionTransformerDistilled: MergingVisionTransformerDistilled,
}


def _check_mergeable(model: nn.Module, keep_rate: float, drop_loc: Sequence[int]):
    """Refuses, naming why, a model or setting that apply_mergence cannot handle."""
    name = type(model).__name__
    if not isinstance(model, VisionTransformer):
        raise ValueError(f'{name} is not a timm VisionTransformer: token mergence needs its '
                         f'transformer blocks and class token')
    if type(model) not in MERGING_CLASSES:
        raise ValueError(f'{name} (a VisionTransformer subclass) is not supported: only timm\'s '
                         f'VisionTransformer and VisionTransformerDistilled are')
    if model.cls_token is None:
        raise ValueError(f'{name} has no class token: mergence ranks the patch tokens by the '
                         f'class token\'s attention')
    for index, block in enumerate(model.blocks):
        if type(block) not in (Block, MergingBlock):
            raise ValueError(f'block {index} is a {type(block).__name__}; only timm\'s pre-norm '
                             f'Block is supported')
        if type(block.attn) is not Attention:
            raise ValueError(f'block {index} has a {type(block.attn).__name__}; only timm\'s '
                             f'Attention is supported')
    if not 0 < keep_rate <= 1:
        raise ValueError(f'keep rate {keep_rate} must be in (0, 1]')
    depth = len(model.blocks)
    if not drop_loc or any(not 0 <= loc < depth for loc in drop_loc):
        raise ValueError(f'drop_loc {tuple(drop_loc)} must name blocks in 0..{depth - 1} '
                         f'(depth {depth})')


def apply_mergence(model: nn.Module, keep_rate: float = 0.7,
                   drop_loc: Sequence[int] = (3, 6, 9)) -> nn.Module:
    """Makes the blocks at ``drop_loc`` of a timm ``VisionTransformer`` reduce tokens by
    mergence, exactly as MTViT's reducing blocks do, with its own weights.

    The class token's attention (head mean, after any q/k norm) ranks the patch tokens; the top
    ``ceil(rate * N)`` are kept and every other one is merged into its most similar kept token.
    Prefix tokens (class, distillation, registers) pass through in place. Layer scale, q/k norm,
    pre-norm (CLIP) and drop path are kept; attention runs through the fused kernel.

    Args:
        model: timm ``VisionTransformer`` or ``VisionTransformerDistilled`` with a class token,
            timm's pre-norm blocks and attention. Applying again replaces the earlier setting.
        keep_rate: configured rate of the reducing blocks, in (0, 1]; 1: no reduction.
        drop_loc: indices of the reducing blocks.
    Returns:
        ``model`` itself (same object, same state-dict keys, still an instance of its class),
        now called as ``model(x, keep_rate=None, tokens=None, get_idx=False)`` and with
        ``model.token_counts(rate)``, like MTViT.
    Raises:
        ValueError naming why the model or setting cannot be handled.
    """
    drop_loc = tuple(drop_loc)
    _check_mergeable(model, keep_rate, drop_loc)
    # A class swap, not a wrapper: the caller's object, parameters and state-dict keys stay.
    model.__class__ = MERGING_CLASSES[type(model)]
    model.drop_loc = drop_loc
    model.keep_rates = [keep_rate if index in drop_loc else 1. for index in range(len(model.blocks))]
    for index, rate in enumerate(model.keep_rates):
        block = model.blocks[index]
        if isinstance(block, MergingBlock):
            block.keep_rate = rate
        else:
            model.blocks[index] = MergingBlock(block, keep_rate=rate,
                                               num_prefix_tokens=model.num_prefix_tokens)
    return model
