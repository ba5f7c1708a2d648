"""The matrix-product forms of ``matmul_ops`` against the operations they replace.

1. ``depthwise_as_matmul`` / ``depthwise_tap_placement`` against ``F.conv2d`` and a placement
   written out by hand.
2. ``bilinear_resize_matrix`` against ``F.interpolate``.

(``embed_patches_as_matmul`` is tested through the model, in tests/test_fast_paths.py.)

Run: ``python -m pytest tests/test_matmul_ops.py -q`` from the repository root.
"""
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


# ---------------------------------------------------------------------------------------------
# 1. depthwise_as_matmul and depthwise_tap_placement
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('kernel,dilation', [(3, 1), (7, 2)])
@pytest.mark.parametrize('grid', [(4, 6), (6, 4), (5, 5), (3, 7), (2, 3), (8, 8)])
def test_depthwise_as_matmul_equals_conv2d(kernel, dilation, grid):
    channels, batch = 5, 3
    torch.manual_seed(kernel * 100 + grid[0] * 10 + grid[1])
    conv = multi_scale.depthwise_conv(channels, kernel, dilation=dilation).double()
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
