"""The fused layer norms (fused_norms.py): the Triton kernel, run by Triton's interpreter on the
CPU, against the plain operations; where the fused operations apply and where not; MTViT with
them computing what it computes without them, with the kernels counted.

Run: ``python -m pytest tests/test_fused_norms.py -q`` from the repository root.
"""
import contextlib
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

# mtvit_reference first: it puts the repository on sys.path (this file also runs as a script).
from mtvit_reference import images, make_model, tiny_kwargs
import fused_norms
from matmul_ops import cuda_forms
from op_costs import KernelOps

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FUSED_OPS = ('layer_norm_to', 'add_layer_norm_to')
# (shape, the branch's type or None, output type, layout of x and of the branch)
KERNEL_CASES = [
    ((3, 37, 384), 'float16', 'float16', 'contiguous'),
    ((3, 37, 384), 'bfloat16', 'bfloat16', 'contiguous'),
    ((5, 48), 'float32', 'float16', 'contiguous'),
    ((2, 37, 100), 'float16', 'float16', 'strided'),
    ((37, 100), None, 'bfloat16', 'strided'),
    ((9, 384), None, 'float16', 'contiguous'),
    ((4, 6, 40), 'float16', 'float16', 'transposed'),
]


def _laid_out(values: torch.Tensor, layout: str) -> torch.Tensor:
    """``values`` as a view of another layout: 'strided', rows of a wider tensor; 'transposed',
    columns not adjacent in memory (the kernel's caller copies those); or as they are."""
    if layout == 'strided':
        return torch.cat([values, torch.zeros_like(values)], dim=-1)[..., :values.shape[-1]]
    if layout == 'transposed':
        return values.transpose(-1, -2).contiguous().transpose(-1, -2)
    return values


def rounding_excess(out: torch.Tensor, expected: torch.Tensor) -> float:
    """How far ``out`` is from ``expected`` (same floating type) beyond one rounding step of
    that type (``eps * |expected|``): 0 where every element is within one step."""
    step = torch.finfo(expected.dtype).eps
    out, expected = out.float(), expected.float()
    return ((out - expected).abs() - step * expected.abs()).max().clamp(min=0).item()


def compare_kernel_cases(device: str = 'cpu') -> list:
    """Each KERNEL_CASES case through ``launch_layer_norm`` on ``device`` (the CPU: Triton's
    interpreter) and through the plain operations (``mtvit::`` CPU kernels): whether the sums
    are equal, ``rounding_excess`` of the norms and the share of equal elements."""
    results = []
    gen = torch.Generator().manual_seed(0)
    for shape, branch_type, out_type, layout in KERNEL_CASES:
        out_dtype = getattr(torch, out_type)
        x = _laid_out((torch.randn(shape, generator=gen) * 3 + 1).to(device), layout)
        branch = None if branch_type is None else _laid_out(
            torch.randn(shape, generator=gen).to(device, getattr(torch, branch_type)), layout)
        cols = shape[-1]
        weight, bias = (torch.randn(cols, generator=gen).to(device) for _ in range(2))
        total, out = fused_norms.launch_layer_norm(x, branch, weight, bias, 1e-6, out_dtype)
        x, weight, bias, out = x.cpu(), weight.cpu(), bias.cpu(), out.cpu()
        if branch is None:
            sums_equal = total is None
            expected = torch.ops.mtvit.layer_norm_to(x, weight, bias, 1e-6, out_dtype)
        else:
            expected_total, expected = torch.ops.mtvit.add_layer_norm_to(
                x, branch.cpu(), weight, bias, 1e-6, out_dtype)
            sums_equal = torch.equal(total.cpu(), expected_total)
        results.append(dict(
            sums_equal=sums_equal, dtype=str(out.dtype), shape=list(out.shape),
            contiguous=out.is_contiguous(),
            excess=rounding_excess(out, expected),
            equal_share=(out == expected).float().mean().item()))
    return results


@pytest.fixture(scope='module')
def kernel_report():
    """``compare_kernel_cases`` in a process of its own: Triton's interpreter is chosen when Triton
    is imported."""
    env = dict(os.environ, TRITON_INTERPRET='1')
    done = subprocess.run([sys.executable, __file__], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(fused_norms.triton is None, reason='needs Triton')
@pytest.mark.parametrize('case', range(len(KERNEL_CASES)))
def test_triton_kernel_equals_plain_operations(kernel_report, case):
    shape, _, out_type, _ = KERNEL_CASES[case]
    result = kernel_report[case]
    # The sum x + branch is float32 arithmetic either way: bit for bit.
    assert result['sums_equal']
    assert result['dtype'] == f'torch.{out_type}' and result['shape'] == list(shape)
    assert result['contiguous']
    # The statistics are summed in another order than aten's: one rounding step apart at most,
    # but where the norm's terms cancel near zero, float32's own rounding (terms of about 10).
    assert result['excess'] <= 1e-5, result
    if out_type == 'float16':
        assert result['equal_share'] >= 0.99, result
    # (Triton's interpreter casts to bfloat16 by truncation, a GPU to the nearest: no share.)


# ---------------------------------------------------------------------------------------------
# Where the fused operations run
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def any_rows(monkeypatch):
    """The fused operations for tiny test tensors (any number of rows)."""
    monkeypatch.setattr(fused_norms, 'FUSED_MIN_ROWS', 1)


def _applies(x, norm=None, grad=False, dtype=torch.bfloat16, forms=True, fused=True):
    norm = nn.LayerNorm(x.shape[-1]) if norm is None else norm
    with torch.set_grad_enabled(grad), \
            torch.autocast('cpu', dtype=dtype or torch.bfloat16, enabled=dtype is not None), \
            cuda_forms() if forms else contextlib.nullcontext():
        return fused_norms.fused_norms_apply(x, norm, fused)


def test_fused_norms_run_only_where_asked_on_the_float32_stream_without_gradient(any_rows):
    x = torch.randn(2, 5, 16)
    assert _applies(x) == torch.bfloat16
    assert _applies(x, dtype=torch.float16) == torch.float16
    assert _applies(x, fused=False) is None  # MTViT's default
    assert _applies(x, grad=True) is None  # training keeps aten's norms and their backward
    assert _applies(x, dtype=None) is None  # no autocast
    assert _applies(x, forms=False) is None  # the CPU's own forms
    assert _applies(x.bfloat16()) is None  # not the float32 stream
    assert _applies(x, norm=nn.LayerNorm(16, elementwise_affine=False)) is None
    assert _applies(x, norm=nn.LayerNorm(16).double()) is None
    assert _applies(x, norm=nn.LayerNorm(8)) is None  # another width: aten raises, as before
    with pytest.raises(RuntimeError):
        with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16), cuda_forms():
            fused_norms.norm_for_matmul(x, nn.LayerNorm(8), fused=True)


def test_add_and_norm_falls_back_to_plain_operations(any_rows):
    # A branch the kernel does not take (broadcast over the batch): the plain addition, then
    # the norm alone fused, on the sum.
    x, norm, branch = torch.randn(2, 5, 16), nn.LayerNorm(16), torch.randn(1, 5, 16)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16), cuda_forms(), \
            KernelOps() as ops:
        total, normed = fused_norms.add_and_norm(x, branch, norm, fused=True)
        assert torch.equal(total, x + branch)
        assert torch.equal(normed, norm(x + branch).to(torch.bfloat16))
    names = [cost.name for cost in ops.costs]
    assert names.count('add_layer_norm_to') == 0 and names.count('layer_norm_to') == 1


def test_export_with_a_dynamic_batch_keeps_aten_norms(any_rows):
    # Asked before the row count: no guard on the batch size, and aten's norm in the graph.
    class Normed(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(8)

        def forward(self, x):
            return fused_norms.norm_for_matmul(x, self.norm, fused=True)

    batch = torch.export.Dim('batch', min=2, max=1024)
    with torch.no_grad(), cuda_forms(), torch.autocast('cpu', dtype=torch.bfloat16):
        program = torch.export.export(Normed(), (torch.randn(4, 5, 8),),
                                      dynamic_shapes=({0: batch},), strict=False)
    targets = [str(node.target) for node in program.graph.nodes]
    assert any('layer_norm' in target and 'mtvit' not in target for target in targets)


def test_fused_norms_need_enough_rows():
    x = torch.randn(1, fused_norms.FUSED_MIN_ROWS - 1, 8)
    assert _applies(x) is None
    assert _applies(torch.cat([x, x[:, :1]], dim=1)) == torch.bfloat16


# ---------------------------------------------------------------------------------------------
# MTViT with and without them
# ---------------------------------------------------------------------------------------------

def _forward_ops(model, x, dtype, seed=0):
    torch.manual_seed(seed)  # the same stochastic depth in train mode
    with torch.no_grad(), cuda_forms(), torch.autocast('cpu', dtype=dtype), KernelOps() as ops:
        logits, reductions = model(x, get_idx=True)
    return logits, reductions, ops.costs


# (model arguments, fused norms alone, fused with the addition before them). Single scale,
# depth 6, reductions at 1, 3, 4: every block's first norm and the second norms after a mergence
# alone, the other second norms with their addition. Multi-scale as one tensor: blocks 1-2 pool
# before their first norm; one stream after the other (matmul_embed=False): blocks 0-2 on the
# low-resolution stream and block 0 on the full one as plain blocks, blocks 1-2 on the full one
# pooled, concatenating before their second norm.
MODEL_CASES = {
    'single': (dict(drop_loc=(1, 3, 4), base_keep_rate=0.7), 6 + 3, 3),
    'multi': (dict(img_size=64, patch_size=16, drop_loc=(3, 4), multi_scale=True,
                   base_keep_rate=0.7), 1 + 2 + 3 + 2, 1 + 2 + 1),
    'multi, streams one after the other': (
        dict(img_size=64, patch_size=16, drop_loc=(3, 4), multi_scale=True,
             base_keep_rate=0.7, matmul_embed=False), 3 + 1 + 4 + 3 + 2, 3 + 1 + 1),
    'single, train mode, stochastic depth': (
        dict(drop_loc=(1, 3, 4), base_keep_rate=0.7, drop_path_rate=0.5, train=True), 6 + 3, 3),
}


@pytest.mark.parametrize('case', list(MODEL_CASES))
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
@pytest.mark.parametrize('batch', [1, 3])
def test_mtvit_computes_the_same_with_fused_norms(any_rows, case, dtype, batch):
    overrides, norms, added_norms = MODEL_CASES[case]
    kwargs = tiny_kwargs(**overrides)
    x = images(batch, kwargs['img_size'], seed=6, double=False)
    plain_logits, plain_reductions, plain = _forward_ops(
        make_model(seed=5, double=False, **kwargs), x, dtype)
    logits, reductions, fused = _forward_ops(
        make_model(seed=5, double=False, fused_norms=True, **kwargs), x, dtype)
    # The fused operations' CPU kernels are the plain operations, with the same roundings: the
    # same logits and reductions to the bit (the Triton kernel is held to them above).
    assert torch.equal(logits, plain_logits)
    assert len(reductions) == len(plain_reductions) == 2 + (not overrides.get('multi_scale'))
    for (kept, assignment), (plain_kept, plain_assignment) in zip(reductions, plain_reductions):
        assert torch.equal(kept, plain_kept) and torch.equal(assignment, plain_assignment)
    names = [cost.name for cost in fused]
    assert not any(cost.name in FUSED_OPS for cost in plain)  # off by default
    assert (names.count('layer_norm_to'), names.count('add_layer_norm_to')) == (norms, added_norms)
    # Each fused operation replaces a norm and the product's cast, and an addition where it adds.
    assert len(plain) - len(fused) == norms + 2 * added_norms
    assert sum(cost.bytes for cost in fused) < sum(cost.bytes for cost in plain)


def test_training_step_keeps_plain_norms(any_rows):
    from op_costs import step_costs
    model = make_model(seed=5, double=False, fused_norms=True, **tiny_kwargs())
    with cuda_forms():
        costs = step_costs(model, 56, torch.device('cpu'), batch_size=2,
                           amp_dtype=torch.bfloat16, train=True)
    names = {cost.name for cost in costs}
    assert 'native_layer_norm_backward' in names
    assert not names & set(FUSED_OPS)


def test_compiled_graphs_keep_aten_norms(any_rows):
    from test_compile import _CaptureGraphs, _fresh_dynamo
    model = make_model(seed=5, double=False, fused_norms=True, **tiny_kwargs())
    capture = _CaptureGraphs()
    x = images(2, 56, double=False)
    with _fresh_dynamo(), torch.no_grad(), cuda_forms(), torch.autocast('cpu', torch.bfloat16):
        torch.testing.assert_close(torch.compile(model, backend=capture, fullgraph=True)(x),
                                   model(x))
    targets = [str(node.target) for graph in capture.graphs for node in graph.graph.nodes]
    assert any('layer_norm' in target for target in targets)
    assert not any('mtvit.' in target and 'norm' in target for target in targets)


def test_fused_operations_have_shapes_for_fake_tensors():
    with torch.device('meta'):
        x, weight = torch.empty(2, 5, 8), torch.empty(8)
        branch = torch.empty(2, 5, 8, dtype=torch.float16)
    normed = torch.ops.mtvit.layer_norm_to(x, weight, weight, 1e-6, torch.float16)
    total, added = torch.ops.mtvit.add_layer_norm_to(x, branch, weight, weight, 1e-6,
                                                     torch.bfloat16)
    assert (normed.shape, normed.dtype) == ((2, 5, 8), torch.float16)
    assert (total.dtype, added.dtype, added.shape) == (torch.float32, torch.bfloat16, (2, 5, 8))


if __name__ == '__main__':
    print(json.dumps(compare_kernel_cases()))
