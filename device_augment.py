"""RandAugment and the crop resize on the device, batched, with timm's per-image draws.

For ``--gpu-augment`` a loader worker only decodes and crops; ``resize_crops`` resizes a batch's
crops (``pad_crops``) exactly as PIL resizes each one, and ``DeviceRandAugment`` applies timm's
RandAugment to the whole batch.

Random draws: torch on the CPU, from the ``generator`` given to ``draw`` / ``__call__``, else
torch's global CPU RNG. Same distributions as timm's per-image draws, not its random streams.
Fidelity (tests/test_device_augment.py checks each op against timm's): timm's magnitude ->
argument formulas; the colour ops redo PIL's arithmetic (same pixels); the geometric ops follow
PIL's affine convention, bounds and fill, but resample with torch's bicubic (a = -0.75, PIL's
transform: a = -1), so they match only approximately.
"""
import functools
import itertools
import math
from typing import NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence
from torchvision.transforms import InterpolationMode

# timm's _LEVEL_DENOM: magnitude 10 is the full op strength.
LEVEL_DENOM = 10.0
# PIL resampling filter ids (Image.Resampling values) -> grid_sample modes.
PIL_FILTERS = {0: 'nearest', 2: 'bilinear', 3: 'bicubic'}
# Added before truncating resampled values: a sample that lands on a pixel centre reproduces
# that pixel in PIL, while float32 coordinates can leave it a hair below (e.g. 127.9999 -> 127).
TRUNCATION_SLACK = 0.01


def _signed(value, negate):
    """timm's ``_randomly_negate`` with the sign drawn beforehand."""
    return torch.where(negate, -value, value)


# timm's LEVEL_TO_ARG on tensors: (level = magnitude / 10 (N,) float64, negate (N,) bool, hparams)
# -> the op's argument (N,) float64. Translate*Rel return the fraction of the image size, as timm.
LEVEL_TO_ARG = dict.fromkeys(('AutoContrast', 'Equalize', 'Invert'),
                             lambda level, negate, hp: torch.zeros_like(level))
LEVEL_TO_ARG.update({
    'Rotate': lambda level, negate, hp: _signed(level * 30.0, negate),
    'Posterize': lambda level, negate, hp: torch.floor(level * 4),
    'PosterizeIncreasing': lambda level, negate, hp: 4 - torch.floor(level * 4),
    'Solarize': lambda level, negate, hp: torch.floor(level * 256).clamp(max=256),
    'SolarizeIncreasing': lambda level, negate, hp: 256 - torch.floor(level * 256).clamp(max=256),
    'SolarizeAdd': lambda level, negate, hp: torch.floor(level * 110).clamp(max=128),
    'ShearX': lambda level, negate, hp: _signed(level * 0.3, negate),
    'ShearY': lambda level, negate, hp: _signed(level * 0.3, negate),
})
LEVEL_TO_ARG['TranslateXRel'] = LEVEL_TO_ARG['TranslateYRel'] = (
    lambda level, negate, hp: _signed(level * hp.get('translate_pct', 0.45), negate))
# Enhance factors in [0.1, 1.9]; the increasing variants move 1 (no change) by up to 0.9 either way.
for _name in ('Color', 'Contrast', 'Brightness', 'Sharpness'):
    LEVEL_TO_ARG[_name] = lambda level, negate, hp: level * 1.8 + 0.1
    LEVEL_TO_ARG[_name + 'Increasing'] = (
        lambda level, negate, hp: (1.0 + _signed(level * 0.9, negate)).clamp(min=0.1))
del _name

AFFINE, LOOKUP, ENHANCE = range(3)
# How each op is applied: one grid_sample for the geometric ops, a per-sample per-channel lookup
# table for the ops that map each pixel value alone, a blend with a degenerate image for the rest.
OP_KINDS = dict(dict.fromkeys(LEVEL_TO_ARG, LOOKUP), Color=ENHANCE, ColorIncreasing=ENHANCE,
                Sharpness=ENHANCE, SharpnessIncreasing=ENHANCE)
GEOMETRIC_OPS = ('Rotate', 'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel')
AFFINE_COEFFICIENT = {'ShearX': 1, 'TranslateXRel': 2, 'ShearY': 3, 'TranslateYRel': 5}
"""Which of PIL's affine data (a, b, c, d, e, f) each shear or translation sets."""
OP_KINDS.update(dict.fromkeys(GEOMETRIC_OPS, AFFINE))


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on ``device`` without a host synchronisation: a copy from pageable memory
    waits for all the device's queued work (the training step's too) at every batch; one from
    pinned memory does not."""
    if torch.device(device).type != 'cuda':
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def _pil_nearest_indices(in_size: int, out_size: int) -> list:
    """PIL's nearest resize: output i reads input int((i + 0.5) * in / out), accumulated in double
    step by step as ImagingScaleAffine does (ties then fall where PIL's rounding puts them)."""
    step = in_size / out_size
    positions = itertools.accumulate([step * 0.5] + [step] * (out_size - 1))
    return [int(position) for position in positions]


def _resize_nearest(crop: torch.Tensor, size) -> torch.Tensor:
    """(3, h, w) uint8 -> (3, size[0], size[1]) uint8: PIL's nearest resize, its pixels."""
    rows = _to_device(torch.tensor(_pil_nearest_indices(crop.shape[1], size[0])), crop.device)
    columns = _to_device(torch.tensor(_pil_nearest_indices(crop.shape[2], size[1])), crop.device)
    return crop[:, rows][:, :, columns]


# PIL's antialiased resampling filters (Resample.c): support at scale 1, and the kernel, written
# with PIL's operations in PIL's order (the coefficients must round as PIL's do).
def _bicubic_kernel(x, a=-0.5):
    x = x.abs()
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


RESAMPLE_FILTERS = {InterpolationMode.BICUBIC: (2.0, _bicubic_kernel),
                    InterpolationMode.BILINEAR: (1.0, lambda x: (1 - x.abs()).clamp(min=0))}
# PIL's 8-bit resampling works in fixed point: coefficients in units of 2^-22, each pass's sums
# rounded half up and clipped to 0..255.
PIL_PRECISION_BITS = 22
# Crops resized together, sorted by size and cut to the chunk's largest: bounds the float64 copies
# of the padded crops (32 x 3 x 500 x 500 x 8 bytes = 192 MB for ImageNet-sized crops).
RESIZE_CHUNK = 32


def pil_coefficients(in_sizes: torch.Tensor, out_size: int, mode: InterpolationMode):
    """PIL's coefficients for resizing B lines of lengths ``in_sizes`` (B,) to ``out_size``:
    (first (B, S) int64, each output's first input pixel; coefficients (B, S, K) int64, in units
    of 2^-22, of input pixels first .. first + K - 1).

    Resample.c's ``precompute_coeffs`` and ``normalize_coeffs_8bpc`` operation for operation in
    double precision on the CPU (the taps summed in order, the multiply by ``1 / filterscale``),
    so that every coefficient is PIL's own.
    """
    support, kernel = RESAMPLE_FILTERS[mode]
    lengths = in_sizes.cpu().double().view(-1, 1)
    scale = lengths / out_size
    stretch = scale.clamp(min=1.0)  # downscaling widens the filter: the antialiasing
    reach = support * stretch
    inverse = 1.0 / stretch
    centre = (torch.arange(out_size, dtype=torch.float64) + 0.5) * scale  # (B, S)
    # PIL truncates towards zero, then clips at 0: the same as the floor, then the clip.
    first = torch.floor(centre - reach + 0.5).clamp(min=0)
    count = torch.minimum(torch.floor(centre + reach + 0.5), lengths) - first
    weights, total = [], torch.zeros_like(centre)
    for tap in range(int(math.ceil(reach.max())) * 2 + 1):
        weight = torch.where(tap < count, kernel(((first + tap) - centre + 0.5) * inverse), 0.0)
        total = total + weight
        weights.append(weight)
    weights = torch.stack(weights, dim=-1)
    total = total.unsqueeze(-1)
    weights = torch.where(total != 0, weights / torch.where(total != 0, total, 1.0), weights)
    scaled = weights * float(1 << PIL_PRECISION_BITS)
    return first.long(), torch.trunc(torch.where(scaled < 0, scaled - 0.5, scaled + 0.5)).long()


@functools.lru_cache(maxsize=4096)
def _line_coefficients(length: int, out_size: int, mode: InterpolationMode):
    """``pil_coefficients`` of one line length: (first (S,) int64, coefficients (K, S) int32).
    Computed once per length: a crop's width or height is one of a few thousand lengths, so
    after the first batches the host does no arithmetic here."""
    first, coefficients = pil_coefficients(torch.tensor([length]), out_size, mode)
    return first[0], coefficients[0].t().to(torch.int32)  # |coefficient| <= 1.125 * 2^22


def _coefficient_matrix(in_sizes: torch.Tensor, in_max: int, out_size: int,
                        mode: InterpolationMode, device: torch.device) -> torch.Tensor:
    """(B, S, in_max) float64 on ``device``: PIL's coefficients of lines of lengths ``in_sizes``
    (B,) at their input pixels, zero elsewhere."""
    firsts, coefficients = zip(*(_line_coefficients(length, out_size, mode)
                                 for length in in_sizes.tolist()))
    first = _to_device(torch.stack(firsts), device).unsqueeze(-1)  # (B, S, 1)
    # (B, S, K); lines with fewer taps are padded with zero coefficients.
    coefficients = _to_device(pad_sequence(coefficients, batch_first=True), device).transpose(1, 2)
    # Taps past a line's end carry zero coefficients: clipping their columns changes no sum.
    taps = torch.arange(coefficients.shape[-1], device=device)
    columns = (first + taps).clamp_(max=in_max - 1)
    matrix = torch.zeros((len(firsts), out_size, in_max), dtype=torch.float64, device=device)
    return matrix.scatter_add_(2, columns, coefficients.double())


def _fixed_point(sums: torch.Tensor) -> torch.Tensor:
    """PIL's end of a pass: ``(sum + 2^21) >> 22``, clipped to 0..255 (exact in float64)."""
    half = float(1 << (PIL_PRECISION_BITS - 1))
    return sums.add_(half).mul_(1.0 / (1 << PIL_PRECISION_BITS)).floor_().clamp_(0, 255)


def _resize_exact(padded: torch.Tensor, sizes: torch.Tensor, size,
                  mode: InterpolationMode) -> torch.Tensor:
    """PIL's antialiased resize of every crop, horizontal pass then vertical, as two batched
    matrix products of its integer coefficients: (B, 3, S_h, S_w) uint8, PIL's pixels.

    The products are exact in float64: pixels (8 bits) times coefficients (below 2^23) summed
    over a line stay integers below 2^31, far below 2^53, whatever the order of the sums. Float64
    matrix products are fast on data-centre GPUs (H100, H200, A100), slow on consumer cards."""
    height, width = padded.shape[-2:]
    across = _coefficient_matrix(sizes[:, 1], width, size[1], mode, padded.device)  # (B, S_w, W)
    down = _coefficient_matrix(sizes[:, 0], height, size[0], mode, padded.device)  # (B, S_h, H)
    rows = _fixed_point(torch.matmul(padded.double(), across.transpose(1, 2).unsqueeze(1)))
    return _fixed_point(torch.matmul(down.unsqueeze(1), rows)).to(torch.uint8)


def pad_crops(crops: Sequence[torch.Tensor]):
    """Crops (3, h_i, w_i) uint8 -> (padded (B, 3, max h, max w) uint8, zeros beyond each crop,
    sizes (B, 2) int64 heights and widths)."""
    sizes = torch.tensor([tuple(crop.shape[1:]) for crop in crops], dtype=torch.int64)
    padded = crops[0].new_zeros((len(crops), 3, *sizes.max(0).values.tolist()))
    for target, crop in zip(padded, crops):
        target[:, :crop.shape[1], :crop.shape[2]] = crop
    return padded, sizes


def resize_crops(padded: torch.Tensor, sizes: torch.Tensor, size,
                 interpolation: Union[str, InterpolationMode, Sequence] = 'bicubic'
                 ) -> torch.Tensor:
    """Resize crops of different sizes to one size, exactly as PIL resizes each crop:
    (B, 3, S_h, S_w) uint8.

    ``padded``, ``sizes``: the crops as ``pad_crops`` gives them (``sizes`` on the CPU);
    ``size``: S or (S_h, S_w); ``interpolation``: 'bicubic', 'bilinear' or 'nearest' (or
    torchvision's InterpolationMode) for all crops, or a sequence with one per crop (timm's
    'random' draws one per image). Bicubic and bilinear (antialiased) run batched
    (``_resize_exact``), in chunks of ``RESIZE_CHUNK`` crops of similar sizes; nearest one crop
    at a time.
    """
    size = (size, size) if isinstance(size, int) else tuple(size)
    if isinstance(interpolation, (str, InterpolationMode)):
        interpolation = [interpolation] * len(padded)
    modes = [InterpolationMode(mode) for mode in interpolation]
    unknown = set(modes) - {InterpolationMode.NEAREST, *RESAMPLE_FILTERS}
    if unknown:
        raise ValueError(f'no device resize for {sorted(mode.value for mode in unknown)}')
    out = padded.new_empty((len(padded), 3, *size))
    for index, (mode, (height, width)) in enumerate(zip(modes, sizes.tolist())):
        if mode == InterpolationMode.NEAREST:
            out[index] = _resize_nearest(padded[index, :, :height, :width], size=size)
    for mode in set(modes) & set(RESAMPLE_FILTERS):
        rows = torch.tensor([index for index, chosen in enumerate(modes) if chosen == mode])
        # Crops of similar sizes together: one large crop then pads only its own chunk.
        rows = rows[sizes[rows].prod(dim=1).argsort()]
        for chunk in rows.split(RESIZE_CHUNK):
            height, width = sizes[chunk].max(dim=0).values.tolist()
            on_device = _to_device(chunk, padded.device)
            out[on_device] = _resize_exact(padded[on_device, :, :height, :width], sizes[chunk],
                                           size, mode)
    return out


def _blend(degenerate, image, factor):
    """PIL's ``Image.blend(degenerate, image, factor)`` on float32 tensors of integer values.

    PIL computes ``in1 + alpha * (in2 - in1)`` in float32 and truncates to uint8 (clipping first
    when alpha is outside [0, 1]); the same float32 operations in the same order give its pixels.
    """
    return (degenerate + factor * (image - degenerate)).clamp(0, 255).floor()


def _grayscale(images):
    """(N, 3, ...) uint8 -> (N, 1, ...) int32: PIL's RGB -> L, (299 R + 587 G + 114 B) / 1000 in
    its 16-bit fixed point (rounded)."""
    rgb = images.to(torch.int32)
    return (rgb[:, 0:1] * 19595 + rgb[:, 1:2] * 38470 + rgb[:, 2:3] * 7471 + 0x8000) >> 16


def _smooth(images):
    """PIL's ``ImageFilter.SMOOTH`` ([[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13, border pixels kept):
    (N, 3, H, W) uint8 -> float32 of integer values, summed in PIL's float32 order (0.5, then
    rows y+1, y, y-1, each left to right) so that the rounding matches PIL's."""
    x = images.float()
    side, centre = _to_device(torch.tensor([1.0, 5.0]), images.device) / 13.0

    def row(r, middle):
        return (r[..., :-2] * side + r[..., 1:-1] * middle) + r[..., 2:] * side

    below, middle, above = x[..., 2:, :], x[..., 1:-1, :], x[..., :-2, :]
    inner = ((0.5 + row(below, side)) + row(middle, centre)) + row(above, side)
    smooth = x.clone()
    smooth[..., 1:-1, 1:-1] = inner.clamp(0, 255).floor()
    return smooth


def _histogram(pixels):
    """(N, 3, P) uint8 -> (N, 3, 256) int64 counts (scatter_add: no device sync as bincount's)."""
    index = pixels.long()
    ones = torch.ones((), dtype=torch.int64, device=pixels.device).expand_as(index)
    counts = torch.zeros(*pixels.shape[:2], 256, dtype=torch.int64, device=pixels.device)
    return counts.scatter_add_(2, index, ones)


def _autocontrast_lut(pixels, arg, values):
    """ImageOps.autocontrast: each channel's [lo, hi] stretched to [0, 255], int() truncation."""
    present = _histogram(pixels) > 0
    values = values.double()
    lo = torch.where(present, values, 256.0).amin(-1, keepdim=True)
    hi = torch.where(present, values, -1.0).amax(-1, keepdim=True)
    scale = 255.0 / (hi - lo).clamp(min=1)
    stretched = torch.trunc(values * scale + (-lo * scale)).clamp(0, 255)
    return torch.where(hi > lo, stretched, values)


def _equalize_lut(pixels, arg, values):
    """ImageOps.equalize per channel, in PIL's integer arithmetic (step: all but the top bin)."""
    hist = _histogram(pixels)
    top = torch.where(hist > 0, values, -1).amax(-1, keepdim=True)
    step = (hist.sum(-1, keepdim=True) - hist.gather(-1, top.clamp(min=0))) // 255
    below = hist.cumsum(-1) - hist
    equalized = ((step // 2 + below) // step.clamp(min=1)).clamp(max=255)  # PIL's point() clips
    usable = ((hist > 0).sum(-1, keepdim=True) > 1) & (step > 0)
    return torch.where(usable, equalized, values)


def _contrast_lut(pixels, factor, values):
    """ImageEnhance.Contrast: blend with the grayscale mean, int(mean + 0.5)."""
    gray = _grayscale(pixels)
    mean = torch.floor(gray.sum(-1, keepdim=True).double() / gray.shape[-1] + 0.5).float()
    return _blend(mean, values.float(), factor.float())


# Lookup-table ops: (pixels (N, 3, P) uint8, argument (N, 1, 1) float64, values (1, 1, 256) int64)
# -> (N, 3 or 1, 256) integer-valued table, PIL's (ImageOps / ImageEnhance / timm) per entry.
LOOKUP_TABLES = {
    'AutoContrast': _autocontrast_lut,
    'Equalize': _equalize_lut,
    'Invert': lambda pixels, arg, values: 255 - values,
    # Keep the top ``bits`` bits: i & ~(2 ** (8 - bits) - 1); timm skips bits >= 8 (no change).
    'Posterize': lambda pixels, bits, values: values & (256 - 2 ** (8 - bits).clamp(min=0)).long(),
    'Solarize': lambda pixels, thresh, values: torch.where(values < thresh, values, 255 - values),
    'SolarizeAdd': lambda pixels, add, values: torch.where(values < 128, (values + add).clamp(max=255),
                                                           values),
    'Brightness': lambda pixels, factor, values: _blend(0.0, values.float(), factor.float()),
    'Contrast': _contrast_lut,
}


class AugmentDraws(NamedTuple):
    """A batch's RandAugment draws, each (B, num_layers) on the CPU.

    ops: int64 index into ``DeviceRandAugment.op_names``, -1 where the layer is skipped (prob).
    magnitude: float64, after the noise and the clipping to [0, magnitude_max].
    negate: bool, the sign of the signed ops (timm's ``_randomly_negate``).
    filters: int64 index into ``DeviceRandAugment.filters`` (resampling of geometric ops).
    """
    ops: torch.Tensor
    magnitude: torch.Tensor
    negate: torch.Tensor
    filters: torch.Tensor


class DeviceRandAugment:
    """timm's RandAugment on (B, 3, H, W) uint8 batches on any device, each sample drawn alone.

    ``config_str`` and ``hparams`` are those of timm's ``rand_augment_transform`` (timm parses
    them here); create_transform passes translate_const, img_mean (the fill) and interpolation.
    """

    def __init__(self, config_str: str = 'rand-m9-mstd0.5-inc1', hparams: Optional[dict] = None):
        from timm.data.auto_augment import rand_augment_transform

        # A copy: timm's parser writes magnitude_std / magnitude_max into the dict it is given.
        self._adopt(rand_augment_transform(config_str, hparams=dict(hparams) if hparams else None),
                    name=config_str)

    @classmethod
    def from_timm(cls, reference) -> 'DeviceRandAugment':
        """The device version of a timm ``RandAugment`` already built (by ``create_transform``)."""
        augment = cls.__new__(cls)
        augment._adopt(reference, name=repr(reference).split('(')[0])
        return augment

    def _adopt(self, reference, name: str) -> None:
        unsupported = sorted({op.name for op in reference.ops} - set(LEVEL_TO_ARG))
        if unsupported:
            raise ValueError(f'{name}: no device version of {unsupported}')
        first = reference.ops[0]  # timm builds every op from the same settings
        self.op_names = tuple(op.name for op in reference.ops)
        self.num_layers = reference.num_layers
        self.choice_weights = (None if reference.choice_weights is None
                               else torch.as_tensor(reference.choice_weights, dtype=torch.float64))
        self.prob = first.prob
        self.magnitude = float(first.magnitude)
        self.magnitude_std = first.magnitude_std
        self.magnitude_max = first.magnitude_max or LEVEL_DENOM
        self.hparams = first.hparams
        resample = first.kwargs['resample']
        resample = resample if isinstance(resample, (tuple, list)) else (resample,)
        self.filters = tuple(PIL_FILTERS[int(pil_filter)] for pil_filter in resample)
        fill = first.kwargs['fillcolor']
        self.fill = tuple(fill) if isinstance(fill, (tuple, list)) else (fill,) * 3
        self._kinds = torch.tensor([OP_KINDS[name] for name in self.op_names])

    def draw(self, batch_size: int, generator: Optional[torch.Generator] = None) -> AugmentDraws:
        """Draw ``batch_size`` samples' ops, magnitudes, signs and filters as timm does per image.

        timm: ``num_layers`` ops uniformly with replacement (weighted: without), each applied
        unless ``random() > prob``, magnitude ~ N(m, mstd) (uniform(0, m) for mstd inf) clipped
        to [0, mmax or 10], sign negated when ``random() > 0.5``, filter ``random.choice``.
        """
        shape = (batch_size, self.num_layers)
        if self.choice_weights is None:
            ops = torch.randint(len(self.op_names), shape, generator=generator)
        else:
            ops = torch.multinomial(self.choice_weights.expand(batch_size, -1), self.num_layers,
                                    replacement=False, generator=generator)
        skipped = torch.rand(shape, dtype=torch.float64, generator=generator) > self.prob
        if self.magnitude_std == float('inf'):
            magnitude = self.magnitude * torch.rand(shape, dtype=torch.float64, generator=generator)
        else:
            noise = torch.randn(shape, dtype=torch.float64, generator=generator)
            magnitude = self.magnitude + self.magnitude_std * noise
        return AugmentDraws(
            ops=ops.masked_fill(skipped, -1),
            magnitude=magnitude.clamp(0.0, self.magnitude_max),
            negate=torch.rand(shape, dtype=torch.float64, generator=generator) > 0.5,
            filters=torch.randint(len(self.filters), shape, generator=generator))

    def __call__(self, images: torch.Tensor,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """(B, 3, H, W) uint8 -> new (B, 3, H, W) uint8, on ``images``' device."""
        return self.apply(images, self.draw(images.shape[0], generator=generator))

    def apply(self, images: torch.Tensor, draws: AugmentDraws) -> torch.Tensor:
        """Apply ``draws`` to (B, 3, H, W) uint8 ``images``: a new (B, 3, H, W) uint8 tensor.

        Layer by layer (samples' ops keep their drawn order); within a layer, each kind of op
        runs once on the samples that drew it.
        """
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f'expected (B, 3, H, W) uint8, got {tuple(images.shape)}, {images.dtype}')
        out = images.clone()
        handlers = {AFFINE: self._affine, LOOKUP: self._lookup, ENHANCE: self._enhance}
        for layer in range(self.num_layers):
            ops = draws.ops[:, layer]
            args = self._arguments(ops, draws.magnitude[:, layer], draws.negate[:, layer])
            kinds = torch.where(ops >= 0, self._kinds[ops.clamp(min=0)], -1)
            for kind, handler in handlers.items():
                rows = torch.nonzero(kinds == kind).flatten()
                if len(rows):
                    index = _to_device(rows, images.device)
                    out[index] = handler(out[index], ops=ops[rows], args=args[rows],
                                         filters=draws.filters[rows, layer])
        return out

    def _arguments(self, ops, magnitude, negate):
        """(B,) op arguments, float64, from timm's formulas (0 where skipped)."""
        args = torch.zeros_like(magnitude)
        for code in ops[ops >= 0].unique().tolist():
            chosen = ops == code
            args[chosen] = LEVEL_TO_ARG[self.op_names[code]](magnitude[chosen] / LEVEL_DENOM,
                                                             negate[chosen], self.hparams)
        return args

    def _affine_matrices(self, ops, args, height, width):
        """(N, 6) float64 PIL affine data (a, b, c, d, e, f): output (x, y) -> input
        (a x + b y + c, d x + e y + f), pixel centres at half-integers, as ``Image.transform``."""
        matrices = torch.tensor([[1.0, 0.0, 0.0, 0.0, 1.0, 0.0]], dtype=torch.float64)
        matrices = matrices.repeat(len(ops), 1)
        for code in ops.unique().tolist():
            name, chosen = self.op_names[code], ops == code
            value = args[chosen]
            if name == 'Rotate':
                # Image.rotate: counter-clockwise about (w / 2, h / 2), the inverse matrix.
                angle = -torch.deg2rad(value)
                cos, sin = torch.cos(angle), torch.sin(angle)
                cx, cy = width / 2.0, height / 2.0
                matrices[chosen] = torch.stack(
                    [cos, sin, cos * -cx + sin * -cy + cx, -sin, cos, -sin * -cx + cos * -cy + cy],
                    dim=1)
            else:
                scale = {'TranslateXRel': width, 'TranslateYRel': height}.get(name, 1)
                matrices[chosen, AFFINE_COEFFICIENT[name]] = value * scale
        return matrices

    def _affine(self, images, ops, args, filters):
        """Rotate / Shear / Translate: one grid_sample per filter; PIL's fill outside the input."""
        height, width = images.shape[-2:]
        device = images.device
        m = self._affine_matrices(ops, args, height, width)
        m = _to_device(m.float(), device)[..., None, None]
        xs = torch.arange(width, device=device, dtype=torch.float32) + 0.5
        ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5)[:, None]
        x_in = m[:, 0] * xs + m[:, 1] * ys + m[:, 2]  # (N, H, W) input coordinates
        y_in = m[:, 3] * xs + m[:, 4] * ys + m[:, 5]
        # PIL's filters return the fill where the source point is outside [0, w) x [0, h) and
        # clamp the taps to the edge inside it ('border' padding).
        inside = (x_in >= 0) & (x_in < width) & (y_in >= 0) & (y_in < height)
        sampled = torch.empty(images.shape, dtype=torch.float32, device=device)
        pixels = images.float()
        for code in filters.unique().tolist():
            rows = _to_device(torch.nonzero(filters == code).flatten(), device)
            mode = self.filters[code]
            x, y = x_in[rows], y_in[rows]
            if mode == 'nearest':  # PIL takes the pixel under the point: snap to its centre
                x, y = torch.floor(x) + 0.5, torch.floor(y) + 0.5
            grid = torch.stack([x * (2.0 / width) - 1.0, y * (2.0 / height) - 1.0], dim=-1)
            sampled[rows] = F.grid_sample(pixels[rows], grid, mode=mode, padding_mode='border',
                                          align_corners=False)
        # PIL truncates (bicubic after clipping to [0, 255]).
        values = (sampled + TRUNCATION_SLACK).clamp(0, 255).floor()
        fill = _to_device(torch.tensor(self.fill, dtype=torch.float32), device).view(1, 3, 1, 1)
        return torch.where(inside[:, None], values, fill).to(torch.uint8)

    def _lookup(self, images, ops, args, filters):
        """Per-pixel-value ops: one (N, 3, 256) table per sample, one gather."""
        n, device = images.shape[0], images.device
        pixels = images.reshape(n, 3, -1)
        values = torch.arange(256, device=device).view(1, 1, 256)
        tables = values.repeat(n, 3, 1)
        for code in ops.unique().tolist():
            name = self.op_names[code].replace('Increasing', '')
            chosen = ops == code
            rows = _to_device(torch.nonzero(chosen).flatten(), device)
            arg = _to_device(args[chosen], device).view(-1, 1, 1)
            tables[rows] = LOOKUP_TABLES[name](pixels[rows], arg, values).long().expand(-1, 3, -1)
        return tables.to(torch.uint8).gather(2, pixels.long()).view_as(images)

    def _enhance(self, images, ops, args, filters):
        """ImageEnhance.Color / Sharpness: blend with the grayscale (L) or SMOOTH-filtered image."""
        factor = _to_device(args.float(), images.device).view(-1, 1, 1, 1)
        colour = torch.tensor([self.op_names[code].startswith('Color') for code in ops.tolist()])
        degenerate = torch.empty(images.shape, dtype=torch.float32, device=images.device)
        for chosen, make in ((colour, lambda x: _grayscale(x).float()), (~colour, _smooth)):
            if chosen.any():
                rows = _to_device(torch.nonzero(chosen).flatten(), images.device)
                degenerate[rows] = make(images[rows]).expand(-1, 3, -1, -1)
        return _blend(degenerate, images.float(), factor).to(torch.uint8)
