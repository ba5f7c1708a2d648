"""The multi-scale front end of MTViT (SPEC 1.3): blocks 0-2 on a full- and a half-resolution
stream, with the same weights, then a fusion module that makes one full-resolution stream.

The full-resolution stream attends on a 2x2-pooled copy of itself in blocks 1 and 2. The two
streams run either one after the other (``run_per_stream``) or as one tensor
(``run_two_scales``: each block's norms, projections and MLP once for both, half the launches),
the same function; ``models_mtvit`` chooses by device.
"""
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from fused_norms import add_and_norm, norm_for_matmul
from matmul_ops import (depthwise_as_matmul, depthwise_tap_placement, uses_cpu_forms,
                        uses_cuda_forms)

MULTI_SCALE_BLOCKS = 3
"""Blocks that run on both scales before the fusion module; reductions must come after them."""

POOL = 2
"""The low-resolution stream and the pooled attention work on a grid halved in each direction."""


def pool_patch_grid(patches: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """2x2 average pooling (stride 2) of patch tokens laid out row-major on a grid.

    Args:
        patches: (B, gh * gw, C).
        grid: (gh, gw), both even.
    Returns:
        (B, gh/2 * gw/2, C).
    """
    batch, _, dim = patches.shape
    # A mean over the cells of a view, whose backward is a broadcast (on an H100 one reduction
    # is 0.27 ms less per batch of 256 than avg_pool2d forward, 1 ms less per training step).
    cells = patches.reshape(batch, grid[0] // POOL, POOL, grid[1] // POOL, POOL, dim)
    if _one_dimension_at_a_time(patches):
        return cells.mean(dim=4).mean(dim=2).reshape(batch, -1, dim)
    return cells.mean(dim=(2, 4)).reshape(batch, -1, dim)


def _one_dimension_at_a_time(x: torch.Tensor) -> bool:
    """Whether the 2x2 cells of ``x`` are reduced (forward or backward) one dimension at a time:
    the CPU reduces over two strided dimensions at once ten times slower (6 against 0.6 ms for
    MTViT-S at batch 32). Not in half precision, where the intermediate would round once more."""
    return uses_cpu_forms(x) and x.dtype in (torch.float32, torch.float64)


def broadcast_cells(low: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """Each token of a (B, gh * gw, C) grid repeated over its 2x2 cells: a (B, gh, 2, gw, 2, C)
    view, for adding to a doubled grid without materialising the upsampled copy."""
    batch, _, dim = low.shape
    gh, gw = grid
    cells = low.reshape(batch, gh, 1, gw, 1, dim)
    if _one_dimension_at_a_time(low):
        # Expanded one dimension at a time, so that the backward reduces one at a time.
        return cells.expand(batch, gh, 1, gw, POOL, dim).expand(batch, gh, POOL, gw, POOL, dim)
    return cells.expand(batch, gh, POOL, gw, POOL, dim)


def upsample_patch_grid(patches: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """Nearest 2x upsampling of patch tokens: each token is repeated over its 2x2 cells.

    Args:
        patches: (B, gh * gw, C) on the small grid.
        grid: (gh, gw), the small grid.
    Returns:
        (B, 2gh * 2gw, C), row-major on the doubled grid.
    """
    return broadcast_cells(patches, grid).reshape(patches.shape[0], -1, patches.shape[2])


def forward_pooled(block: nn.Module, x: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """The full-resolution stream through ``block`` (an MTViT ``Block``), attention on a
    2x2-pooled copy upsampled back (nearest), the MLP at full resolution.

    Args: x (B, 1 + gh * gw, C); grid (gh, gw). Returns (B, 1 + gh * gw, C).
    """
    # Split, not sliced: the backward of a split is one concatenation of the pieces' gradients,
    # where each slice's writes a zero-filled gradient of the whole input, summed after.
    cls_token, patches = x.split([1, x.shape[1] - 1], dim=1)
    pooled = torch.cat([cls_token, pool_patch_grid(patches, grid)], dim=1)
    normed = norm_for_matmul(pooled, block.norm1, block.fused_norms)
    attn_cls, attn_patches = block.drop_path(block.attn(normed)[0]).split(
        [1, pooled.shape[1] - 1], dim=1)
    x = torch.cat([cls_token + attn_cls, add_upsampled(patches, attn_patches, grid)], dim=1)
    return x + block.drop_path(block.mlp(norm_for_matmul(x, block.norm2, block.fused_norms)))


def add_upsampled(patches: torch.Tensor, low: torch.Tensor, grid: Tuple[int, int]
                  ) -> torch.Tensor:
    """``patches`` (B, gh * gw, C) plus ``low`` (B, gh/2 * gw/2, C) upsampled (nearest), by
    broadcasting over the 2x2 cells without materialising the upsampled copy."""
    batch, _, dim = patches.shape
    low_grid = (grid[0] // POOL, grid[1] // POOL)
    total = (patches.reshape(batch, low_grid[0], POOL, low_grid[1], POOL, dim)
             + broadcast_cells(low, low_grid))
    return total.reshape(batch, -1, dim)


def run_per_stream(blocks: Sequence[nn.Module], x_low: torch.Tensor, x_high: torch.Tensor,
                   grid: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Blocks 0-2 on each stream, one stream after the other.

    Args: x_low (B, L, C), L = 1 + gh/2 * gw/2; x_high (B, 1 + gh * gw, C); grid (gh, gw).
    Returns both streams, in the same order and shapes.
    """
    for index, block in enumerate(blocks):
        x_low = block(x_low)[0]
        x_high = block(x_high)[0] if index == 0 else forward_pooled(block, x_high, grid)
    return x_low, x_high


def run_two_scales(blocks: Sequence[nn.Module], x: torch.Tensor, grid: Tuple[int, int]
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Blocks 0-2 on both streams held as one tensor: ``run_per_stream``'s function with each
    block's norms, projections and MLP run once over both streams. In block 0 attention runs
    within each stream; in blocks 1 and 2, where both streams attend over L tokens, as one call
    over 2B sequences. The streams never attend to each other, and stochastic depth draws once
    per sample and stream, as when they ran one after the other.

    Args:
        x: (B, L + 1 + gh * gw, C): the low-resolution stream's L = 1 + gh/2 * gw/2 tokens,
            then the full one's.
        grid: (gh, gw) of the full-resolution stream.
    Returns:
        the two streams as ``run_per_stream`` returns them: (B, L, C), (B, 1 + gh * gw, C).
    """
    batch, num_tokens, dim = x.shape
    num_low = 1 + (grid[0] // POOL) * (grid[1] // POOL)
    num_patches = grid[0] * grid[1]
    if num_tokens != num_low + 1 + num_patches:
        raise ValueError(f'{num_tokens} tokens are not the two streams of a {grid[0]}x{grid[1]} '
                         f'grid ({num_low} + {1 + num_patches})')
    for index, block in enumerate(blocks):
        if index == 0:
            normed = norm_for_matmul(x, block.norm1, block.fused_norms)
            attn = block.attn.forward_segments(normed, (num_low, num_tokens - num_low))
            x, normed = add_and_norm(x, drop_path_streams(block, attn, num_low), block.norm2,
                                     block.fused_norms)
        else:
            # Split, not sliced, as in forward_pooled: one concatenation in the backward.
            low, high_cls, high_patches = x.split([num_low, 1, num_patches], dim=1)
            queries = torch.cat([low, high_cls, pool_patch_grid(high_patches, grid)], dim=1)
            normed = norm_for_matmul(queries, block.norm1, block.fused_norms)
            attn = block.attn(normed.reshape(2 * batch, num_low, dim))[0]
            attn = drop_path_streams(block, attn.reshape(batch, 2 * num_low, dim), num_low)
            x, normed = add_and_norm(x, upsample_pooled(attn, num_low, grid), block.norm2,
                                     block.fused_norms)
        x = x + drop_path_streams(block, block.mlp(normed), num_low)
    x_low, x_high = x.split([num_low, num_tokens - num_low], dim=1)
    return x_low, x_high


def upsample_pooled(attn: torch.Tensor, num_low: int, grid: Tuple[int, int]) -> torch.Tensor:
    """The attention of blocks 1-2 laid out as both streams' tokens, the pooled patches
    upsampled (nearest): (B, 2L, C), the low-resolution stream's L tokens then the full one's
    class token and pooled patches -> (B, L + 1 + gh * gw, C), in the attention's precision.

    So that the residual addition is one addition of whole tensors, which ``add_and_norm`` can
    make with the norm after it; rather than three additions of the parts and a concatenation
    of their float32 sums (under autocast this concatenation is of half-precision values, half
    the bytes; its backward is a split, free, as that of the parts' concatenation).
    """
    front, patches = attn.split([num_low + 1, num_low - 1], dim=1)
    return torch.cat([front, upsample_patch_grid(patches, (grid[0] // POOL, grid[1] // POOL))],
                     dim=1)


def drop_path_streams(block: nn.Module, x: torch.Tensor, num_low: int) -> torch.Tensor:
    """``block``'s stochastic depth with one draw per sample and stream: x (B, N, C), the first
    ``num_low`` tokens one stream, the rest the other."""
    if not block.training or isinstance(block.drop_path, nn.Identity):
        return x
    batch, num_tokens, _ = x.shape
    # The block's own DropPath applied to ones for 2B samples: its factor (0, or 1 / keep
    # probability) for each sample's two streams, in one draw.
    factor = block.drop_path(x.new_ones(2 * batch, 1, 1)).view(batch, 2, 1)
    per_token = torch.cat([factor[:, :1].expand(-1, num_low, -1),
                           factor[:, 1:].expand(-1, num_tokens - num_low, -1)], dim=1)
    return x * per_token


DENSE_DEPTHWISE_MAX_CELLS = 576
"""Largest patch grid (gh * gw cells, 24 x 24: 384 pixels at patch 16) whose fusion convolutions
run as per-channel matrix products on CUDA: the matrices take C * (gh * gw)^2 elements (29 MB
in half precision for MTViT-S at 224, 255 MB at 384), the tap placements 58 * (gh * gw)^2."""


def _own_backward_applies() -> bool:
    """Whether a convolution's own autograd Function runs: a gradient is taken, eagerly (tracers
    and compilers get nn.Conv2d's operations, which they differentiate themselves)."""
    return (torch.is_grad_enabled() and not torch.jit.is_tracing()
            and not torch.compiler.is_compiling())


def _with_standard_strides(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """A convolution's weight gradient viewed with the standard strides of ``shape``, the
    weight's. oneDNN strides it by the input's layout and the thread count, differently on
    size-1 dimensions: the same memory, which is_contiguous ignores (so .contiguous() keeps
    them), but DDP compares strides with its buckets' and warns on every process."""
    return grad.reshape(-1).view(shape)


class _SameDepthwiseConv(torch.autograd.Function):
    """A stride-1 depthwise convolution with 'same' padding (``dilation * (kernel - 1) / 2``),
    whose input gradient is the forward convolution of the output gradient with the flipped
    kernel (its adjoint). For MTViT-S's 7x7 dilated one at batch 32 on the CPU, PyTorch's own
    backward takes 38 ms, 20 of them for the input gradient, which this computes in 1.2 ms.
    The backward is made of differentiable operations (double backward works), and forward-mode
    derivatives and vmap are given, as nn.Conv2d has them."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, padding: int,
                dilation: int) -> torch.Tensor:
        return F.conv2d(x, weight, bias, padding=padding, dilation=dilation,
                        groups=weight.shape[0])

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, _, padding, dilation = inputs
        ctx.save_for_backward(x, weight)
        ctx.save_for_forward(x, weight)
        ctx.geometry = dict(padding=padding, dilation=dilation, groups=weight.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = F.conv2d(grad, weight.flip(2, 3), **ctx.geometry)
        if ctx.needs_input_grad[1]:
            grad_weight = _with_standard_strides(torch.nn.grad.conv2d_weight(
                x, weight.shape, grad, **ctx.geometry), weight.shape)
        if ctx.needs_input_grad[2]:
            # The spatial sum first: the gradient may be a strided view (B, C, H, W) of tokens
            # (B, 1 + H * W, C), over which one three-dimension reduction runs 25 times slower.
            # Accumulated in float32 at least, so that half precision rounds once.
            accumulate = torch.promote_types(grad.dtype, torch.float32)
            grad_bias = grad.sum(dim=(2, 3), dtype=accumulate).sum(dim=0).to(grad.dtype)
        return grad_x, grad_weight, grad_bias, None, None

    @staticmethod
    def jvp(ctx, x_tangent, weight_tangent, bias_tangent, *_):
        x, weight = ctx.saved_tensors
        tangent = 0
        if x_tangent is not None:
            tangent = tangent + F.conv2d(x_tangent, weight, **ctx.geometry)
        if weight_tangent is not None:
            tangent = tangent + F.conv2d(x, weight_tangent, **ctx.geometry)
        if bias_tangent is not None:
            tangent = tangent + bias_tangent[:, None, None]
        return tangent


class DepthwiseConv2d(nn.Conv2d):
    """Depthwise convolution with bias that keeps the spatial size (stride 1, odd kernel), an
    ``nn.Conv2d`` with a faster backward on the CPU (``_SameDepthwiseConv``)."""

    def __init__(self, dim: int, kernel_size: int, dilation: int = 1):
        if kernel_size % 2 == 0:
            raise ValueError(f'kernel_size {kernel_size} is even: no padding keeps the size')
        super().__init__(dim, dim, kernel_size, padding=dilation * (kernel_size - 1) // 2,
                         dilation=dilation, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        # Autocast does not reach into an autograd Function: under it, nn.Conv2d's casts.
        if (not uses_cpu_forms(x) or not _own_backward_applies()
                or torch.is_autocast_enabled('cpu') or self.padding != self._same_padding()):
            return super().forward(x)
        return _SameDepthwiseConv.apply(x, self.weight, self.bias, self.padding[0],
                                        self.dilation[0])

    def _same_padding(self) -> Tuple[int, int]:
        return tuple(d * (k - 1) // 2 for d, k in zip(self.dilation, self.kernel_size))


class _StandardGradientStrides(torch.autograd.Function):
    """The identity on a weight, whose gradient comes back with standard strides
    (``_with_standard_strides``): for the fusion's 1x1 convolution, whose input is a
    channels-last view of tokens, oneDNN's strides differ with two threads. Double backward,
    forward-mode derivatives and vmap work, as for nn.Conv2d."""

    generate_vmap_rule = True

    @staticmethod
    def forward(weight: torch.Tensor) -> torch.Tensor:
        return weight.view_as(weight)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.shape = inputs[0].shape

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _with_standard_strides(grad, ctx.shape)

    @staticmethod
    def jvp(ctx, weight_tangent: torch.Tensor) -> torch.Tensor:
        return weight_tangent


class PointwiseConv2d(nn.Conv2d):
    """1x1 convolution with bias whose weight gradient has the weight's strides (see
    ``_StandardGradientStrides``)."""

    def __init__(self, dim: int):
        super().__init__(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        if not _own_backward_applies():
            return super().forward(x)
        return self._conv_forward(x, _StandardGradientStrides.apply(self.weight), self.bias)


class LargeKernelConv(nn.Module):
    """Depthwise 3x3, depthwise 7x7 dilated by 2, then pointwise 1x1: a large receptive field
    at a small cost. (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv0 = DepthwiseConv2d(dim, 3)
        self.conv_spatial = DepthwiseConv2d(dim, 7, dilation=2)
        self.conv1 = PointwiseConv2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        return self.conv1(self.conv_spatial(self.conv0(x)))


class ScaleFusion(nn.Module):
    """Fuses the low- and full-resolution streams into one full-resolution stream (SPEC 1.3).

    Two implementations of the same function: convolutions on a (B, C, gh, gw) view of the
    tokens (CPU, and large grids), and per-channel matrix products on channel-major tokens
    (CUDA, where half-precision depthwise convolutions and their layout transforms cost more
    than the rest of the front end). ``dense_depthwise`` forces one (None: by device); traced
    models (the FLOP counters) always get the convolutions.
    """

    def __init__(self, dim: int, grid: Tuple[int, int], dense_depthwise: Optional[bool] = None):
        super().__init__()
        self.grid = tuple(grid)
        self.lka = LargeKernelConv(dim)
        self.peg = DepthwiseConv2d(dim, 3)
        self.dense_depthwise = dense_depthwise
        small = large = None
        fits = self.grid[0] * self.grid[1] <= DENSE_DEPTHWISE_MAX_CELLS
        if dense_depthwise and not fits:
            raise ValueError(f'dense_depthwise: a {self.grid[0]}x{self.grid[1]} patch grid is over '
                             f'the {DENSE_DEPTHWISE_MAX_CELLS} cells the matrices are built for')
        if fits and dense_depthwise is not False:
            # conv0 and peg share the 3x3 placement; each conv's own size and dilation decide.
            small, large = (depthwise_tap_placement(self.grid, conv.kernel_size[0],
                                                    dilation=conv.dilation[0])
                            for conv in (self.lka.conv0, self.lka.conv_spatial))
        # Constants of the grid, not weights: kept out of checkpoints.
        self.register_buffer('placement_3x3', small, persistent=False)
        self.register_buffer('placement_7x7_dilated', large, persistent=False)

    def _use_dense(self, x: torch.Tensor) -> bool:
        if self.dense_depthwise is not None:
            return self.dense_depthwise
        return (uses_cuda_forms(x) and self.placement_3x3 is not None
                and not torch.jit.is_tracing())

    def forward(self, x_high: torch.Tensor, x_low: torch.Tensor) -> torch.Tensor:
        """Args: x_high (B, 1 + gh * gw, C); x_low (B, 1 + gh/2 * gw/2, C).
        Returns (B, 1 + gh * gw, C)."""
        fuse = self._fuse_dense if self._use_dense(x_high) else self._fuse_conv
        high_cls, high = x_high.split([1, x_high.shape[1] - 1], dim=1)
        low_cls, low = x_low.split([1, x_low.shape[1] - 1], dim=1)
        return torch.cat([high_cls + low_cls, fuse(high, low)], dim=1)

    def _fuse_conv(self, high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        """(B, P, C), (B, P/4, C) patch tokens -> (B, P, C), through nn.Conv2d."""
        batch, _, dim = high.shape
        low_grid = (self.grid[0] // POOL, self.grid[1] // POOL)
        to_map = (batch, self.grid[0], self.grid[1], dim)
        u = upsample_patch_grid(low, low_grid).reshape(to_map).permute(0, 3, 1, 2)
        u = u + self.lka(u)
        u = u + high.reshape(to_map).permute(0, 3, 1, 2)
        u = u + self.peg(u)
        return u.flatten(2).transpose(1, 2)

    def _fuse_dense(self, high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        """(B, P, C), (B, P/4, C) patch tokens -> (B, P, C), as matrix products."""
        batch, _, dim = high.shape
        low_h, low_w = self.grid[0] // POOL, self.grid[1] // POOL
        # Channel-major (C, B, P), upsampled (nearest) in the same copy.
        u = (low.permute(2, 0, 1).reshape(dim, batch, low_h, 1, low_w, 1)
             .expand(dim, batch, low_h, POOL, low_w, POOL).reshape(dim, batch, -1))
        lka = self.lka
        t = depthwise_as_matmul(u, lka.conv0, self.placement_3x3)
        t = depthwise_as_matmul(t, lka.conv_spatial, self.placement_7x7_dilated)
        t = torch.addmm(lka.conv1.bias[:, None], lka.conv1.weight.flatten(1), t.reshape(dim, -1))
        u = u + t.reshape(dim, batch, -1)
        u = u + high.permute(2, 0, 1)
        u = u + depthwise_as_matmul(u, self.peg, self.placement_3x3)
        return u.permute(1, 2, 0)
