"""Tests for visualize_mask: group composition, painting, and the files visualize writes."""
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models_mtvit  # noqa: E402,F401  (registers the models with timm)
import visualize_mask  # noqa: E402
from models_mtvit import merge_tokens  # noqa: E402
from visualize_mask import (  # noqa: E402
    BORDER_COLOUR, OVERVIEW_BACKGROUND, OVERVIEW_GAP, denormalize, group_assignments,
    overview, paint_groups, visualization_indices, visualize)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMG_SIZE = 64
PATCH = 16
TINY_GRID = (IMG_SIZE // PATCH, IMG_SIZE // PATCH)
TINY_DROP_LOC = (1, 2, 3)
TINY_KEEP_RATE = 0.5


def tiny_mtvit(**overrides):
    torch.manual_seed(0)
    options = dict(embed_dim=32, depth=4, num_heads=2, img_size=IMG_SIZE,
                   drop_loc=TINY_DROP_LOC, base_keep_rate=TINY_KEEP_RATE, num_classes=10)
    options.update(overrides)
    return timm.create_model('deit_tiny_patch16_shrink_base', **options)


def random_reductions(batch, num_patches, keep_rates, dim=8, seed=0):
    """A chain of real merge_tokens reductions on random tokens and attention."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, num_patches + 1, dim, generator=generator)
    reductions = []
    for rate in keep_rates:
        tokens_in = x.shape[1] - 1
        attention = torch.rand(batch, tokens_in, generator=generator).softmax(dim=1)
        x, kept_index, assignment = merge_tokens(x, attention, math.ceil(rate * tokens_in))
        reductions.append((kept_index, assignment))
    return reductions


def loop_reference(reductions, num_patches):
    """Follows every original patch through the stages one assignment lookup at a time."""
    batch = reductions[0][1].shape[0] if reductions else 0
    groups = [torch.empty(batch, num_patches, dtype=torch.int64) for _ in reductions]
    for b in range(batch):
        for patch in range(num_patches):
            token = patch
            for stage, (_, assignment) in enumerate(reductions):
                token = int(assignment[b, token])
                groups[stage][b, patch] = token
    return groups


def check_partition(groups, reductions, num_patches):
    """Stage s has exactly K_s non-empty groups (0 .. K_s - 1) covering every patch once, and
    kept token i of stage s is the group of the patches that were in its input token."""
    batch = reductions[0][0].shape[0]
    previous = torch.arange(num_patches).expand(batch, num_patches)
    for group, (kept_index, _) in zip(groups, reductions):
        num_kept = kept_index.shape[1]
        assert group.shape == (batch, num_patches)
        assert group.dtype == torch.int64
        for b in range(batch):
            assert group[b].unique().numel() == num_kept
            sizes = torch.bincount(group[b], minlength=num_kept)
            assert sizes.numel() == num_kept
            assert (sizes > 0).all() and sizes.sum() == num_patches
            for i in range(num_kept):
                members = previous[b] == kept_index[b, i]
                assert members.any() and (group[b][members] == i).all()
        previous = group


@pytest.mark.parametrize('grid', [(4, 4), (7, 7), (14, 14), (3, 5)])
@pytest.mark.parametrize('keep_rates', [(0.5,), (0.7, 0.7, 0.7), (0.25, 0.9, 0.5, 0.5, 0.6)])
def test_group_assignments_matches_loop_reference(grid, keep_rates):
    num_patches = grid[0] * grid[1]
    reductions = random_reductions(batch=3, num_patches=num_patches, keep_rates=keep_rates,
                                   seed=num_patches)
    groups = group_assignments(reductions=reductions, num_patches=num_patches)
    reference = loop_reference(reductions, num_patches)
    assert len(groups) == len(keep_rates)
    for got, expected in zip(groups, reference):
        assert torch.equal(got, expected)
    check_partition(groups, reductions, num_patches)


def test_group_assignments_hand_made():
    # 4 patches -> keep patches 2, 0 (positions 0, 1); 1 -> merged into 0's token, 3 into 2's.
    # Then keep position 1 only: everything ends in one group.
    reductions = [(torch.tensor([[2, 0]]), torch.tensor([[1, 1, 0, 0]])),
                  (torch.tensor([[1]]), torch.tensor([[0, 0]]))]
    groups = group_assignments(reductions=reductions, num_patches=4)
    assert groups[0].tolist() == [[1, 1, 0, 0]]
    assert groups[1].tolist() == [[0, 0, 0, 0]]


def test_group_assignments_no_reduction_and_mismatch():
    assert group_assignments(reductions=[], num_patches=196) == []
    reductions = random_reductions(batch=2, num_patches=16, keep_rates=(0.5,))
    with pytest.raises(ValueError, match='16 tokens'):
        group_assignments(reductions=reductions, num_patches=25)


@pytest.mark.parametrize('multi_scale', [False, True])
def test_group_assignments_real_model(multi_scale):
    if multi_scale:
        # Reductions come after the 3 two-scale blocks; the fused stream is full-resolution.
        model = tiny_mtvit(depth=5, drop_loc=(3, 4), multi_scale=True)
    else:
        model = tiny_mtvit()
    model.eval()
    num_patches = TINY_GRID[0] * TINY_GRID[1]
    with torch.no_grad():
        _, reductions = model(torch.randn(4, 3, IMG_SIZE, IMG_SIZE), get_idx=True)
    assert [kept.shape[1] for kept, _ in reductions] == (
        [8, 4] if multi_scale else [8, 4, 2])
    groups = group_assignments(reductions=reductions, num_patches=num_patches)
    check_partition(groups, reductions, num_patches)
    for got, expected in zip(groups, loop_reference(reductions, num_patches)):
        assert torch.equal(got, expected)


def test_denormalize_inverts_normalisation():
    pixels = torch.rand(2, 3, 5, 7)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    restored = denormalize(images=(pixels - mean) / std, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    assert torch.allclose(restored, pixels, atol=1e-6)
    assert denormalize(images=torch.full((1, 3, 1, 1), 100.), mean=IMAGENET_MEAN,
                       std=IMAGENET_STD).eq(1).all()


# Hand-made painting case: a 2x3 grid of 4x4 patches. Patch levels (out of 255) per group:
# group 0 = patches 0, 1, 4 (30, 60, 90 -> mean 60), group 1 = patches 2, 5 (102, 200 -> 151),
# group 2 = patch 3 (220); all six: mean 117. Channel c adds 5 * c. Within a patch, a
# checkerboard of +-10 levels leaves the patch mean unchanged (and no level leaves 0..255), so
# only the group mean survives the painting.
HAND_GRID = (2, 3)
HAND_PATCH = (4, 4)
HAND_LEVELS = [30, 60, 102, 220, 90, 200]
HAND_GROUPS = [0, 0, 1, 2, 0, 1]
HAND_GROUP_LEVELS = {0: 60, 1: 151, 2: 220}
CHANNEL_STEP = 5
CHECKER = 10


def hand_made_image():
    """Returns the normalised image (1, 3, 8, 12) and the patch label map (8, 12)."""
    (gh, gw), (ph, pw) = HAND_GRID, HAND_PATCH
    levels = np.zeros((3, gh * ph, gw * pw))
    labels = np.zeros((gh * ph, gw * pw), dtype=np.int64)
    rows, cols = np.indices((ph, pw))
    checker = np.where((rows + cols) % 2 == 0, CHECKER, -CHECKER)
    for patch, (level, group) in enumerate(zip(HAND_LEVELS, HAND_GROUPS)):
        top, left = (patch // gw) * ph, (patch % gw) * pw
        for channel in range(3):
            levels[channel, top:top + ph, left:left + pw] = level + CHANNEL_STEP * channel + checker
        labels[top:top + ph, left:left + pw] = group
    pixels = torch.tensor(levels / 255, dtype=torch.float32).unsqueeze(0)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (pixels - mean) / std, labels


def border_reference(labels):
    """Pixels with a pixel of another group among their in-image 8-neighbours."""
    height, width = labels.shape
    border = np.zeros_like(labels, dtype=bool)
    for y in range(height):
        for x in range(width):
            window = labels[max(y - 1, 0):y + 2, max(x - 1, 0):x + 2]
            border[y, x] = (window != labels[y, x]).any()
    return border


def test_paint_groups_hand_made():
    image, labels = hand_made_image()
    groups = [torch.tensor([HAND_GROUPS]), torch.zeros(1, 6, dtype=torch.int64)]
    pictures = paint_groups(images=image, groups=groups, grid=HAND_GRID, patch_size=HAND_PATCH,
                            mean=IMAGENET_MEAN, std=IMAGENET_STD)
    assert len(pictures) == 2
    assert all(p.shape == (1, 8, 12, 3) and p.dtype == np.uint8 for p in pictures)

    first = pictures[0][0]
    border = border_reference(labels)
    # Borders are 2 pixels wide between groups: some pixels of every group remain inside.
    assert 0 < border.sum() < border.size
    assert (first[border] == BORDER_COLOUR).all()
    for group, level in HAND_GROUP_LEVELS.items():
        inside = (labels == group) & ~border
        assert inside.any()
        expected = [level + CHANNEL_STEP * channel for channel in range(3)]
        assert (first[inside] == expected).all()
    # Pixel (0, 0) is inside group 0; row 3 above patch 3 (group 2) is a border.
    assert first[0, 0].tolist() == [60, 65, 70]
    assert first[3, 0].tolist() == list(BORDER_COLOUR)

    # One group: one colour (the mean of all six patches), and the image edge is no border.
    whole = sum(HAND_LEVELS) / len(HAND_LEVELS)
    assert (pictures[1][0] == [whole + CHANNEL_STEP * c for c in range(3)]).all()


def test_paint_groups_batch_images_do_not_interact():
    image, _ = hand_made_image()
    images = torch.cat([image, image])
    groups = [torch.tensor([HAND_GROUPS, [0] * 6])]
    pictures = paint_groups(images=images, groups=groups, grid=HAND_GRID, patch_size=HAND_PATCH,
                            mean=IMAGENET_MEAN, std=IMAGENET_STD)[0]
    alone = paint_groups(images=image, groups=[groups[0][:1]], grid=HAND_GRID,
                         patch_size=HAND_PATCH, mean=IMAGENET_MEAN, std=IMAGENET_STD)[0]
    assert np.array_equal(pictures[0], alone[0])
    assert not (pictures[1] == BORDER_COLOUR).all(axis=-1).any()


def test_paint_groups_rejects_wrong_grid():
    image, _ = hand_made_image()
    with pytest.raises(ValueError, match='grid'):
        paint_groups(images=image, groups=[], grid=(3, 3), patch_size=HAND_PATCH,
                     mean=IMAGENET_MEAN, std=IMAGENET_STD)


def test_overview_layout():
    first = np.full((2, 3, 5, 3), 10, dtype=np.uint8)
    second = np.full((2, 3, 5, 3), 20, dtype=np.uint8)
    second[1] = 30
    canvas = overview(columns=[first, second])
    assert canvas.shape == (2 * 3 + OVERVIEW_GAP, 2 * 5 + OVERVIEW_GAP, 3)
    assert (canvas[:3, :5] == 10).all() and (canvas[:3, 5 + OVERVIEW_GAP:] == 20).all()
    assert (canvas[3 + OVERVIEW_GAP:, 5 + OVERVIEW_GAP:] == 30).all()
    assert (canvas[3:3 + OVERVIEW_GAP] == OVERVIEW_BACKGROUND).all()
    assert (canvas[:, 5:5 + OVERVIEW_GAP] == OVERVIEW_BACKGROUND).all()


@pytest.mark.parametrize('length, n, world_size', [
    (12, 12, 1), (12, 12, 2), (12, 7, 2), (359, 6, 2), (10, 5, 3), (3, 2, 4), (5, 0, 2),
    (4, 9, 2)])
def test_visualization_indices_spread_and_shard(length, n, world_size):
    shares = [visualization_indices(dataset_len=length, n_visualization=n, rank=rank,
                                    world_size=world_size) for rank in range(world_size)]
    count = min(n, length)
    spread = [(2 * i + 1) * length // (2 * count) for i in range(count)]
    assert sorted(sum(shares, [])) == spread
    assert len(set(spread)) == count and all(0 <= index < length for index in spread)
    for rank, share in enumerate(shares):
        assert share == spread[rank::world_size]
    # Even spacing: gaps differ by at most one image.
    gaps = {b - a for a, b in zip(spread, spread[1:])}
    assert not gaps or max(gaps) - min(gaps) <= 1


def test_visualization_indices_examples():
    assert visualization_indices(dataset_len=359, n_visualization=6, rank=0, world_size=2) == [
        29, 149, 269]
    assert visualization_indices(dataset_len=359, n_visualization=6, rank=1, world_size=2) == [
        89, 209, 329]
    # With targets: spread over the dataset in class order, so each class of 3 shows once.
    targets = [2, 0, 1, 2, 0, 1, 0, 1, 2]
    assert visualization_indices(dataset_len=9, n_visualization=3, rank=0, world_size=1,
                                 targets=targets) == [4, 5, 3]
    with pytest.raises(ValueError, match='rank 2'):
        visualization_indices(dataset_len=10, n_visualization=2, rank=2, world_size=2)


# visualize: 12 images, batches of 8.
NUM_IMAGES = 12
BATCH_SIZE = 8


def image_dataset():
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(NUM_IMAGES, 3, IMG_SIZE, IMG_SIZE, generator=generator)
    return TensorDataset(images, torch.arange(NUM_IMAGES))


def run_visualize(model, dataset, output_dir, n, **options):
    return visualize(model=model, dataset=dataset, device='cpu', output_dir=str(output_dir),
                     n_visualization=n, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                     batch_size=BATCH_SIZE, **options)


def png(path):
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert('RGB'))


def names(directory, suffix):
    return sorted(name for name in os.listdir(directory) if name.endswith(suffix))


def input_picture(image):
    """What visualize writes as the input picture of ``image`` (3, H, W): (H, W, 3) uint8."""
    pixels = denormalize(images=image[None], mean=IMAGENET_MEAN, std=IMAGENET_STD)[0]
    return (pixels.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()


def overview_shape(rows, cols):
    return (rows * (IMG_SIZE + OVERVIEW_GAP) - OVERVIEW_GAP,
            cols * (IMG_SIZE + OVERVIEW_GAP) - OVERVIEW_GAP, 3)


def test_visualize_writes_every_picture(tmp_path):
    model = tiny_mtvit()
    model.train()
    dataset = image_dataset()
    written = run_visualize(model, dataset, tmp_path, NUM_IMAGES)
    num_stages = len(TINY_DROP_LOC)

    assert model.training  # mode restored
    assert sorted(os.path.basename(p) for p in written) == sorted(os.listdir(tmp_path))
    inputs = names(tmp_path, '_input.png')
    assert inputs == [f'img{i:05d}_input.png' for i in range(NUM_IMAGES)]
    stages = names(tmp_path, '.png')
    stage_names = {f'img{i:05d}_stage{s}.png' for i in range(NUM_IMAGES)
                   for s in range(1, num_stages + 1)}
    assert set(stages) - set(inputs) - {'batch0_0000_overview.png', 'batch0_0001_overview.png'} \
        == stage_names
    assert len(stages) == NUM_IMAGES * (1 + num_stages) + 2
    for name in stage_names | set(inputs):
        assert png(tmp_path / name).shape == (IMG_SIZE, IMG_SIZE, 3)

    # The input picture is the denormalised image.
    expected = input_picture(dataset.tensors[0][0])
    assert np.array_equal(png(tmp_path / 'img00000_input.png'), expected)

    # The overviews: 8 then 4 rows, input + stages side by side.
    first = png(tmp_path / 'batch0_0000_overview.png')
    assert first.shape == overview_shape(BATCH_SIZE, 1 + num_stages)
    assert png(tmp_path / 'batch0_0001_overview.png').shape == overview_shape(
        NUM_IMAGES - BATCH_SIZE, 1 + num_stages)
    assert np.array_equal(first[:IMG_SIZE, :IMG_SIZE], expected)
    last_column = first.shape[1] - IMG_SIZE
    assert np.array_equal(first[:IMG_SIZE, last_column:],
                          png(tmp_path / f'img00000_stage{num_stages}.png'))

    # The stage pictures are those of paint_groups on the model's own reductions.
    model.eval()
    with torch.no_grad():
        _, reductions = model(dataset.tensors[0][:2], get_idx=True)
    groups = group_assignments(reductions=reductions, num_patches=TINY_GRID[0] * TINY_GRID[1])
    painted = paint_groups(images=dataset.tensors[0][:2], groups=groups, grid=TINY_GRID,
                           patch_size=(PATCH, PATCH), mean=IMAGENET_MEAN, std=IMAGENET_STD)
    for stage, pictures in enumerate(painted, start=1):
        assert np.array_equal(png(tmp_path / f'img00001_stage{stage}.png'), pictures[1])


def test_visualize_spreads_n_over_the_dataset(tmp_path):
    dataset = image_dataset()
    run_visualize(tiny_mtvit(), dataset, tmp_path, 5)
    spread = [1, 3, 6, 8, 10]  # (2 i + 1) * 12 // 10: the middle of each fifth
    assert names(tmp_path, '_input.png') == [f'img{i:05d}_input.png' for i in spread]
    assert len(names(tmp_path, '.png')) == 5 * (1 + len(TINY_DROP_LOC)) + 1
    assert png(tmp_path / 'batch0_0000_overview.png').shape == overview_shape(
        5, 1 + len(TINY_DROP_LOC))
    # Each file shows the image at the index in its name.
    expected = input_picture(dataset.tensors[0][8])
    assert np.array_equal(png(tmp_path / 'img00008_input.png'), expected)


def test_visualize_without_reductions(tmp_path):
    run_visualize(tiny_mtvit(), image_dataset(), tmp_path, NUM_IMAGES, keep_rate=1.0)
    assert len(names(tmp_path, '_input.png')) == NUM_IMAGES
    assert not [name for name in os.listdir(tmp_path) if '_stage' in name]
    assert names(tmp_path, '_overview.png') == ['batch0_0000_overview.png',
                                                 'batch0_0001_overview.png']
    assert png(tmp_path / 'batch0_0000_overview.png').shape == overview_shape(BATCH_SIZE, 1)


def test_visualize_multi_scale(tmp_path):
    model = tiny_mtvit(depth=5, drop_loc=(3, 4), multi_scale=True)
    written = run_visualize(model, image_dataset(), tmp_path, 3)
    assert len(written) == 3 * (1 + 2) + 1


def test_visualize_more_than_the_dataset_writes_every_image_once(tmp_path, capsys):
    run_visualize(tiny_mtvit(), image_dataset(), tmp_path, NUM_IMAGES + 8)
    assert names(tmp_path, '_input.png') == [f'img{i:05d}_input.png' for i in range(NUM_IMAGES)]
    assert 'n_visualization 20 exceeds the 12 validation images' in capsys.readouterr().out


@pytest.mark.parametrize('n', [NUM_IMAGES, 7])
def test_visualize_two_processes_share_n(tmp_path, n):
    world_size = 2
    dataset = image_dataset()
    model = tiny_mtvit()
    written = [run_visualize(model, dataset, tmp_path, n, rank=rank, world_size=world_size)
               for rank in range(world_size)]
    every = written[0] + written[1]
    assert len(every) == len(set(every)) == len(os.listdir(tmp_path))
    spread = [(2 * i + 1) * NUM_IMAGES // (2 * n) for i in range(n)]
    assert names(tmp_path, '_input.png') == [f'img{i:05d}_input.png' for i in spread]
    for rank in range(world_size):
        mine = sorted(os.path.basename(path) for path in written[rank] if path.endswith('_input.png'))
        assert mine == sorted(f'img{i:05d}_input.png' for i in spread[rank::world_size])
    assert len(names(tmp_path, '.png')) == n * (1 + len(TINY_DROP_LOC)) + world_size
    assert names(tmp_path, '_overview.png') == ['batch0_0000_overview.png',
                                                 'batch1_0000_overview.png']
    # Rank 1's first image is the dataset's image at spread[1], under that index.
    expected = input_picture(dataset.tensors[0][spread[1]])
    assert np.array_equal(png(tmp_path / f'img{spread[1]:05d}_input.png'), expected)


def test_visualize_names_files_with_enough_digits(tmp_path):
    images = torch.randn(3, 3, IMG_SIZE, IMG_SIZE)
    big = torch.utils.data.Subset(TensorDataset(images, torch.arange(3)), [0, 1, 2] * 40000)
    run_visualize(tiny_mtvit(), big, tmp_path, 2)
    assert names(tmp_path, '_input.png') == ['img030000_input.png', 'img090000_input.png']


def test_normalize_is_the_loaders_normalisation():
    # The visualisation's model input equals what the evaluation loader gives the model, bit for
    # bit, and is the normalisation (x / 255 - mean) / std to float rounding.
    import input_pipeline
    images = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    loader = input_pipeline.DeviceLoader([(images, torch.zeros(3, dtype=torch.long))], 'cpu')
    [(expected, _)] = list(loader)
    got = visualize_mask.normalize(images, IMAGENET_MEAN, IMAGENET_STD)
    assert got.dtype == torch.float32 and torch.equal(got, expected)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(got, (images / 255 - mean) / std, rtol=0, atol=1e-6)
    assert images.dtype == torch.uint8  # the input is left as it was
