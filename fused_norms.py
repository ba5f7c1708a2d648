"""MTViT's layer norms on CUDA under half-precision autocast, fused with the addition before them
and the cast after them (opt-in: MTViT's ``fused_norms=True``).

Under fp16/bf16 autocast a block's residual stream stays float32: autocast runs each layer norm
in float32 (reading and writing 4 bytes per element) and leaves the cast of its result to the
next matrix product, a kernel of its own; and the residual addition before the second norm
writes the sum that norm reads again. These are memory-bound kernels: on an H200 the norms, the
float32 additions and the casts took 3.8 of MTViT-S multi-scale's 11.7 ms at batch 256. Here
one Triton kernel does each chain:

- ``norm_for_matmul``: a norm written straight in the autocast precision (6 bytes per element
  of the stream moved instead of 14);
- ``add_and_norm``: a residual addition (written in float32, as before) with the norm of the
  sum in the autocast precision (12 bytes instead of 24).

The sum is the same float32 addition; the norm is computed in float32 as aten's, its statistics
summed in another order, then rounded to the autocast type as the product's cast would round
it. They run only where asked (``fused=True``), where nothing needs their gradient
(``torch.no_grad``, ``torch.inference_mode``), on CUDA tensors (or within
``matmul_ops.cuda_forms``, so that ``op_costs`` counts them on the CPU), outside compiled and
exported graphs (inductor fuses these chains itself), and from ``FUSED_MIN_ROWS`` rows up.
Elsewhere they are the plain operations. Where they run, the ``nn.LayerNorm`` modules are not
called, so hooks on them do not fire. Each fused operation is an operation of the
dispatcher, ``mtvit::layer_norm_to`` and ``mtvit::add_layer_norm_to``, whose CPU kernel is the
plain composition: the reference the tests hold the Triton kernel to (run by Triton's
interpreter on the CPU).
"""
import contextlib
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from matmul_ops import uses_cuda_forms
from token_merging import exporting

try:
    import triton
    import triton.language as tl
except ImportError:  # the CUDA kernels need Triton; without it the plain operations run
    triton = None

__all__ = ['FUSED_MIN_ROWS', 'add_and_norm', 'fused_norms_apply', 'launch_layer_norm',
           'norm_for_matmul']

FUSED_MIN_ROWS = 4096
"""Fewest rows (tokens of the batch) for the fused kernels. Below, a forward is bound by the
host's launches rather than by memory traffic, and a Triton launch (its Python binder) costs
the host more than the two or three aten launches it replaces (MTViT-S: about 20 images of 197
tokens). On an H200 (Triton 3.6) a launch cost the host about 80 us against aten's norm's 11:
at batch 256 that made the reduced MTViT-S models, already as long on the host as on the
device, slower, and keep 1 faster (README, "Results on NVIDIA GPUs")."""

ROWS_PER_PROGRAM = 4
"""Rows each Triton program normalises: 4 rows of 384 (MTViT-S), padded to 512 columns, give a
program's 4 warps 16 elements per thread, 12 of them live."""

_HALF_DTYPES = (torch.float16, torch.bfloat16)
_BRANCH_DTYPES = (torch.float32,) + _HALF_DTYPES

if triton is not None:
    @triton.jit(do_not_specialize=['num_rows'])
    def _layer_norm_kernel(x_ptr, branch_ptr, sum_ptr, out_ptr, weight_ptr, bias_ptr,
                           num_rows, num_cols, x_row_stride, branch_row_stride, eps,
                           HAS_BRANCH: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
        """Rows ``ROWS * program_id`` on: s = x (+ branch), written to ``sum_ptr`` where there is
        a branch; ``out`` = layer norm of s (float32 statistics, biased variance) in out's type."""
        rows = (tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS))[:, None]
        cols = tl.arange(0, BLOCK)[None, :]
        mask = (rows < num_rows) & (cols < num_cols)
        x = tl.load(x_ptr + rows * x_row_stride + cols, mask=mask, other=0.).to(tl.float32)
        if HAS_BRANCH:
            x += tl.load(branch_ptr + rows * branch_row_stride + cols, mask=mask,
                         other=0.).to(tl.float32)
            tl.store(sum_ptr + rows * num_cols + cols, x, mask=mask)
        # Divisions rounded to nearest, as aten's (Triton's '/' is the approximate one).
        mean = tl.div_rn(tl.sum(x, axis=1)[:, None], num_cols.to(tl.float32))
        centred = tl.where(mask, x - mean, 0.)
        variance = tl.div_rn(tl.sum(centred * centred, axis=1)[:, None], num_cols.to(tl.float32))
        inv_std = tl.rsqrt(variance + eps)
        weight = tl.load(weight_ptr + cols, mask=cols < num_cols, other=0.).to(tl.float32)
        bias = tl.load(bias_ptr + cols, mask=cols < num_cols, other=0.).to(tl.float32)
        out = centred * inv_std * weight + bias
        tl.store(out_ptr + rows * num_cols + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(..., C) -> (R, C) with unit column stride, a view where the layout allows."""
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def launch_layer_norm(x: torch.Tensor, branch: Optional[torch.Tensor], weight: torch.Tensor,
                      bias: torch.Tensor, eps: float, dtype: torch.dtype
                      ) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
    """The Triton kernel on ``x`` (..., C) float32, ``branch`` (the same shape, any float type)
    or None, ``weight`` and ``bias`` (C,) contiguous. Returns ``x + branch`` (float32; None
    without a branch) and its layer norm in ``dtype``, both contiguous and shaped as ``x``.
    Runs wherever Triton can: on CUDA, or on the CPU in Triton's interpreter (the tests)."""
    x_rows = _rows(x)
    num_rows, num_cols = x_rows.shape
    branch_rows = x_rows if branch is None else _rows(branch)
    total = None if branch is None else torch.empty(x.shape, dtype=torch.float32,
                                                    device=x.device)
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    # Triton launches on the current CUDA device, which need not be x's.
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _layer_norm_kernel[(triton.cdiv(num_rows, ROWS_PER_PROGRAM),)](
            x_rows, branch_rows, out if total is None else total, out, weight, bias,
            num_rows, num_cols, x_rows.stride(0), branch_rows.stride(0), eps,
            HAS_BRANCH=branch is not None, ROWS=ROWS_PER_PROGRAM,
            BLOCK=triton.next_power_of_2(num_cols))
    return total, out


def _layer_norm_to(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                   dtype: torch.dtype) -> torch.Tensor:
    """The plain form of ``mtvit::layer_norm_to``: x (..., C) -> its layer norm, computed in
    float32 and cast to ``dtype`` (what autocast's norm and the product's cast make)."""
    return F.layer_norm(x.float(), x.shape[-1:], weight, bias, eps).to(dtype)


def _add_layer_norm_to(x: torch.Tensor, branch: torch.Tensor, weight: torch.Tensor,
                       bias: torch.Tensor, eps: float, dtype: torch.dtype
                       ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The plain form of ``mtvit::add_layer_norm_to``: x (..., C) float32, branch (the same
    shape) -> ``x + branch`` and ``_layer_norm_to`` of it."""
    total = x + branch
    return total, _layer_norm_to(total, weight, bias, eps, dtype)


def _shapes(x: torch.Tensor, *args) -> Tuple[torch.Tensor, torch.Tensor]:
    """Meta kernel (fake tensors, shape propagation): the float32 sum and the norm in the
    ``dtype`` passed last."""
    return x.new_empty(x.shape, dtype=torch.float32), x.new_empty(x.shape, dtype=args[-1])


# Operations of the dispatcher (not torch.library.custom_op, whose Python wrapper costs the host
# about 5 us a call against 1 us here), so that dispatch modes (op_costs) see one kernel each.
# No autograd kernel: they run only where no gradient is wanted (fused_norms_apply).
_LIBRARY = torch.library.Library('mtvit', 'FRAGMENT')
_LIBRARY.define('layer_norm_to(Tensor x, Tensor weight, Tensor bias, float eps, '
                'ScalarType dtype) -> Tensor')
_LIBRARY.define('add_layer_norm_to(Tensor x, Tensor branch, Tensor weight, Tensor bias, '
                'float eps, ScalarType dtype) -> (Tensor, Tensor)')
_LIBRARY.impl('layer_norm_to', _layer_norm_to, 'CPU')
_LIBRARY.impl('add_layer_norm_to', _add_layer_norm_to, 'CPU')
_LIBRARY.impl('layer_norm_to', lambda x, *args: _shapes(x, *args)[1], 'Meta')
_LIBRARY.impl('add_layer_norm_to', _shapes, 'Meta')
if triton is not None:
    _LIBRARY.impl('layer_norm_to',
                  lambda x, weight, bias, eps, dtype:
                  launch_layer_norm(x, None, weight, bias, eps, dtype)[1], 'CUDA')
    _LIBRARY.impl('add_layer_norm_to',
                  lambda x, branch, weight, bias, eps, dtype:
                  launch_layer_norm(x, branch, weight, bias, eps, dtype), 'CUDA')


def fused_norms_apply(x: torch.Tensor, norm: nn.Module, fused: bool) -> Optional[torch.dtype]:
    """The precision the fused kernels write ``norm(x)`` in, or None where they do not run.

    They run where ``fused`` is True, ``x`` (B, N, C) has at least ``FUSED_MIN_ROWS`` rows
    (B * N) and is the float32 residual stream of CUDA (or of ``cuda_forms``) under fp16/bf16
    autocast, ``norm`` is an affine ``nn.LayerNorm`` over C with float32 parameters on x's
    device, gradient mode is off, and nothing is compiling, exporting or tracing.
    """
    # Compiled and exported graphs: inductor fuses these chains itself; exporters need aten's
    # operations; and the operations have no backward. Asked before the row count, which on
    # symbolic shapes would specialise (guard) the batch size.
    if (not fused or torch.compiler.is_compiling() or exporting() or torch.jit.is_tracing()
            or torch.is_grad_enabled() or not uses_cuda_forms(x)
            or x.shape[:-1].numel() < FUSED_MIN_ROWS):
        return None
    device = x.device.type
    if (device not in ('cuda', 'cpu') or not torch.is_autocast_enabled(device)
            or (x.is_cuda and triton is None)):
        return None
    dtype = torch.get_autocast_dtype(device)
    applies = (dtype in _HALF_DTYPES and x.dtype == torch.float32
               and type(norm) is nn.LayerNorm and tuple(norm.normalized_shape) == x.shape[-1:]
               and norm.weight is not None and norm.bias is not None
               and all(param.dtype == torch.float32 and param.is_contiguous()
                       and param.device == x.device for param in (norm.weight, norm.bias)))
    return dtype if applies else None


def norm_for_matmul(x: torch.Tensor, norm: nn.Module, fused: bool) -> torch.Tensor:
    """``norm(x)`` for a matrix product to read: x (B, N, C) -> (B, N, C). Where the fused
    kernels run (``fused_norms_apply``) it comes in the autocast precision, as the product's
    autocast would cast it; elsewhere it is ``norm(x)`` itself."""
    dtype = fused_norms_apply(x, norm, fused)
    if dtype is None:
        return norm(x)
    return torch.ops.mtvit.layer_norm_to(x, norm.weight, norm.bias, norm.eps, dtype)


def add_and_norm(x: torch.Tensor, branch: torch.Tensor, norm: nn.Module, fused: bool
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """A residual addition and the norm after it: x, branch (B, N, C) -> ``x + branch`` and
    ``norm_for_matmul(x + branch, norm, fused)``, in one kernel where the fused kernels run."""
    dtype = fused_norms_apply(x, norm, fused)
    if (dtype is None or branch.shape != x.shape or branch.dtype not in _BRANCH_DTYPES
            or branch.device != x.device):
        total = x + branch
        return total, norm_for_matmul(total, norm, fused)
    return torch.ops.mtvit.add_layer_norm_to(x, branch, norm.weight, norm.bias, norm.eps, dtype)
