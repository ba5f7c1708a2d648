"""Checks that need a CUDA device, skipped elsewhere (``.ci/gpu`` runs them on a GPU machine):
the model's float32 values on the GPU's kernels against the CPU's, the fused norms' Triton
kernels inside the model, a half-precision training step, steps that never make the host wait
for the device, the device's busy time as the profiler gives it, and compilation for CUDA. The
CPU suite tests the CUDA code paths themselves (``matmul_ops.cuda_forms``); these test the
kernels.

Run: ``python -m pytest tests/test_cuda.py -q`` from the repository root.
"""
import contextlib
import time

import pytest
import torch
from torch._dynamo.utils import counters

import fused_norms
import op_costs
import token_merging
from mtvit_reference import images, make_model, tiny_kwargs
from test_compile import _fresh_dynamo, _tiny_multi_scale
from test_fused_norms import KERNEL_CASES, compare_kernel_cases

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')

CUDA = torch.device('cuda')
MTVIT_S = 'deit_small_patch16_shrink_base'
VARIANTS = {'multi-scale k0.7': dict(multi_scale=True, base_keep_rate=0.7),
            'single scale k0.7': dict(base_keep_rate=0.7),
            'keep 1': dict(base_keep_rate=1.0)}
# Enough images for the fused norms to run (FUSED_MIN_ROWS tokens: 4096).
FUSED_BATCH = 32


@contextlib.contextmanager
def _float32_kernels():
    """cuBLAS and cuDNN in full float32 (no TF32), as the CPU computes."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _relative_difference(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.float().cpu() - expected.float().cpu()).abs().max()
                 / expected.float().abs().max())


def _half_tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance of logits computed two ways in ``dtype``: four of its machine epsilons
    (bf16: 3.1e-2; one rounding step of a logit just below 1 is 4e-3, just above 8e-3, and a
    changed kept token moves logits by about that much), at least 1e-2 (fp16)."""
    return max(1e-2, 4 * torch.finfo(dtype).eps)


@pytest.mark.parametrize('bags', [False, True])
@pytest.mark.parametrize('variant', VARIANTS)
def test_float32_logits_equal_the_cpus(variant, bags, monkeypatch):
    # The H200 measured 3e-6 to 3e-5. Seed 2: no two class attentions at a reduction's cut-off
    # closer than 1.6e-4 relative (seed 5 had an exact float32 tie, which either order may break).
    # With bags, the CUDA mergences sum as F.embedding_bag's bags at this batch of 3 too.
    if bags:
        monkeypatch.setattr(token_merging, 'BAG_MIN_TOKENS', 0)
    model = make_model(seed=2, name=MTVIT_S, double=False, **VARIANTS[variant])
    x = images(3, 224, seed=2, double=False)
    with torch.no_grad(), _float32_kernels():
        expected, expected_reductions = model(x, get_idx=True)
        with op_costs.KernelOps() as ops:
            got, reductions = model.to(CUDA)(x.to(CUDA), get_idx=True)
    assert sum('embedding_bag' in cost.name for cost in ops.costs) == len(reductions) * bags
    for number, ((kept, _), (expected_kept, _)) in enumerate(zip(reductions, expected_reductions)):
        assert torch.equal(kept.cpu().sort(dim=1).values, expected_kept.sort(dim=1).values), \
            f'reduction {number}: other tokens kept'
    assert _relative_difference(got, expected) < 1e-4


@pytest.mark.skipif(fused_norms.triton is None, reason='needs Triton')
def test_fused_norm_kernel_on_the_gpu_equals_the_plain_operations():
    # As the interpreter's test, and bf16 too: a GPU rounds to the nearest, as aten does.
    for case, result in zip(KERNEL_CASES, compare_kernel_cases('cuda')):
        assert result['sums_equal'], case
        assert result['excess'] <= 1e-5, (case, result)
        assert result['equal_share'] >= 0.99, (case, result)


@pytest.mark.skipif(fused_norms.triton is None, reason='needs Triton')
@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
@pytest.mark.parametrize('variant', ['multi-scale k0.7', 'keep 1'])
def test_fused_norms_give_the_plain_norms_logits(variant, dtype, monkeypatch):
    launches = []
    launch = fused_norms.launch_layer_norm

    def counted(*args, **kwargs):
        launches.append(args[0].shape)
        return launch(*args, **kwargs)
    monkeypatch.setattr(fused_norms, 'launch_layer_norm', counted)
    plain = make_model(seed=6, name=MTVIT_S, double=False, **VARIANTS[variant]).to(CUDA)
    fused = make_model(seed=6, name=MTVIT_S, double=False, fused_norms=True,
                       **VARIANTS[variant]).to(CUDA)
    fused.load_state_dict(plain.state_dict())
    x = images(FUSED_BATCH, 224, seed=6, double=False).to(CUDA)
    with torch.inference_mode(), torch.autocast('cuda', dtype=dtype):
        expected = plain(x)
        assert not launches
        got = fused(x)
    # Two norms per block; blocks whose tokens fall below FUSED_MIN_ROWS keep the plain ones.
    assert len(launches) >= 2 * 3, launches
    assert torch.isfinite(got).all()
    assert _relative_difference(got, expected) < _half_tolerance(dtype)


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
@pytest.mark.parametrize('multi_scale', [True, False])
def test_half_precision_training_step_gives_every_parameter_a_finite_gradient(multi_scale, dtype):
    model = make_model(seed=7, double=False, train=True, **tiny_kwargs(
        img_size=64, patch_size=16, drop_loc=(3, 4), multi_scale=multi_scale)).to(CUDA)
    x = images(3, 64, seed=7, double=False).to(CUDA)
    with torch.autocast('cuda', dtype=dtype):
        logits = model(x)
    # fp16 as training runs it: the loss scaled, the gradients unscaled.
    torch.nn.functional.cross_entropy(logits.float(), torch.tensor([0, 1, 2], device=CUDA)
                                      ).mul(2. ** 10).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
    assert any(bool(param.grad.abs().sum() > 0) for param in model.parameters())


@contextlib.contextmanager
def _synchronisations_fail():
    """Within it, an operation that PyTorch knows makes the host wait for the device (a copy to
    the host, ``.item()``, ``nonzero``, a stream synchronisation) raises instead."""
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode('error')
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


@pytest.mark.parametrize('variant', ['multi-scale k0.7', 'single scale k0.7'])
def test_steps_never_make_the_host_wait_for_the_device(variant):
    # The H200's eager training step took as long at batch 128 as at 256: not bound by its
    # kernels. A synchronisation would serialise the host's launches with the device's work.
    model = make_model(seed=9, name=MTVIT_S, double=False, fused_norms=True,
                       **VARIANTS[variant]).to(CUDA)
    x = images(FUSED_BATCH, 224, seed=9, double=False).to(CUDA)
    labels = torch.arange(FUSED_BATCH, device=CUDA) % 10

    def train_step():
        model.train()
        model.zero_grad(set_to_none=True)
        with torch.autocast('cuda', dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), labels)
        loss.backward()

    def inference_step():  # the fused norms' launches included
        model.eval()
        with torch.inference_mode(), torch.autocast('cuda', dtype=torch.float16):
            model(x)
    for step in (train_step, inference_step):
        step()  # first calls may wait (cuDNN's plans, the allocator's first blocks)
        torch.cuda.synchronize(CUDA)
        with _synchronisations_fail():
            step()
        torch.cuda.synchronize(CUDA)


@pytest.mark.parametrize('bound', ['device', 'host'])
def test_device_busy_share_tells_the_device_bound_step_from_the_host_bound(bound):
    # speed_test's diagnosis: the share of a step's time in which the device worked.
    matrix = torch.randn(4096, 4096, device=CUDA)

    def step():
        if bound == 'device':  # about 0.5 TFLOP in float32, launched at once
            for _ in range(4):
                matrix @ matrix
        else:  # the host sleeps, then one tiny kernel
            time.sleep(0.01)
            matrix[:1, :1] + 1
    _, busy_ms = op_costs.profile_step(step, CUDA, top=0, steps=3)
    step()
    torch.cuda.synchronize(CUDA)
    start = time.perf_counter()
    for _ in range(3):
        step()
    torch.cuda.synchronize(CUDA)
    share = busy_ms / ((time.perf_counter() - start) / 3 * 1e3)
    assert (0.9 <= share <= 1.05) if bound == 'device' else share < 0.05, share


def test_compile_for_cuda_matches_eager_and_token_counts_bound_recompilations():
    model = _tiny_multi_scale(seed=8).to(CUDA)
    x = images(2, 64, seed=8, double=False).to(CUDA)
    with _fresh_dynamo():
        compiled = torch.compile(model, fullgraph=True)
        graphs = []
        for rate in (1.0, 0.7, 0.5):
            counts = model.token_counts(rate)
            with torch.no_grad(), torch.autocast('cuda', dtype=torch.bfloat16):
                expected = model(x, tokens=counts)
                got = compiled(x, tokens=counts)
            assert torch.isfinite(got).all()
            assert _relative_difference(got, expected) < _half_tolerance(torch.bfloat16), rate
            graphs.append(counters['stats']['unique_graphs'])
        assert graphs[-1] <= 3, graphs
