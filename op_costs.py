"""What a model costs: its FLOPs per image in the paper's convention (``count_flops``, fvcore;
``count_macs``, torchprofile's cross-check), and what a forward (or a training step) costs a
GPU, counted on any device (the CPU included): the operations that run a kernel, the bytes each
one moves and the FLOPs of the matrix products, convolutions and fused attention, and from them
a roofline estimate of the eager GPU time.

In eager mode a GPU runs one kernel (at least) per such operation. At small batches each costs
a launch; at large batches most of a ViT's kernels (norms, casts, residual additions, GELU) are
bound by memory traffic, the matrix products by arithmetic. ``RooflineGPU.seconds`` takes, per
operation, the larger of bytes / bandwidth and FLOPs / peak, and at least ``min_kernel_s``.

``H100``'s two rates are fitted (over a grid) to one H100's eager fp16 inference figures at
batch 256 for the code of that measurement: DeiT-S 13.5 ms, MTViT-S single scale 10.6 ms,
multi-scale 12.9 ms, estimated 13.5, 10.8 and 12.4 ms; an in-sample fit, ratios within 4%.
Out of sample, from the same measurements: the bf16 training step's ratios (estimated 1.32x and
1.14x against the measured 1.32x and 1.10x); but keep 1 is estimated at 0.99x against a measured
1.07x, because a kernel's inefficiency is invisible to a byte count (DeiT-S's patch-embedding
convolution, which cuDNN ran in half precision in 1.25 ms, counts here as about 0.06 ms). It
estimates eager kernels as PyTorch launches them, in their CUDA forms (``matmul_ops.cuda_forms``,
whatever the device); compiled (fused) code moves fewer bytes.
"""
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from matmul_ops import cuda_forms
from utils import amp_autocast, synchronize

__all__ = ['COUNT_TRAIN_BATCH', 'KernelOps', 'OpCost', 'RooflineGPU', 'H100', 'busy_time',
           'count_flops', 'count_macs', 'count_ops', 'print_op_counts', 'print_roofline',
           'profile_step', 'step_costs', 'tensor_bytes']

MATRIX_PRODUCTS = ('mm', 'addmm', 'bmm', 'baddbmm')
GATHERS = ('gather', 'index_select', 'embedding', 'index')
OVERWRITES = ('copy_', 'zero_', 'fill_')


@dataclass
class OpCost:
    """One kernel-running operation: its name, bytes read and written, FLOPs (see KernelOps)."""
    name: str
    bytes: int
    flops: int


@dataclass(frozen=True)
class RooflineGPU:
    """A GPU as the estimate sees it: memory bandwidth (bytes/s), the arithmetic rate of its
    matrix products (FLOP/s) and the least time a kernel takes (launch, ramp-up and tail)."""
    bandwidth: float
    matmul_flops: float
    min_kernel_s: float

    def seconds(self, costs: List[OpCost]) -> float:
        """Estimated time of ``costs``, the operations one after the other."""
        return sum(max(cost.bytes / self.bandwidth, cost.flops / self.matmul_flops,
                       self.min_kernel_s) for cost in costs)


H100 = RooflineGPU(bandwidth=1.9e12, matmul_flops=6.0e14, min_kernel_s=3e-6)
"""An H100 80GB (SXM) in half precision: below its 3.35 TB/s and 990 TFLOP/s, as eager kernels
run (the fit of the module docstring)."""


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a kernel reads of ``tensor``: a broadcast dimension (stride 0) counts once."""
    elements = 1
    for size, stride in zip(tensor.shape, tensor.stride()):
        elements *= size if stride else 1
    return elements * tensor.element_size()


def _flops(name: str, args: tuple, outputs: List[torch.Tensor]) -> int:
    if name in MATRIX_PRODUCTS:
        # out (..., M, N) from (..., M, K) @ (..., K, N): the last two arguments.
        return 2 * outputs[0].numel() * args[-2].shape[-1]
    if name == 'convolution':
        weight = args[1]  # (C_out, C_in / groups, k...): multiply-adds per output element
        return 2 * outputs[0].numel() * weight[0].numel()
    if name == 'convolution_backward':
        # The input's and the weight's gradients, each as many multiply-adds as the forward.
        grad_output, weight, wanted = args[0], args[2], args[-1]
        return 2 * grad_output.numel() * weight[0].numel() * sum(wanted[:2])
    if 'scaled_dot_product' in name:
        backward = name.endswith('backward')
        query, key = args[1:3] if backward else args[:2]
        return (10 if backward else 4) * query.numel() * key.shape[-2]
    return 0


class KernelOps(TorchDispatchMode):
    """Records the operations that run a kernel: those that write new memory (allocations
    alone excluded) or write in place; views and other changes of metadata are free. Each is
    an ``OpCost`` in ``costs``; ``count`` is how many. ``dispatched`` counts every operation that
    reached the dispatcher, views and other changes of metadata included: the host's work.

    Bytes: every tensor argument read once, a broadcast (stride-0) dimension once, plus every
    output written; except that a gather reads only what it gathers (and its indices), a
    factory operation (``new_zeros``, ``*_like``) reads nothing, and ``copy_``, ``zero_`` and
    ``fill_`` do not read the tensor they overwrite. Fused attention reads q, k, v and writes
    its output; its backward reads the output gradient, q, k, v, the output and the softmax
    statistics and writes three gradients. FLOPs: 2 per multiply-add of matrix products and
    convolutions (forward and backward); attention 4 B H N M D forward, 10 B H N M D backward
    (the recomputed scores and four products).
    """

    def __init__(self):
        super().__init__()
        self.costs: List[OpCost] = []
        self.dispatched = 0

    @property
    def count(self) -> int:
        """Kernel-running operations recorded so far."""
        return len(self.costs)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.dispatched += 1
        name = func.overloadpacket.__name__
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        input_storages = {t.untyped_storage().data_ptr() for t in inputs}
        writes_new = any(t.untyped_storage().data_ptr() not in input_storages for t in outputs)
        if not ((writes_new and 'empty' not in name) or name.endswith('_')):
            return out
        written = sum(tensor_bytes(t) for t in outputs)
        if name.startswith('new_') or name.endswith('_like'):
            read = 0
        elif name in GATHERS:
            read = written + sum(tensor_bytes(t) for t in inputs[1:])
        elif name in OVERWRITES:
            read = sum(tensor_bytes(t) for t in inputs[1:])
        elif 'scaled_dot_product' in name and not name.endswith('backward'):
            read, written = sum(tensor_bytes(t) for t in inputs[:3]), tensor_bytes(outputs[0])
        else:
            read = sum(tensor_bytes(t) for t in inputs)
        self.costs.append(OpCost(name, read + written, _flops(name, args, outputs)))
        return out


def step_costs(model: nn.Module, input_size: int, device: torch.device, batch_size: int = 1,
               amp_dtype: Optional[torch.dtype] = None, train: bool = False) -> List[OpCost]:
    """The ``KernelOps`` costs of one eval-mode forward of ``batch_size`` random images under
    ``amp_dtype`` autocast; with ``train``, of a train-mode forward and its backward (a
    cross-entropy loss under the same autocast; no optimizer), as ``speed_test``'s training
    step. The model's mode and any gradients it holds are as they were afterwards; the
    gradients are set aside during the step, so that none is accumulated into."""
    return _record_step(model, input_size, device, batch_size, amp_dtype, train).costs


def _record_step(model: nn.Module, input_size: int, device: torch.device, batch_size: int,
                 amp_dtype: Optional[torch.dtype], train: bool) -> KernelOps:
    """``step_costs``'s step, recorded: the whole ``KernelOps``."""
    was_training = model.training
    held = {parameter: parameter.grad for parameter in model.parameters()}
    model.train(train)
    images = torch.randn(batch_size, 3, input_size, input_size, device=device)
    labels = torch.zeros(batch_size, dtype=torch.long, device=device)
    try:
        for parameter in held:
            parameter.grad = None
        with torch.set_grad_enabled(train), cuda_forms(), KernelOps() as ops:
            with amp_autocast(device, amp_dtype):
                logits = model(images)
                loss = F.cross_entropy(logits, labels) if train else None
            if train:
                loss.backward()
    finally:
        model.train(was_training)
        for parameter, grad in held.items():
            parameter.grad = grad
    return ops


def print_roofline(models: Dict[str, nn.Module], modes: Sequence[str], input_size: int,
                   device: torch.device, batch_size: int, amp: str,
                   amp_dtype: Optional[torch.dtype]) -> List[dict]:
    """Prints each model's ``H100`` estimate for each of ``modes`` ('inference', 'train') at
    ``batch_size`` under ``amp_dtype`` autocast (``amp``: its name), with its speed relative to
    the first model (the first's time over its own); returns one record each (speed_test's
    ``--roofline`` and ``--json``)."""
    records = []
    for mode in modes:
        first = None
        for spec, model in models.items():
            costs = step_costs(model, input_size, device, batch_size, amp_dtype,
                               train=mode == 'train')
            seconds = H100.seconds(costs)
            first = first or seconds
            record = dict(model=spec, mode=f'roofline-{mode}', gpu='H100 (op_costs.H100)',
                          batch_size=batch_size, amp=amp, estimated_ms=seconds * 1e3,
                          operations=len(costs), gigabytes=sum(c.bytes for c in costs) / 1e9,
                          tflop=sum(c.flops for c in costs) / 1e12,
                          speed_vs_first=first / seconds)
            records.append(record)
            print(f'{spec}: roofline {record["estimated_ms"]:.3f} ms per {mode} step on an H100 '
                  f'(batch {batch_size}, amp {amp}; {record["operations"]} operations, '
                  f'{record["gigabytes"]:.2f} GB, {record["tflop"]:.3f} TFLOP), speed '
                  f'{record["speed_vs_first"]:.3f}x the first model\'s', flush=True)
    return records


def busy_time(intervals: Iterable[Tuple[float, float]]) -> float:
    """Length of the union of ``(start, end)`` intervals: the time a device was busy, kernels
    that overlapped (several streams) counted once."""
    total, reach = 0., float('-inf')
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def profile_step(step: Callable[[], None], device: torch.device, top: int, steps: int = 3,
                 trace_path: Optional[str] = None) -> Tuple[List[dict], Optional[float]]:
    """Where a step spends its time, from ``torch.profiler`` over ``steps`` steps (after one
    untimed).

    Returns the ``top`` rows of each part, ``{'where' ('device', 'host' or 'cpu'), 'name',
    'ms_per_step', 'calls_per_step'}``, largest first: on a GPU the CUDA kernels by their time
    on the device, then the host's ops by self time (where a step is bound by the host's time
    to launch kernels, these say which ops cost it); on the CPU its ops. Also the device's busy
    milliseconds per step (kernels, copies and fills, overlaps once; None on the CPU): against
    the step's unprofiled time, the share of it the device worked, 1 for a step bound by the
    device and less where it waited for the host. ``trace_path``: also write the Chrome trace
    there (``.json.gz``: compressed), for chrome://tracing or Perfetto.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    step()
    synchronize(device)
    on_gpu = device.type == 'cuda'
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as profiler:
        for _ in range(steps):
            step()
        synchronize(device)
    if trace_path:
        profiler.export_chrome_trace(trace_path)
    events = profiler.key_averages()
    parts = [('self_cpu_time_total', 'cpu')]
    if on_gpu:
        parts = [('self_device_time_total', 'device'), ('self_cpu_time_total', 'host')]
    rows = []
    for field, where in parts:
        ranked = sorted(events, key=lambda event: getattr(event, field), reverse=True)[:top]
        rows += [dict(where=where, name=event.key, ms_per_step=getattr(event, field) / 1e3 / steps,
                      calls_per_step=event.count / steps) for event in ranked]
    busy_ms = None
    if on_gpu:  # a user annotation's range on the device's timeline is no work of it
        busy_ms = busy_time(
            (event.time_range.start, event.time_range.end) for event in profiler.events()
            if event.device_type == DeviceType.CUDA and not event.is_user_annotation) / 1e3 / steps
    return rows, busy_ms


COUNT_TRAIN_BATCH = 2
"""Images of the training step ``count_ops`` counts: the smallest batch that takes every larger
batch's paths (a single image takes the class attention's per-head product); the forms chosen
by size (the mergence's bags, the fused norms) run only without gradients."""


def count_ops(model: nn.Module, input_size: int, device: torch.device,
              amp_dtype: Optional[torch.dtype] = None, train: bool = False) -> dict:
    """The kernel-running operations (``KernelOps.count``: on a GPU each a launch) and all the
    operations dispatched (``KernelOps.dispatched``) of one eval-mode forward of one image, or
    with ``train`` of a training step (``step_costs``) of ``COUNT_TRAIN_BATCH`` images, in the
    CUDA forms under ``amp_dtype``: ``{'batch_size', 'kernel_operations',
    'dispatched_operations'}``. Where the host sets a GPU's time (small batches, and the
    reduced models' eager training steps on the H200s measured, docs/gpu_notes.md), that time
    follows these counts."""
    batch_size = COUNT_TRAIN_BATCH if train else 1
    ops = _record_step(model, input_size, device, batch_size, amp_dtype, train)
    return dict(batch_size=batch_size, kernel_operations=ops.count,
                dispatched_operations=ops.dispatched)


def print_op_counts(models: Dict[str, nn.Module], modes: Sequence[str], input_size: int,
                    device: torch.device, amp: str, amp_dtype: Optional[torch.dtype]
                    ) -> List[dict]:
    """Prints ``count_ops`` of each model for each of ``modes`` ('inference', 'train') under
    ``amp_dtype`` autocast (``amp``: its name); returns one record each (speed_test's
    ``--count-ops`` and ``--json``)."""
    records = []
    for mode in modes:
        step = 'training step' if mode == 'train' else 'forward'
        for spec, model in models.items():
            counted = count_ops(model, input_size, device, amp_dtype, train=mode == 'train')
            records.append(dict(model=spec, mode=f'ops-{mode}', amp=amp, **counted))
            print(f'{spec}: {counted["kernel_operations"]} kernel-running operations per {step} '
                  f'(batch {counted["batch_size"]}, amp {amp}); '
                  f'{counted["dispatched_operations"]} dispatched', flush=True)
    return records


def _sdpa_flop_handle(inputs, outputs) -> int:
    """fvcore handle for ``aten::scaled_dot_product_attention``: q @ k^T plus attn @ v, in
    multiply-adds, as fvcore counts the unfused matmuls (it would count the fused op as 0)."""
    from fvcore.nn.jit_handles import get_shape
    q_shape, k_shape, v_shape = (get_shape(value) for value in inputs[:3])
    *batch_heads, num_queries, head_dim = q_shape
    num_keys, value_dim = k_shape[-2], v_shape[-1]
    batch_heads_count = 1
    for size in batch_heads:
        batch_heads_count *= size
    return batch_heads_count * num_queries * num_keys * (head_dim + value_dim)


def count_flops(model: nn.Module, input_size: int, device: torch.device = torch.device('cpu'),
                in_chans: int = 3) -> float:
    """FLOPs of one image of ``input_size`` x ``input_size`` in the paper's convention: fvcore's
    count (one multiply-add is one FLOP), fused attention included. The model is put in eval mode."""
    from fvcore.nn import FlopCountAnalysis
    model.eval()
    image = torch.randn(1, in_chans, input_size, input_size, device=device)
    with torch.no_grad():
        analysis = FlopCountAnalysis(model, image)
        analysis.set_op_handle('aten::scaled_dot_product_attention', _sdpa_flop_handle)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        return float(analysis.total())


def count_macs(model: nn.Module, input_size: int, device: torch.device = torch.device('cpu'),
               in_chans: int = 3) -> float:
    """torchprofile's multiply-accumulate count for one image: the cross-check of ``count_flops``."""
    from torchprofile import profile_macs
    model.eval()
    image = torch.randn(1, in_chans, input_size, input_size, device=device)
    # torchprofile warns for every op it has no handler for (sort, scatter, ...): all cost-free.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return float(profile_macs(model, image))
