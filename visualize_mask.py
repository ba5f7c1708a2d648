"""Pictures of token mergence: which original patches ended up in the same token (SPEC 4).

For every visualised image this writes the input and, after each reduction stage of the model,
a picture in which every original patch is filled with the mean colour of its group (all the
patches merged into the same token by then), group borders drawn with scikit-image morphology.
One overview per batch puts the input and the stages of every image side by side.

The images are ``n_visualization`` dataset positions spread evenly over the validation set; in a
run of several processes each process takes every world_size-th of them, so every image is
written exactly once, whatever shards the evaluation. Works for any patch grid and any number of
reductions (none included), single- or multi-scale, on any device.

File names in ``output_dir`` (``g`` = the image's index in the dataset, at least 5 digits;
``s`` = stage, 1 .. number of reductions, counted in block order; ``r`` = rank, ``b`` = batch):
    img{g:05d}_input.png, img{g:05d}_stage{s}.png, batch{r}_{b:04d}_overview.png
"""
import os
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

__all__ = ['BORDER_COLOUR', 'group_assignments', 'normalize', 'denormalize', 'to_uint8', 'paint_groups',
           'overview', 'visualization_indices', 'visualize']

BORDER_COLOUR = (255, 255, 255)
"""RGB of group borders (white): visible on the mean colours of natural images."""

BORDER_RADIUS = 1
"""A pixel is on a border when a pixel within this many pixels (8-connected) is in another
group, so a border between two groups is 2 * BORDER_RADIUS pixels wide, half on each side."""

OVERVIEW_GAP = 4
"""Pixels between the pictures of an overview."""

OVERVIEW_BACKGROUND = 0
"""Grey level (black) of the gaps of an overview."""

MAX_LEVEL = 255
"""uint8 value of a colour channel at intensity 1."""

RGB = 3

MIN_INDEX_DIGITS = 5
"""File names carry the dataset index with at least this many digits (ImageNet's 50,000
validation images need exactly five)."""


def group_assignments(reductions: Sequence[Tuple[torch.Tensor, torch.Tensor]],
                      num_patches: int) -> List[torch.Tensor]:
    """The token every original patch belongs to after each reduction stage.

    The assignment maps of successive reductions are composed: the token of patch p after
    stage s is ``assignment_s[token of p after stage s - 1]``.

    Args:
        reductions: one ``(kept_index (B, K_s), assignment (B, N_s))`` per stage, in block
            order, as ``model(images, get_idx=True)`` returns them; N_1 = num_patches and
            N_s = K_{s-1}; ``assignment[b, j]`` is the output position (0 .. K_s - 1) of the
            token input patch token j went into.
        num_patches: gh * gw, the patch tokens of the first reduction's input (row-major).
    Returns:
        One (B, num_patches) int64 tensor per stage: entry [b, p] is the position (0 .. K_s - 1)
        among stage s's output tokens of the token original patch p belongs to.
    """
    groups = []
    tokens_in = num_patches
    for stage, (kept_index, assignment) in enumerate(reductions, start=1):
        if assignment.shape[1] != tokens_in:
            raise ValueError(f'reduction {stage} maps {assignment.shape[1]} tokens, but '
                             f'{tokens_in} patch tokens enter it')
        # The first reduction's input tokens are the original patches: its map is the answer.
        groups.append(assignment.gather(1, groups[-1]) if groups else assignment)
        tokens_in = kept_index.shape[1]
    return groups


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """The input normalisation, the loaders' own arithmetic (``input_pipeline``), so that the
    model sees what evaluation gives it. (B, 3, H, W) uint8 -> (B, 3, H, W) float32."""
    from input_pipeline import normalization, normalize_uint8
    return normalize_uint8(images, *normalization(mean, std, images.device))


def denormalize(images: torch.Tensor, mean: Sequence[float],
                std: Sequence[float]) -> torch.Tensor:
    """Undoes the input normalisation. (B, 3, H, W) normalised -> (B, 3, H, W) float32 in [0, 1].

    Clamped to [0, 1] so that group colours are means of the colours the input picture shows.
    """
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=images.device).view(1, RGB, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=images.device).view(1, RGB, 1, 1)
    return (images.float() * std_t + mean_t).clamp(0, 1)


def to_uint8(pictures: torch.Tensor) -> np.ndarray:
    """(B, H, W, 3) float in [0, 1] -> (B, H, W, 3) uint8 numpy array on the host (rounded)."""
    return (pictures * MAX_LEVEL).round().to(torch.uint8).cpu().numpy()


def _per_pixel(per_patch: torch.Tensor, grid: Tuple[int, int],
               patch_size: Tuple[int, int]) -> torch.Tensor:
    """Spreads one value per patch over the patch's pixels.

    Args: per_patch (B, gh * gw, *F) row-major; grid (gh, gw); patch_size (ph, pw).
    Returns: (B, gh * ph, gw * pw, *F).
    """
    batch, features = per_patch.shape[0], per_patch.shape[2:]
    (gh, gw), (ph, pw) = grid, patch_size
    cells = per_patch.reshape(batch, gh, 1, gw, 1, *features)
    cells = cells.expand(batch, gh, ph, gw, pw, *features)
    return cells.reshape(batch, gh * ph, gw * pw, *features)


def paint_groups(images: torch.Tensor, groups: Sequence[torch.Tensor], grid: Tuple[int, int],
                 patch_size: Tuple[int, int], mean: Sequence[float],
                 std: Sequence[float]) -> List[np.ndarray]:
    """One picture per stage: every patch filled with its group's mean colour, borders drawn.

    A group's colour is the mean over all pixels of all its patches of the denormalised
    (clamped) input; pixels within ``BORDER_RADIUS`` of another group get ``BORDER_COLOUR``.
    The edge of the image is not a border.

    Args:
        images: (B, 3, H, W) normalised with ``mean``/``std``; H = gh * ph, W = gw * pw.
        groups: per stage (B, gh * gw) int64, the group (0 .. gh * gw - 1) of each original
            patch in row-major order, e.g. from ``group_assignments``.
        grid: (gh, gw) patches.
        patch_size: (ph, pw) pixels.
        mean, std: per-channel normalisation of ``images`` (3 values each).
    Returns:
        Per stage a (B, H, W, 3) uint8 array.
    """
    from skimage.morphology import dilation, erosion

    batch, channels, height, width = images.shape
    (gh, gw), (ph, pw) = grid, patch_size
    if (channels, height, width) != (RGB, gh * ph, gw * pw):
        raise ValueError(f'images of shape {tuple(images.shape)} do not match a {gh}x{gw} grid '
                         f'of {ph}x{pw} patches with 3 channels')
    num_patches = gh * gw
    pixels = denormalize(images=images, mean=mean, std=std)
    # Every patch has ph * pw pixels, so a group's pixel mean is its summed patch sums over
    # (patches in the group) * ph * pw.
    patch_sums = pixels.reshape(batch, RGB, gh, ph, gw, pw).sum(dim=(3, 5))
    patch_sums = patch_sums.flatten(2).transpose(1, 2)  # (B, gh * gw, 3)
    ones = torch.ones(batch, num_patches, device=images.device)
    # The leading 1 keeps the neighbourhood inside one image of the batch.
    footprint = np.ones((1, 2 * BORDER_RADIUS + 1, 2 * BORDER_RADIUS + 1), dtype=bool)
    border_colour = np.asarray(BORDER_COLOUR, dtype=np.uint8)

    pictures = []
    for group in groups:
        # Group ids are < num_patches, so num_patches slots hold every group; the clamp only
        # keeps empty slots (never gathered back) from dividing by zero.
        colour_index = group.unsqueeze(-1).expand(-1, -1, RGB)
        group_sums = torch.zeros_like(patch_sums).scatter_add_(1, colour_index, patch_sums)
        group_sizes = torch.zeros_like(ones).scatter_add_(1, group, ones)
        group_means = group_sums / (group_sizes.clamp(min=1) * ph * pw).unsqueeze(-1)
        patch_colours = group_means.gather(1, colour_index)  # (B, gh * gw, 3)
        picture = to_uint8(_per_pixel(patch_colours, grid=grid, patch_size=patch_size))

        labels = _per_pixel(group, grid=grid, patch_size=patch_size).cpu().numpy()  # (B, H, W)
        # 'reflect' padding: the image edge does not count as a change of group.
        border = dilation(labels, footprint, mode='reflect') != erosion(labels, footprint,
                                                                       mode='reflect')
        picture[border] = border_colour
        pictures.append(picture)
    return pictures


def overview(columns: Sequence[np.ndarray]) -> np.ndarray:
    """Tiles pictures into one: row i holds image i, column c the c-th entry of ``columns``.

    Args: columns: C arrays (R, H, W, 3) uint8. Returns: (R * (H + gap) - gap,
    C * (W + gap) - gap, 3) uint8, gap = ``OVERVIEW_GAP`` filled with ``OVERVIEW_BACKGROUND``.
    """
    tiles = np.stack(columns, axis=1)  # (R, C, H, W, 3)
    rows, cols, height, width, _ = tiles.shape
    padded = np.pad(tiles, ((0, 0), (0, 0), (0, OVERVIEW_GAP), (0, OVERVIEW_GAP), (0, 0)),
                    constant_values=OVERVIEW_BACKGROUND)
    canvas = padded.transpose(0, 2, 1, 3, 4).reshape(
        rows * (height + OVERVIEW_GAP), cols * (width + OVERVIEW_GAP), RGB)
    return canvas[:rows * (height + OVERVIEW_GAP) - OVERVIEW_GAP,
                  :cols * (width + OVERVIEW_GAP) - OVERVIEW_GAP]


def visualization_indices(dataset_len: int, n_visualization: int, rank: int,
                          world_size: int, targets: Optional[Sequence[int]] = None) -> List[int]:
    """The dataset indices this process visualises.

    ``n = min(n_visualization, dataset_len)`` positions spread evenly over the dataset, each
    in the middle of its n-th of it (``(2 i + 1) * dataset_len // (2 n)`` for i = 0 .. n - 1, all
    distinct), of which process ``rank``
    takes every ``world_size``-th from the ``rank``-th on: the processes' shares are disjoint
    and together hold all n. With the dataset's ``targets`` the positions are those of the
    dataset ordered by class (then index), so that the images are spread over the classes
    whatever order the dataset stores them in: with n at least the number of classes and
    classes of similar size, every class is shown.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f'rank {rank} is outside 0..{world_size - 1}')
    if n_visualization < 0:
        raise ValueError(f'n_visualization must be >= 0, got {n_visualization}')
    count = min(n_visualization, dataset_len)
    order = (sorted(range(dataset_len), key=lambda index: (targets[index], index))
             if targets is not None else range(dataset_len))
    return [order[(2 * i + 1) * dataset_len // (2 * count)] for i in range(rank, count, world_size)]


def _save_png(array: np.ndarray, path: str) -> str:
    from PIL import Image

    Image.fromarray(array).save(path)
    return path


def visualize(model: torch.nn.Module, dataset, device: Union[str, torch.device],
              output_dir: str, n_visualization: int, mean: Sequence[float],
              std: Sequence[float], batch_size: int,
              keep_rate: Optional[Union[float, Sequence[float]]] = None, rank: int = 0,
              world_size: int = 1, num_workers: int = 0) -> List[str]:
    """Writes the inputs and mergence pictures of this process's share of the images.

    The model runs in eval mode without gradients (its mode is restored afterwards) on the
    images ``visualization_indices`` gives this process, so that all processes together write
    each of the ``min(n_visualization, len(dataset))`` images exactly once.

    Args:
        model: an MTViT (or a wrapper such as DDP with the MTViT as ``.module``); patch size
            and grid are read from it (``patch_embed.patch_size``, ``grid``).
        dataset: the whole validation set (not a process's shard): item i is (image (3, H, W)
            at the model's input size, uint8 or normalised with ``mean``/``std``, target); its
            ``targets`` list, where it has one, spreads the images over the classes.
        device: where the model runs.
        output_dir: created if missing; file names in the module docstring.
        n_visualization: images written by all processes together.
        mean, std: per-channel input normalisation (3 values each).
        batch_size: images per forward pass (and per overview).
        keep_rate: passed to the model (None: its configured rates).
        rank, world_size: this process and the number of processes.
        num_workers: data-loader worker processes reading the images.
    Returns:
        The paths written, in order of writing.
    """
    from torch.utils.data import DataLoader, Subset

    net = getattr(model, 'module', model)
    grid = tuple(net.grid)
    patch_size = tuple(net.patch_embed.patch_size)
    indices = visualization_indices(dataset_len=len(dataset), n_visualization=n_visualization,
                                    rank=rank, world_size=world_size,
                                    targets=getattr(dataset, 'targets', None))
    if n_visualization > len(dataset):
        print(f'visualize_mask: n_visualization {n_visualization} exceeds the {len(dataset)} '
              f'validation images; visualising all of them')
    os.makedirs(output_dir, exist_ok=True)
    # Names sort in dataset order for any dataset size.
    digits = max(MIN_INDEX_DIGITS, len(str(max(len(dataset) - 1, 0))))
    loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers)
    written = []
    done = 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for batch_index, (images, _) in enumerate(loader):
            images = images.to(device, non_blocking=True)
            if images.dtype == torch.uint8:  # the training pipeline's images (input_pipeline)
                images = normalize(images=images, mean=mean, std=std)
            _, reductions = model(images, keep_rate=keep_rate, get_idx=True)
            groups = group_assignments(reductions=reductions, num_patches=grid[0] * grid[1])
            inputs = to_uint8(denormalize(images=images, mean=mean, std=std).permute(0, 2, 3, 1))
            stages = paint_groups(images=images, groups=groups, grid=grid, patch_size=patch_size,
                                  mean=mean, std=std)
            for i in range(len(images)):
                prefix = os.path.join(output_dir, f'img{indices[done + i]:0{digits}d}')
                written.append(_save_png(inputs[i], f'{prefix}_input.png'))
                for stage, pictures in enumerate(stages, start=1):
                    written.append(_save_png(pictures[i], f'{prefix}_stage{stage}.png'))
            written.append(_save_png(
                overview(columns=[inputs, *stages]),
                os.path.join(output_dir, f'batch{rank}_{batch_index:04d}_overview.png')))
            done += len(images)
    model.train(was_training)
    return written


if __name__ == '__main__':
    raise SystemExit('visualize_mask.py is the library behind `main.py --visualize_mask --resume '
                     'CHECKPOINT --n_visualization N --output_dir DIR`; run that instead')
