"""The matrix-product forms of ``matmul_ops`` against the operations they replace.

1. ``depthwise_as_matmul`` / ``depthwise_tap_placement`` against ``F.conv2d`` and a placement
   written out by hand.
2. ``bilinear_resize_matrix`` against ``F.interpolate``.
3. ``to_autocast_dtype``, and the patch embedding's copy in the autocast precision.
4. The CPU forms of ``multi_scale``: ``DepthwiseConv2d``'s backward against ``F.conv2d``'s, and
   the 2x2 cell pooling and broadcasts, which reduce one dimension at a time.

(``embed_patches_as_matmul`` is also tested through the model, in tests/test_fast_paths.py.)

Run: ``python -m pytest tests/test_matmul_ops.py -q`` from the repository root.
"""
import contextlib
import os
import sys

import pytest
import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import matmul_ops  # noqa: E402
import multi_scale  # noqa: E402
from mtvit_reference import DispatchRecorder  # noqa: E402


# ---------------------------------------------------------------------------------------------
# 1. depthwise_as_matmul and depthwise_tap_placement
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('kernel,dilation', [(3, 1), (7, 2)])
@pytest.mark.parametrize('grid', [(4, 6), (6, 4), (5, 5), (3, 7), (2, 3), (8, 8)])
def test_depthwise_as_matmul_equals_conv2d(kernel, dilation, grid):
    channels, batch = 5, 3
    torch.manual_seed(kernel * 100 + grid[0] * 10 + grid[1])
    conv = multi_scale.DepthwiseConv2d(channels, kernel, dilation=dilation).double()
    with torch.no_grad():
        conv.bias.normal_()
    assert tuple(conv.weight.shape) == (channels, 1, kernel, kernel)
    cells = grid[0] * grid[1]
    u = torch.randn(channels, batch, cells, dtype=torch.float64)
    placement = matmul_ops.depthwise_tap_placement(grid, kernel, dilation)
    assert tuple(placement.shape) == (kernel * kernel, cells * cells)
    got = matmul_ops.depthwise_as_matmul(u, conv, placement.double())
    feature_map = u.permute(1, 0, 2).reshape(batch, channels, *grid)
    expected = F.conv2d(feature_map, conv.weight, conv.bias, padding=dilation * (kernel - 1) // 2,
                        dilation=dilation, groups=channels)
    assert tuple(got.shape) == (channels, batch, cells)
    torch.testing.assert_close(got, expected.reshape(batch, channels, cells).permute(1, 0, 2),
                               rtol=1e-12, atol=1e-12)


def hand_placement(grid, kernel, dilation):
    """(k*k, P_in, P_out): tap (a, b) of output (r, c) reads input (r + d(a - h), c + d(b - h))."""
    gh, gw = grid
    half = (kernel - 1) // 2
    out = torch.zeros(kernel * kernel, gh * gw, gh * gw)
    for r in range(gh):
        for c in range(gw):
            for a in range(kernel):
                for b in range(kernel):
                    rr, cc = r + dilation * (a - half), c + dilation * (b - half)
                    if 0 <= rr < gh and 0 <= cc < gw:
                        out[a * kernel + b, rr * gw + cc, r * gw + c] = 1.
    return out


@pytest.mark.parametrize('grid,kernel,dilation', [((3, 3), 3, 1), ((4, 6), 3, 1),
                                                  ((4, 6), 7, 2), ((9, 5), 7, 2)])
def test_depthwise_tap_placement_by_hand(grid, kernel, dilation):
    cells = grid[0] * grid[1]
    placement = matmul_ops.depthwise_tap_placement(grid, kernel, dilation)
    assert placement.dtype == torch.float32
    placement = placement.view(kernel * kernel, cells, cells)
    assert torch.equal(placement, hand_placement(grid, kernel, dilation))
    # At most one input per (tap, output); exactly one where the tap lies inside the grid.
    per_tap_output = placement.sum(dim=1)
    assert per_tap_output.max() == 1
    if grid == (3, 3) and kernel == 3:
        # The centre output reads all 9 cells, each once; an edge output 6, a corner output 4.
        assert torch.equal(per_tap_output[:, 4], torch.ones(9))
        reads = placement.sum(dim=(0, 1)).view(3, 3)
        assert reads.tolist() == [[4., 6., 4.], [6., 9., 6.], [4., 6., 4.]]
        # Tap (0, 0) of the centre output reads the top-left input; of a corner, nothing.
        assert placement[0, :, 4].tolist() == [1., 0., 0., 0., 0., 0., 0., 0., 0.]
        assert placement[0, :, 0].sum() == 0
        # Every input cell is read by the centre output through exactly one tap.
        assert torch.equal(placement[:, :, 4].sum(0), torch.ones(9))


# ---------------------------------------------------------------------------------------------
# 2. bilinear_resize_matrix
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('height,width', [(224, 224), (96, 160), (64, 34)])
def test_bilinear_resize_matrix_is_interpolate(height, width):
    rows = matmul_ops.bilinear_resize_matrix(height, height // 2)
    cols = matmul_ops.bilinear_resize_matrix(width, width // 2)
    assert rows.shape == (height // 2, height) and rows.dtype == torch.float64
    assert ((cols != 0).sum(dim=1) <= 2).all()
    torch.testing.assert_close(cols.sum(dim=1), torch.ones(width // 2, dtype=torch.float64))
    image = torch.randn(2, 3, height, width, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(width))
    expected = F.interpolate(image, size=(height // 2, width // 2), mode='bilinear',
                             align_corners=True)
    # In float32 the products are closer to the exact resize than F.interpolate's float32
    # kernel, whose float32 source positions put it up to 1e-4 off at 224.
    for dtype, tolerance in ((torch.float64, 1e-12), (torch.float32, 4e-6)):
        got = rows.to(dtype) @ image.to(dtype) @ cols.to(dtype).t()
        torch.testing.assert_close(got.double(), expected, rtol=0, atol=tolerance)


# ---------------------------------------------------------------------------------------------
# 3. to_autocast_dtype
# ---------------------------------------------------------------------------------------------

def test_to_autocast_dtype_casts_what_autocast_casts():
    x32, x64 = torch.ones(2), torch.ones(2, dtype=torch.float64)
    ints = torch.ones(2, dtype=torch.long)
    assert matmul_ops.to_autocast_dtype(x32) is x32  # autocast off
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert matmul_ops.to_autocast_dtype(x32).dtype == torch.bfloat16
        assert matmul_ops.to_autocast_dtype(x64) is x64
        assert matmul_ops.to_autocast_dtype(ints) is ints
        # A device without autocast (meta: shapes only) is left as it is, not an error.
        meta = torch.empty(2, device='meta')
        assert matmul_ops.to_autocast_dtype(meta) is meta


def test_patch_embedding_copies_a_float32_image_in_the_autocast_precision():
    # Cast while copied into the patch matrix: the same embeddings as of the image cast first.
    torch.manual_seed(0)
    proj = torch.nn.Conv2d(3, 8, kernel_size=4, stride=4)
    image = torch.randn(2, 3, 8, 12)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        with DispatchRecorder(lambda func, args, out: (str(func), getattr(out, 'shape', None))
                              ) as ops:
            [cast_as_copied] = matmul_ops.embed_patches_as_matmul([image], proj)
        [cast_first] = matmul_ops.embed_patches_as_matmul([image.bfloat16()], proj)
    assert cast_as_copied.dtype == torch.bfloat16 and torch.equal(cast_as_copied, cast_first)
    # One pass over the image's values: neither it nor its patches cast apart from the copy.
    casts = [tuple(shape) for name, shape in ops.records if name.startswith('aten._to_copy')]
    assert (2, 3, 8, 12) not in casts and (2, 6, 48) not in casts, casts
    # Without autocast, the image's own precision: the convolution's values.
    [exact] = matmul_ops.embed_patches_as_matmul([image.double()], proj.double())
    expected = proj.double()(image.double()).flatten(2).transpose(1, 2)
    assert exact.dtype == torch.float64 and torch.allclose(exact, expected, rtol=0, atol=1e-12)


def test_to_autocast_dtype_compiles_where_autocast_availability_cannot_be_traced(monkeypatch):
    # PyTorch 2.11's Dynamo cannot trace torch.amp.is_autocast_available (seen on an H200: the
    # whole-graph compile of MTViT under autocast stopped there); for cuda and cpu tensors it is
    # not asked.
    monkeypatch.setattr(torch.amp, 'is_autocast_available',
                        torch._dynamo.disable(torch.amp.is_autocast_available))
    torch._dynamo.reset()
    try:
        compiled = torch.compile(matmul_ops.to_autocast_dtype, backend='eager', fullgraph=True)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            assert compiled(torch.ones(2)).dtype == torch.bfloat16
        assert compiled(torch.ones(2)).dtype == torch.float32
    finally:
        torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------
# 4. multi_scale's CPU forms
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('kernel,dilation', [(3, 1), (7, 2)])
@pytest.mark.parametrize('layout', ['contiguous', 'token_view'])
def test_depthwise_conv_backward_equals_conv2d(kernel, dilation, layout):
    channels, batch, grid = 5, 3, (6, 8)
    torch.manual_seed(kernel + 10 * dilation)
    conv = multi_scale.DepthwiseConv2d(channels, kernel, dilation=dilation).double()
    assert isinstance(conv, torch.nn.Conv2d) and conv.padding == (dilation * (kernel - 1) // 2,) * 2
    with torch.no_grad():
        conv.bias.normal_()
    if layout == 'contiguous':
        source = torch.randn(batch, channels, *grid, dtype=torch.float64, requires_grad=True)
        feature_map = source
    else:
        # As the fusion makes them: a (B, C, gh, gw) view of (B, 1 + gh * gw, C) tokens.
        source = torch.randn(batch, 1 + grid[0] * grid[1], channels, dtype=torch.float64,
                             requires_grad=True)
        feature_map = source[:, 1:].transpose(1, 2).reshape(batch, channels, *grid)
    out_grad = torch.randn(batch, channels, *grid, dtype=torch.float64)
    got = conv(feature_map)
    assert type(got.grad_fn).__name__ == '_SameDepthwiseConvBackward'
    got_grads = torch.autograd.grad(got, (source, conv.weight, conv.bias), out_grad)
    expected = F.conv2d(feature_map, conv.weight, conv.bias, padding=conv.padding,
                        dilation=conv.dilation, groups=channels)
    expected_grads = torch.autograd.grad(expected, (source, conv.weight, conv.bias), out_grad)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    for name, value, reference in zip(('input', 'weight', 'bias'), got_grads, expected_grads):
        assert reference.abs().max() > 0.1, name
        torch.testing.assert_close(value, reference, rtol=1e-12, atol=1e-12, msg=name)
    # Without gradients (evaluation) it is nn.Conv2d's own forward; under autocast, which does
    # not cast inside an autograd Function, too (a bfloat16 input, float32 weights).
    with torch.no_grad():
        assert conv(feature_map).grad_fn is None
    conv.float()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        half = conv(feature_map.detach().bfloat16().requires_grad_())
    assert half.dtype == torch.bfloat16 and type(half.grad_fn).__name__ == 'ConvolutionBackward0'


def _graph_names(grad_fn) -> set:
    """The names of the autograd nodes behind ``grad_fn``, itself included."""
    names, stack = set(), [grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and type(node).__name__ not in names:
            names.add(type(node).__name__)
            stack += [child for child, _ in node.next_functions]
    return names


@pytest.mark.parametrize('kind', ['depthwise', 'pointwise'])
def test_custom_conv_backwards_give_conv2d_higher_derivatives(kind):
    # What nn.Conv2d's autograd offers, the custom backwards (the depthwise convolution's faster
    # one, the pointwise one's gradient strides) do too: double backward (gradient penalties),
    # torch.func's grad and vmap (per-sample gradients), forward-mode jvp.
    torch.manual_seed(5)
    build, node = {'depthwise': (lambda dim: multi_scale.DepthwiseConv2d(dim, 7, dilation=2),
                                 '_SameDepthwiseConvBackward'),
                   'pointwise': (multi_scale.PointwiseConv2d,
                                 '_StandardGradientStridesBackward')}[kind]
    conv = build(3).double()
    x = torch.randn(2, 3, 6, 8, dtype=torch.float64, requires_grad=True)
    params = (conv.weight, conv.bias)

    def plain(x, weight, bias):
        return F.conv2d(x, weight, bias, padding=conv.padding, dilation=conv.dilation,
                        groups=conv.groups)

    def fast(x, weight, bias):
        return torch.func.functional_call(conv, {'weight': weight, 'bias': bias}, (x,))

    assert node in _graph_names(fast(x, *params).grad_fn)
    small = build(2).double()  # numerical checks: small
    assert torch.autograd.gradgradcheck(
        lambda x, weight, bias: torch.func.functional_call(small, {'weight': weight, 'bias': bias},
                                                           (x,)),
        (torch.randn(1, 2, 4, 5, dtype=torch.float64, requires_grad=True), small.weight,
         small.bias))
    penalties = []
    for function in (fast, plain):
        grad_x, = torch.autograd.grad(function(x, *params).square().sum(), x, create_graph=True)
        penalties.append(torch.autograd.grad(grad_x.square().sum(), params))
    for got, expected in zip(*penalties):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)

    def per_sample(function):
        def loss(weight, bias, sample):
            return function(sample[None], weight, bias).square().sum()
        return torch.func.vmap(torch.func.grad(loss, argnums=(0, 1)), in_dims=(None, None, 0))(
            conv.weight.detach(), conv.bias.detach(), x.detach())

    for got, expected in zip(per_sample(fast), per_sample(plain)):
        assert got.shape[0] == 2
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    primals = tuple(t.detach() for t in (x, *params))
    tangents = tuple(torch.randn_like(t) for t in primals)
    got = torch.func.jvp(fast, primals, tangents)
    expected = torch.func.jvp(plain, primals, tangents)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_cpu_forms_only_on_the_cpu():
    # Other devices (here meta, shapes only) keep the general forms, gradients enabled.
    conv = multi_scale.DepthwiseConv2d(3, 7, dilation=2).to('meta')
    x = torch.empty(2, 3, 6, 8, device='meta', requires_grad=True)
    assert type(conv(x).grad_fn).__name__ == 'ConvolutionBackward0'
    patches = torch.empty(2, 24, 3, device='meta')
    assert not matmul_ops.uses_cpu_forms(patches) and not matmul_ops.uses_cuda_forms(patches)
    assert multi_scale.pool_patch_grid(patches, (4, 6)).shape == (2, 6, 3)
    cpu = torch.empty(1)
    assert matmul_ops.uses_cpu_forms(cpu) and not matmul_ops.uses_cuda_forms(cpu)
    with matmul_ops.cuda_forms():
        assert not matmul_ops.uses_cpu_forms(cpu) and matmul_ops.uses_cuda_forms(cpu)
    assert matmul_ops.uses_cpu_forms(cpu)


def test_depthwise_conv_rejects_even_kernels():
    with pytest.raises(ValueError, match='kernel_size 4 is even'):
        multi_scale.DepthwiseConv2d(3, 4)


def reduced_dimensions(func, args, out):
    """The dimensions a sum or mean reduces (None for other operations)."""
    if func.overloadpacket.__name__ in ('sum', 'mean') and len(args) > 1:
        return tuple(args[1])
    return None


@pytest.mark.parametrize('forms', ['cpu', 'cuda'])
def test_cell_pooling_and_broadcasts_equal_reference(forms):
    # On the CPU a reduction over two strided dimensions (the 2x2 cells of a (B, h, 2, w, 2, C)
    # view) runs ten times slower than two one-dimension ones: its forward and backward reduce
    # one dimension at a time. The CUDA forms reduce both at once.
    batch, grid, channels = 2, (4, 6), 3
    low_grid = (grid[0] // 2, grid[1] // 2)
    generator = torch.Generator().manual_seed(8)
    patches = torch.randn(batch, grid[0] * grid[1], channels, dtype=torch.float64,
                          generator=generator, requires_grad=True)
    low = torch.randn(batch, low_grid[0] * low_grid[1], channels, dtype=torch.float64,
                      generator=generator, requires_grad=True)

    def as_map(tokens, size):
        return tokens.transpose(1, 2).reshape(batch, channels, *size)

    def as_tokens(feature_map):
        return feature_map.flatten(2).transpose(1, 2)

    outputs = {
        'pool': (lambda: multi_scale.pool_patch_grid(patches, grid),
                 lambda: as_tokens(F.avg_pool2d(as_map(patches, grid), 2))),
        'upsample': (lambda: multi_scale.upsample_patch_grid(low, low_grid),
                     lambda: as_tokens(F.interpolate(as_map(low, low_grid), scale_factor=2.,
                                                     mode='nearest'))),
        'add_upsampled': (lambda: multi_scale.add_upsampled(patches, low, grid),
                          lambda: patches + as_tokens(F.interpolate(
                              as_map(low, low_grid), scale_factor=2., mode='nearest'))),
    }
    for name, (function, reference) in outputs.items():
        with matmul_ops.cuda_forms() if forms == 'cuda' else contextlib.nullcontext(), \
                DispatchRecorder(reduced_dimensions) as reductions:
            got = function()
            grads = torch.autograd.grad(got, (patches, low), torch.ones_like(got),
                                        allow_unused=True)
        expected = reference()
        expected_grads = torch.autograd.grad(expected, (patches, low), torch.ones_like(expected),
                                             allow_unused=True)
        torch.testing.assert_close(got, expected, rtol=1e-15, atol=1e-15, msg=name)
        for value, reference_grad in zip(grads, expected_grads):
            assert (value is None) == (reference_grad is None), name
            if value is not None:
                torch.testing.assert_close(value, reference_grad, rtol=1e-15, atol=1e-15,
                                           msg=name)
        assert reductions.records, f'{name}: something reduces the 2x2 cells'
        assert all((len(dims) == 1) == (forms == 'cpu') for dims in reductions.records), \
            (name, reductions.records)
