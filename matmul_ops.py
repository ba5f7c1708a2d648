"""Convolutions and a resize of MTViT as matrix products: the forms its CUDA paths use; and
``uses_cuda_forms`` / ``uses_cpu_forms``, by which MTViT's modules choose their device forms.

On CUDA, cuDNN runs MTViT's patch-embedding convolution and the fusion's depthwise convolutions
in half precision as slow generic kernels, and ``F.interpolate`` as a slow bilinear kernel; as
matrix products they run on the tensor cores, and so do their gradients. Each function here
computes the same function as the operation it replaces (tests/test_fast_paths.py checks each
against it and against the float64 reference); ``models_mtvit`` and ``multi_scale`` choose which
runs.
"""
import contextlib
from typing import Iterator, List, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


def bilinear_resize_matrix(size_in: int, size_out: int) -> torch.Tensor:
    """(size_out, size_in) float64 weights of a 1-d bilinear resize with ``align_corners=True``:
    ``matrix_h @ image @ matrix_w.T`` is ``F.interpolate(image, mode='bilinear',
    align_corners=True)`` (exactly in float64; float32 kernels round the source positions)."""
    scale = (size_in - 1) / (size_out - 1) if size_out > 1 else 0.
    source = torch.arange(size_out, dtype=torch.float64) * scale
    low = source.floor().long().clamp(max=size_in - 1)
    high = (low + 1).clamp(max=size_in - 1)
    rows = torch.arange(size_out)
    matrix = torch.zeros(size_out, size_in, dtype=torch.float64)
    matrix.index_put_((rows, low), 1 - (source - low), accumulate=True)
    return matrix.index_put_((rows, high), source - low, accumulate=True)


def embed_patches_as_matmul(images: Sequence[torch.Tensor], proj: nn.Conv2d
                            ) -> List[torch.Tensor]:
    """Patch embeddings (conv with kernel = stride = patch, no padding) of one or more images
    as one matrix product of all their patches with the flattened kernel: on CUDA, cuDNN runs
    this convolution in half precision as a slow implicit GEMM (1.25 ms of 14 for MTViT-S at
    batch 256 on an H100); for both scales of the multi-scale front end, one product.

    Args:
        images: (B, C_in, H_i, W_i) each, sides multiples of the patch.
        proj: the embedding's nn.Conv2d (C, C_in, p, p) with bias.
    Returns:
        (B, H_i/p * W_i/p, C) per image, patches row-major, as ``PatchEmbed`` gives them.
    The patches are copied in the precision autocast gives the product: a float32 image is
    cast as it is copied, one pass over it instead of a cast and a copy (the same values).
    """
    patch = proj.kernel_size[0]
    batch, chans = images[0].shape[:2]
    grids = [(image.shape[2] // patch, image.shape[3] // patch) for image in images]
    counts = [rows * cols for rows, cols in grids]
    # Each image's patches copied once, straight into their rows of one matrix.
    patches = images[0].new_empty(batch, sum(counts), chans * patch * patch,
                                  dtype=autocast_dtype(images[0]))
    for image, (rows, cols), part in zip(images, grids, patches.split(counts, dim=1)):
        part.view(batch, rows, cols, chans, patch, patch).copy_(
            image.reshape(batch, chans, rows, patch, cols, patch).permute(0, 2, 4, 1, 3, 5))
    return list(F.linear(patches, proj.weight.flatten(1), proj.bias).split(counts, dim=1))


_cuda_forms_forced = False


def uses_cuda_forms(x: torch.Tensor) -> bool:
    """Whether MTViT computes on ``x`` in its CUDA forms (the matrix products above): ``x`` on
    CUDA, or within ``cuda_forms``."""
    return x.is_cuda or _cuda_forms_forced


def uses_cpu_forms(x: torch.Tensor) -> bool:
    """Whether MTViT computes on ``x`` in its CPU forms (those of ``multi_scale`` and
    ``token_merging`` that work around slow CPU kernels): ``x`` on the CPU, outside
    ``cuda_forms``. Other devices (MPS, meta) get neither."""
    return x.device.type == 'cpu' and not _cuda_forms_forced


@contextlib.contextmanager
def cuda_forms() -> Iterator[None]:
    """Within it, every device-chosen form is the CUDA one on any device, so that the CPU can
    count and estimate what a GPU runs (``op_costs.step_costs``). The setting is the whole
    process's, not a thread's (a model computes the same function in either form)."""
    global _cuda_forms_forced
    previous, _cuda_forms_forced = _cuda_forms_forced, True
    try:
        yield
    finally:
        _cuda_forms_forced = previous


def autocast_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast would cast ``x`` to for a matrix product (autocast on, ``x`` floating
    but not float64); else ``x``'s own."""
    device = x.device.type
    # cuda and cpu first: Dynamo of PyTorch 2.11 cannot trace is_autocast_available.
    if ((device in ('cuda', 'cpu') or torch.amp.is_autocast_available(device))
            and torch.is_autocast_enabled(device)
            and x.is_floating_point() and x.dtype != torch.float64):
        return torch.get_autocast_dtype(device)
    return x.dtype


def to_autocast_dtype(x: torch.Tensor) -> torch.Tensor:
    """``x`` in ``autocast_dtype(x)``, as its matrix products would cast it anyway, done once
    for several; else unchanged (the same tensor, and no operation in a traced graph)."""
    dtype = autocast_dtype(x)
    return x if dtype == x.dtype else x.to(dtype)


def depthwise_tap_placement(grid: Tuple[int, int], kernel_size: int, dilation: int = 1
                            ) -> torch.Tensor:
    """Where each kernel tap lands in the matrix of a zero-padded, size-preserving conv.

    Args:
        grid: (gh, gw).
        kernel_size, dilation: of a square kernel (padding ``dilation * (kernel_size - 1) / 2``).
    Returns:
        (k * k, P * P) float 0/1, P = gh * gw cells row-major: row t is 1 at [q, p] (flattened)
        where output cell p reads input cell q through tap t (row-major). A kernel's taps
        (C, k * k) times this matrix give each channel's transposed conv matrix (C, P, P).
    """
    half = dilation * (kernel_size - 1) // 2

    def taps_1d(size: int) -> Tuple[torch.Tensor, torch.Tensor]:
        offset = torch.arange(size)[:, None] - torch.arange(size)[None, :] + half  # (in, out)
        tap = torch.div(offset, dilation, rounding_mode='floor')
        return tap, (offset % dilation == 0) & (tap >= 0) & (tap < kernel_size)

    tap_rows, valid_rows = taps_1d(grid[0])
    tap_cols, valid_cols = taps_1d(grid[1])
    # Indexed [input row, input col, output row, output col].
    tap = tap_rows[:, None, :, None] * kernel_size + tap_cols[None, :, None, :]
    valid = valid_rows[:, None, :, None] & valid_cols[None, :, None, :]
    taps = kernel_size ** 2
    tap = torch.where(valid, tap, taps).flatten()
    return F.one_hot(tap, taps + 1)[:, :taps].t().float()


def depthwise_as_matmul(u: torch.Tensor, conv: nn.Conv2d, placement: torch.Tensor
                        ) -> torch.Tensor:
    """A depthwise ``conv`` applied to channel-major tokens as one batched matrix product.

    Each channel's convolution over the grid is a (P, P) matrix of that channel's kernel taps,
    itself a product of the taps with their placements, so that the conv and its gradients
    are tensor-core products rather than a depthwise kernel, which runs slowly in half
    precision on CUDA.

    Args:
        u: (C, B, P) tokens of the grid, channel-major.
        conv: depthwise nn.Conv2d (C, 1, k, k) with bias.
        placement: (k * k, P * P) from ``depthwise_tap_placement`` for the conv's kernel.
    Returns:
        (C, B, P), the conv of the (B, C, gh, gw) map, laid out like ``u``.
    """
    cells = u.shape[2]
    matrices = (conv.weight.flatten(1) @ placement).view(-1, cells, cells)  # (C, P_in, P_out)
    return torch.baddbmm(conv.bias[:, None, None], u, matrices)
