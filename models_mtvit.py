"""MTViT: DeiT vision transformers made cheaper by token mergence and a multi-scale front end.

At a few blocks (``drop_loc``) only the patch tokens the class token attends to most are kept;
every other patch token is merged into the kept token it is most similar to (cosine similarity),
as a class-attention-weighted mean. With ``multi_scale=True`` the first blocks also run on a
half-resolution copy of the image and the two streams are fused before the first reduction.

The parameter names are those of the original release (and of timm's DeiT), so checkpoints of
either load with ``strict=True``. Importing this module registers the models with timm. The
token maths lives in ``token_merging``, shared with ``apply_mergence`` (re-exported here), which
gives any timm ViT the same reducing blocks.
"""
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, PatchEmbed, to_2tuple, trunc_normal_
from timm.models import register_model

from fused_norms import add_and_norm, norm_for_matmul
from matmul_ops import (bilinear_resize_matrix, embed_patches_as_matmul, to_autocast_dtype,
                        uses_cuda_forms)
from multi_scale import MULTI_SCALE_BLOCKS, POOL, ScaleFusion, run_per_stream, run_two_scales
from token_merging import (Reduction, apply_mergence, class_attention, is_scalar, keep_count,
                           keep_counts, merge_tokens, per_block, reduce_through, split_heads)

__all__ = ['MTViT', 'apply_mergence', 'merge_tokens', 'MTVIT_MODELS']


class Attention(nn.Module):
    """Multi-head self-attention (fused kernel) that can also return the class token's row."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True,
                 attn_drop: float = 0., proj_drop: float = 0.):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'embed_dim {dim} is not divisible by num_heads {num_heads}')
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _split_heads(self, qkv: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """(B, N, 3C) -> q, k, v, each (B, H, N, D)."""
        batch, num_tokens, _ = qkv.shape
        return split_heads(qkv.reshape(batch, num_tokens, 3, self.num_heads, -1))

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """(B, H, N, D) each -> (B, N, H, D), a view."""
        out = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.attn_drop if self.training else 0.)
        return out.transpose(1, 2)

    def forward(self, x: torch.Tensor, return_cls_attention: bool = False
                ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Args: x (B, N, C). Returns (B, N, C) and, if asked, the class attention (B, N - 1):
        softmax weights from the class token's query to each patch token, averaged over heads."""
        q, k, v = self._split_heads(self.qkv(x))
        out = self.proj_drop(self.proj(self._attend(q, k, v).reshape(x.shape)))
        cls_attention = None
        if return_cls_attention:
            cls_attention = class_attention(q, k, self.scale)
        return out, cls_attention

    def forward_segments(self, x: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
        """Attention within each of consecutive token segments, none across them: equal to
        ``forward`` of each segment, concatenated, with one projection for all.

        Args: x (B, N, C); sizes: segment lengths summing to N. Returns (B, N, C).
        """
        heads = [self._attend(*self._split_heads(part))
                 for part in self.qkv(x).split(list(sizes), dim=1)]
        return self.proj_drop(self.proj(torch.cat(heads, dim=1).reshape(x.shape)))


class Block(nn.Module):
    """Pre-norm ViT block that may reduce its tokens by mergence between attention and MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4., qkv_bias: bool = True,
                 drop: float = 0., attn_drop: float = 0., drop_path: float = 0.,
                 keep_rate: float = 1., fused_norms: bool = False):
        super().__init__()
        self.keep_rate = keep_rate
        self.fused_norms = fused_norms
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias,
                              attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio),
                       act_layer=nn.GELU, drop=drop)

    def num_keep(self, num_patches: int, keep_rate: Optional[float] = None,
                 tokens: Optional[int] = None) -> int:
        """Patch tokens this block keeps out of ``num_patches`` (see ``keep_count``)."""
        return keep_count(num_patches, self.keep_rate, keep_rate, tokens)

    def forward(self, x: torch.Tensor, keep_rate: Optional[float] = None,
                tokens: Optional[int] = None) -> Tuple[torch.Tensor, Optional[Reduction]]:
        """Args: x (B, N, C). Returns x (B, K + 1, C) and the reduction made, or None."""
        num_keep = self.num_keep(x.shape[1] - 1, keep_rate, tokens)
        reduces = num_keep < x.shape[1] - 1
        attn, cls_attention = self.attn(norm_for_matmul(x, self.norm1, self.fused_norms),
                                        return_cls_attention=reduces)
        reduction = None
        if reduces:
            x, kept_index, assignment = merge_tokens(x + self.drop_path(attn), cls_attention,
                                                     num_keep)
            reduction = (kept_index, assignment)
            normed = norm_for_matmul(x, self.norm2, self.fused_norms)
        else:
            x, normed = add_and_norm(x, self.drop_path(attn), self.norm2, self.fused_norms)
        x = x + self.drop_path(self.mlp(normed))
        return x, reduction


class ConfigError(ValueError):
    """An MTViT shape that cannot be built; ``setting`` names the constructor argument at fault
    ('img_size', 'base_keep_rate', 'drop_loc' or 'multi_scale')."""

    def __init__(self, message: str, setting: str):
        super().__init__(message)
        self.setting = setting


def check_config(*, img_size: Tuple[int, int], patch_size: int, depth: int,
                 base_keep_rate: float, drop_loc: Sequence[int], multi_scale: bool
                 ) -> Tuple[int, int]:
    """The one check of an MTViT configuration (the model's, and main.py's before any data is
    read); returns the patch grid (gh, gw).

    Raises:
        ConfigError: naming the setting at fault and why.
    """
    if any(side % patch_size for side in img_size):
        raise ConfigError(f'input size {img_size[0]}x{img_size[1]} is not a multiple of the patch '
                          f'size {patch_size}', 'img_size')
    if not 0 < base_keep_rate <= 1:
        raise ConfigError(f'base_keep_rate {base_keep_rate} must be in (0, 1]', 'base_keep_rate')
    outside = tuple(loc for loc in drop_loc if not 0 <= loc < depth)
    if outside:
        raise ConfigError(f'block(s) {outside} of drop_loc {tuple(drop_loc)} do not exist; the '
                          f'model has blocks 0..{depth - 1}', 'drop_loc')
    grid = (img_size[0] // patch_size, img_size[1] // patch_size)
    if multi_scale and any(side % POOL for side in grid):
        raise ConfigError(f'multi-scale needs an even patch grid, but input size '
                          f'{img_size[0]}x{img_size[1]} / patch {patch_size} gives a '
                          f'{grid[0]}x{grid[1]} grid (use a multiple of {POOL * patch_size})',
                          'multi_scale')
    if multi_scale and (depth <= MULTI_SCALE_BLOCKS
                        or any(loc < MULTI_SCALE_BLOCKS for loc in drop_loc)):
        raise ConfigError(f'multi-scale runs blocks 0..{MULTI_SCALE_BLOCKS - 1} on two scales, so '
                          f'it needs depth > {MULTI_SCALE_BLOCKS} and no drop_loc before block '
                          f'{MULTI_SCALE_BLOCKS}; got depth {depth}, drop_loc {tuple(drop_loc)}',
                          'multi_scale')
    return grid


class MTViT(nn.Module):
    """DeiT with token mergence at ``drop_loc`` and an optional multi-scale front end.

    ``dense_depthwise`` picks how the fusion's depthwise convolutions are computed and
    ``matmul_embed`` how the patch embeddings and the half-resolution resize are, and whether
    the front end's two streams run as one tensor (same function either way): None by device
    (matrix products and one tensor on CUDA, except in traced models, whose FLOP counts keep
    the convolutions), True or False to force one. ``fused_norms=True`` runs the blocks' layer
    norms, in evaluation (no gradient) under fp16/bf16 autocast on CUDA, as Triton kernels fused
    with the residual addition before them and the cast after (the same function, the norms
    within one rounding step of the autocast type; see ``fused_norms``); off by default: on an
    H200 their launches' host time made the reduced models slower at batch 256.
    """

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            patch_size: int = 16,
            in_chans: int = 3,
            num_classes: int = 1000,
            embed_dim: int = 768,
            depth: int = 12,
            num_heads: int = 12,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            base_keep_rate: float = 0.7,
            drop_loc: Sequence[int] = (3, 6, 9),
            multi_scale: bool = False,
            dense_depthwise: Optional[bool] = None,
            matmul_embed: Optional[bool] = None,
            fused_norms: bool = False,
    ):
        super().__init__()
        self.img_size = to_2tuple(img_size)
        self.grid = check_config(img_size=self.img_size, patch_size=patch_size, depth=depth,
                                 base_keep_rate=base_keep_rate, drop_loc=drop_loc,
                                 multi_scale=multi_scale)
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.multi_scale = multi_scale
        self.matmul_embed = matmul_embed
        self.drop_loc = tuple(drop_loc)
        self.keep_rates = [base_keep_rate if i in self.drop_loc else 1. for i in range(depth)]

        self.patch_embed = PatchEmbed(img_size=self.img_size, patch_size=patch_size,
                                      in_chans=in_chans, embed_dim=embed_dim,
                                      strict_img_size=False)
        num_patches = self.grid[0] * self.grid[1]
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        if multi_scale:
            self.pos_embed_list = nn.ParameterList([
                nn.Parameter(torch.zeros(1, num_patches // POOL ** 2 + 1, embed_dim)),
                nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim)),
            ])
            self.up = ScaleFusion(embed_dim, self.grid, dense_depthwise=dense_depthwise)
            # The half-resolution copy's resize as two matrix products (constants of the size).
            for name, side in zip(('resize_rows', 'resize_cols'), self.img_size):
                self.register_buffer(name, bilinear_resize_matrix(side, side // POOL),
                                     persistent=False)
        else:
            self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        drop_path_rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop=drop_rate,
                  attn_drop=attn_drop_rate, drop_path=drop_path_rates[i],
                  keep_rate=self.keep_rates[i], fused_norms=fused_norms)
            for i in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self):
        pos_embeds = self.pos_embed_list if self.multi_scale else [self.pos_embed]
        for param in [*pos_embeds, self.cls_token]:
            trunc_normal_(param, std=.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        """Parameter names excluded from weight decay (biases and norms are 1-d, excluded anyway)."""
        if self.multi_scale:
            return {'cls_token', 'pos_embed_list.0', 'pos_embed_list.1'}
        return {'cls_token', 'pos_embed'}

    def get_classifier(self) -> nn.Module:
        """The classification head (timm's interface)."""
        return self.head

    def reset_classifier(self, num_classes: int):
        """Replaces the head by a freshly initialised one for ``num_classes`` classes."""
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            trunc_normal_(self.head.weight, std=.02)
            nn.init.zeros_(self.head.bias)

    def token_counts(self, keep_rate: Union[float, Sequence[float]]) -> List[Optional[int]]:
        """The ``tokens`` argument equivalent to ``keep_rate`` at this model's input size.

        Patch tokens each block keeps (its input count where it does not reduce; None for the
        blocks of the multi-scale front end). ``model(x, tokens=model.token_counts(rate))``
        equals ``model(x, keep_rate=rate)``; under torch.compile the ints become dynamic sizes,
        where a float rate would cost one recompilation per value.
        """
        keep_rates = per_block(keep_rate, len(self.blocks), 'keep_rate')
        first = MULTI_SCALE_BLOCKS if self.multi_scale else 0
        counts: List[Optional[int]] = [None] * first
        return counts + keep_counts(self.keep_rates[first:], self.grid[0] * self.grid[1],
                                    keep_rates[first:])

    def _apply(self, fn, recurse=True):
        # The resize weights follow the model's device but stay float64 (cast at use), so that
        # a round trip through half precision does not round them for good.
        exact = {name: getattr(self, name) for name in ('resize_rows', 'resize_cols')
                 if hasattr(self, name)}
        super()._apply(fn, recurse)
        for name, weights in exact.items():
            setattr(self, name, weights.to(getattr(self, name).device))
        return self

    def _use_matmul(self, x: torch.Tensor) -> bool:
        if self.matmul_embed is not None:
            return self.matmul_embed
        return uses_cuda_forms(x) and not torch.jit.is_tracing()

    def _embed(self, images: Sequence[torch.Tensor], pos_embeds: Sequence[torch.Tensor]
               ) -> torch.Tensor:
        """Tokens of one or more images (scales), one after the other, in one pass.

        Args: images (B, 3, H_i, W_i) each; pos_embeds (1, 1 + N_i, C) each.
        Returns (B, sum of 1 + N_i, C): per image, the class token then its patch tokens, plus
        the image's positions.
        """
        if self._use_matmul(images[0]):
            embedded = embed_patches_as_matmul(images, self.patch_embed.proj)
        else:
            embedded = [self.patch_embed(image) for image in images]
        # Positions added before the concatenation: under autocast the patches come in half
        # precision and their sums in float32, two passes over the tokens where a cast, a
        # concatenation and an addition of the float32 tokens were three (the same sums).
        # Each table split, not sliced: its gradient is one concatenation, strided as itself
        # (DDP warns of a gradient strided otherwise, on every process).
        parts = []
        for patches, table in zip(embedded, pos_embeds):
            cls_position, patch_positions = table.split([1, table.shape[1] - 1], dim=1)
            parts += [(self.cls_token + cls_position).expand(patches.shape[0], -1, -1),
                      patches + patch_positions]
        return self.pos_drop(torch.cat(parts, dim=1))

    def _multi_scale_front(self, x: torch.Tensor) -> torch.Tensor:
        """Runs the first blocks on both scales and fuses them. (B, 3, H, W) -> (B, 1 + N, C)."""
        blocks = self.blocks[:MULTI_SCALE_BLOCKS]
        if self._use_matmul(x):
            x = to_autocast_dtype(x)  # once, for both embeddings and the resize
            low_res = self.resize_rows.to(x.dtype) @ x @ self.resize_cols.to(x.dtype).t()
            # Both streams as one tensor, the low-resolution one first: half the launches.
            x_low, x_high = run_two_scales(
                blocks, self._embed([low_res, x], self.pos_embed_list), self.grid)
        else:
            low_res = F.interpolate(x, size=(x.shape[2] // POOL, x.shape[3] // POOL),
                                    mode='bilinear', align_corners=True)
            # One stream after the other: on the CPU the joint tensors' larger allocations cost
            # more (page faults) than the operations saved (MTViT-S's front end: 5% at batch 32).
            # Unpacked, not sliced: PyTorch 2.11's Dynamo cannot trace a ParameterList's slice.
            low_table, high_table = self.pos_embed_list
            x_low, x_high = run_per_stream(blocks, self._embed([low_res], [low_table]),
                                           self._embed([x], [high_table]), self.grid)
        return self.up(x_high, x_low)

    def forward_features(self, x: torch.Tensor, keep_rate=None, tokens=None
                         ) -> Tuple[torch.Tensor, List[Reduction]]:
        """Args: x (B, 3, H, W); keep_rate / tokens as in ``forward``.
        Returns the normalised tokens (B, K + 1, C) and the reductions made, in block order."""
        if tuple(x.shape[2:]) != self.img_size:
            raise ValueError(f'input size {tuple(x.shape[2:])} differs from the model\'s '
                             f'{self.img_size}')
        depth = len(self.blocks)
        keep_rates = per_block(keep_rate, depth, 'keep_rate')
        token_counts = per_block(tokens, depth, 'tokens')
        first = 0
        if self.multi_scale:
            first = MULTI_SCALE_BLOCKS
            if not is_scalar(tokens) and any(t is not None for t in token_counts[:first]):
                raise ValueError(f'tokens cannot be set for the first {first} blocks: they run on '
                                 f'both scales and never reduce')
            x = self._multi_scale_front(x)
        else:
            x = self._embed([x], [self.pos_embed])
        x, reductions = reduce_through(self.blocks[first:], x, keep_rates[first:],
                                       token_counts[first:])
        return self.norm(x), reductions

    def forward(self, x: torch.Tensor,
                keep_rate: Optional[Union[float, Sequence[float]]] = None,
                tokens: Optional[Union[int, Sequence[Optional[int]]]] = None,
                get_idx: bool = False):
        """Classifies images.

        Args:
            x: (B, 3, H, W) at the model's ``img_size``.
            keep_rate: rate in force at every reducing block (a number: Python, NumPy or a 0-d
                tensor) or per block (a sequence of ``depth`` floats); None uses the configured
                rates. 1 means no reduction.
            tokens: patch tokens to keep, for every block (a number, as ``keep_rate``) or per
                block (a sequence with None where not given); overrides the rates where given.
            get_idx: also return the reductions made, for visualisation.
        Returns:
            logits (B, num_classes); with ``get_idx`` also a list with one
            ``(kept_index (B, K), assignment (B, N_in - 1))`` per reduction, in block order.
        """
        x, reductions = self.forward_features(x, keep_rate=keep_rate, tokens=tokens)
        logits = self.head(x[:, 0])
        return (logits, reductions) if get_idx else logits


MTVIT_PRESETS = {
    'deit_tiny_patch16_shrink_base': dict(patch_size=16, embed_dim=192, depth=12, num_heads=3),
    'deit_small_patch16_shrink_base': dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    'deit_base_patch16_shrink_base': dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
}
MTVIT_MODELS = tuple(MTVIT_PRESETS)

# Keyword arguments timm's create_model passes to every entry point; MTViT has no hub weights.
_TIMM_FACTORY_KWARGS = ('pretrained_cfg', 'pretrained_cfg_overlay', 'cache_dir')


def _create_mtvit(name: str, pretrained: bool, kwargs: dict) -> MTViT:
    """Builds a preset, any keyword argument overriding it (tests build tiny models this way)."""
    if pretrained:
        raise ValueError(f'{name} has no downloadable weights; use --finetune with a checkpoint')
    for key in _TIMM_FACTORY_KWARGS:
        kwargs.pop(key, None)
    return MTViT(**{**MTVIT_PRESETS[name], **kwargs})


@register_model
def deit_tiny_patch16_shrink_base(pretrained: bool = False, **kwargs) -> MTViT:
    """MTViT-T: DeiT-Tiny (192 wide, 3 heads) with token mergence."""
    return _create_mtvit('deit_tiny_patch16_shrink_base', pretrained, kwargs)


@register_model
def deit_small_patch16_shrink_base(pretrained: bool = False, **kwargs) -> MTViT:
    """MTViT-S: DeiT-Small (384 wide, 6 heads) with token mergence."""
    return _create_mtvit('deit_small_patch16_shrink_base', pretrained, kwargs)


@register_model
def deit_base_patch16_shrink_base(pretrained: bool = False, **kwargs) -> MTViT:
    """MTViT-B: DeiT-Base (768 wide, 12 heads) with token mergence."""
    return _create_mtvit('deit_base_patch16_shrink_base', pretrained, kwargs)
