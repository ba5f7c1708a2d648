"""Tests for device_augment.py: each op against timm's PIL op, the draws and the output
distribution against timm's RandAugment, resize_crops against PIL's resize.

All on the CPU with small non-square images (40 x 48: a mix-up of height and width shows).
"""
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import timm.data.auto_augment as timm_aa  # noqa: E402
from timm.data import IMAGENET_DEFAULT_MEAN  # noqa: E402
from timm.data.transforms import str_to_pil_interp  # noqa: E402
from torchvision.transforms import InterpolationMode  # noqa: E402

import device_augment  # noqa: E402
import input_pipeline  # noqa: E402
from device_augment import (LEVEL_TO_ARG, AugmentDraws, DeviceRandAugment, pad_crops,  # noqa: E402
                            resize_crops)

HEIGHT, WIDTH = 40, 48
GEOMETRIC = ('Rotate', 'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel')
ALL_OPS = set(timm_aa._RAND_TRANSFORMS + timm_aa._RAND_INCREASING_TRANSFORMS)
COLOUR = tuple(sorted(ALL_OPS - set(GEOMETRIC)))


def make_images(count, seed=0):
    """(count, 3, 40, 48) uint8: a smooth random image plus noise (std 10 levels)."""
    g = torch.Generator().manual_seed(seed)
    smooth = F.interpolate(torch.rand(count, 3, 5, 6, generator=g) * 255, size=(HEIGHT, WIDTH),
                           mode='bicubic', align_corners=False)
    noisy = smooth + 10 * torch.randn(count, 3, HEIGHT, WIDTH, generator=g)
    return noisy.round().clamp(0, 255).to(torch.uint8)


def make_hparams(interpolation='bicubic'):
    """The hparams create_transform passes to rand_augment_transform."""
    return dict(translate_const=int(min(HEIGHT, WIDTH) * 0.45),
                img_mean=tuple(min(255, round(255 * x)) for x in IMAGENET_DEFAULT_MEAN),
                interpolation=str_to_pil_interp(interpolation))


def timm_apply(transform, images):
    """A PIL transform on each (3, H, W) uint8 image -> (B, 3, H, W) uint8."""
    outputs = [transform(input_pipeline.to_pil_image(image)) for image in images]
    return torch.stack([input_pipeline.to_image_tensor(output) for output in outputs])


def single_op_draws(augment, name, magnitude, negate, batch):
    """Draws where every sample does only ``name`` (first layer) at a fixed magnitude and sign."""
    ops = torch.full((batch, augment.num_layers), -1)
    ops[:, 0] = augment.op_names.index(name)
    shape = ops.shape
    return AugmentDraws(ops=ops, magnitude=torch.full(shape, magnitude, dtype=torch.float64),
                        negate=torch.full(shape, negate),
                        filters=torch.zeros(shape, dtype=torch.int64))


def fix_sign(monkeypatch, negate):
    """Make timm's random sign of signed ops deterministic."""
    monkeypatch.setattr(timm_aa, '_randomly_negate', (lambda v: -v) if negate else (lambda v: v))


@pytest.mark.parametrize('name', sorted(LEVEL_TO_ARG))
def test_level_to_arg_is_timms(monkeypatch, name):
    """Magnitude -> op argument: timm's formulas, bit for bit, both signs."""
    hparams = make_hparams()
    for negate in (False, True):
        fix_sign(monkeypatch, negate)
        for magnitude in (0.0, 0.3, 2.5, 4.99, 5.0, 7.3, 9.0, 9.99, 10.0):
            level = torch.tensor([magnitude], dtype=torch.float64) / 10.0
            ours = LEVEL_TO_ARG[name](level, torch.tensor([negate]), hparams).item()
            timm_level = timm_aa.LEVEL_TO_ARG[name]
            theirs = timm_level(magnitude, hparams)[0] if timm_level else 0.0
            assert ours == theirs, (name, magnitude, negate)


@pytest.mark.parametrize('name', COLOUR)
def test_colour_op_is_pils(monkeypatch, name):
    """Lookup-table ops, Color and Sharpness reproduce PIL's pixels (PIL's arithmetic redone;
    a Pillow build that fuses multiply-adds could round a blend differently: 1 level allowed)."""
    config = 'rand-m9-inc1' if name in timm_aa._RAND_INCREASING_TRANSFORMS else 'rand-m9'
    augment = DeviceRandAugment(config, make_hparams())
    images = make_images(4)
    for negate in (False, True):
        fix_sign(monkeypatch, negate)
        for magnitude in (0.0, 2.5, 9.0, 10.0):
            reference = timm_aa.AugmentOp(name, prob=1.0, magnitude=magnitude,
                                          hparams=make_hparams())
            ours = augment.apply(images, single_op_draws(augment, name, magnitude, negate, 4))
            difference = (ours.int() - timm_apply(reference, images).int()).abs()
            assert difference.max() <= 1, (name, magnitude, negate)
            assert (difference > 0).float().mean() < 0.01, (name, magnitude, negate)


@pytest.mark.parametrize('interpolation,mean_tolerance,max_tolerance',
                         [('bicubic', 1.0, 8), ('bilinear', 0.1, 1), ('nearest', 0.01, 255)])
@pytest.mark.parametrize('name', GEOMETRIC)
def test_geometric_op_is_close_to_pils(monkeypatch, name, interpolation, mean_tolerance,
                                       max_tolerance):
    """Rotate / Shear / Translate: PIL's geometry and fill. Bilinear differs by PIL's double vs
    float32 rounding before truncation; bicubic also by the kernel (torch a = -0.75, PIL's
    transform a = -1); nearest only at exact ties (a whole pixel, hence no max bound)."""
    augment = DeviceRandAugment('rand-m9-inc1', make_hparams(interpolation))
    images = make_images(4)
    for negate in (False, True):
        fix_sign(monkeypatch, negate)
        for magnitude in (0.0, 2.5, 9.0, 10.0):
            reference = timm_aa.AugmentOp(name, prob=1.0, magnitude=magnitude,
                                          hparams=make_hparams(interpolation))
            ours = augment.apply(images, single_op_draws(augment, name, magnitude, negate, 4))
            difference = (ours.int() - timm_apply(reference, images).int()).abs()[..., 2:-2, 2:-2]
            assert difference.float().mean() < mean_tolerance, (name, magnitude, negate)
            assert difference.max() <= max_tolerance, (name, magnitude, negate)


@pytest.mark.parametrize('interpolation', ['bicubic', 'bilinear'])
def test_zero_magnitude_geometry_is_identity(interpolation):
    """PIL returns the image unchanged for a zero rotation, shear or translation; so must the
    float32 grid on a full-size image (the truncation slack)."""
    augment = DeviceRandAugment('rand-m9-inc1', make_hparams(interpolation))
    images = torch.randint(0, 256, (2, 3, 224, 200), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(4))
    for name in GEOMETRIC:
        draws = single_op_draws(augment, name, 0.0, True, 2)
        assert torch.equal(augment.apply(images, draws), images)


def test_layers_apply_in_drawn_order(monkeypatch):
    """Per sample, the ops run in the drawn order: (Rotate, Contrast) and (Contrast, Rotate) in
    one batch each match timm's composition in that order (Contrast's mean sees the fill)."""
    hparams = make_hparams('bilinear')
    augment = DeviceRandAugment('rand-m9-inc1', hparams)
    rotate, contrast = (augment.op_names.index(name) for name in ('Rotate', 'ContrastIncreasing'))
    images = make_images(2, seed=3)
    draws = AugmentDraws(ops=torch.tensor([[rotate, contrast], [contrast, rotate]]),
                         magnitude=torch.full((2, 2), 10.0, dtype=torch.float64),
                         negate=torch.tensor([[False, True], [True, False]]),
                         filters=torch.zeros((2, 2), dtype=torch.int64))
    ours = augment.apply(images, draws)
    rotate_fn = timm_aa.AugmentOp('Rotate', prob=1.0, magnitude=10.0, hparams=hparams)
    contrast_fn = timm_aa.AugmentOp('ContrastIncreasing', prob=1.0, magnitude=10.0, hparams=hparams)
    # Rotate +30 degrees, contrast factor 1 - 0.9 (negated), as in ``draws``.
    monkeypatch.setattr(timm_aa, '_randomly_negate', lambda v: -v if v < 5 else v)
    first = timm_apply(lambda image: contrast_fn(rotate_fn(image)), images[:1])
    second = timm_apply(lambda image: rotate_fn(contrast_fn(image)), images[1:])
    for output, reference in ((ours[:1], first), (ours[1:], second)):
        assert (output.int() - reference.int()).abs().max() <= 1
    assert (timm_apply(lambda image: rotate_fn(contrast_fn(image)), images[:1]) != first).any()


def summarise(outputs, inputs):
    """(per-channel mean (3,), per-channel std (3,), fraction of samples left unchanged)."""
    values = outputs.double().transpose(0, 1).reshape(3, -1)
    unchanged = (outputs == inputs).flatten(1).all(1).double().mean()
    return values.mean(1), values.std(1), unchanged


def test_output_distribution_matches_timm():
    """Over 3 seeds x 300 samples, DeviceRandAugment's per-channel mean and std and its share of
    unchanged samples agree with timm's RandAugment within 4 seed-to-seed standard errors (plus
    half a level for the bicubic kernel's small bias). Seeds are fixed: deterministic."""
    hparams = make_hparams()
    augment = DeviceRandAugment('rand-m9-mstd0.5-inc1', hparams)
    reference = timm_aa.rand_augment_transform('rand-m9-mstd0.5-inc1', dict(hparams))
    inputs = make_images(12, seed=1).repeat(25, 1, 1, 1)
    ours, theirs = [], []
    for seed in range(3):
        random.seed(seed)
        np.random.seed(seed)
        theirs.append(summarise(timm_apply(reference, inputs), inputs))
        generator = torch.Generator().manual_seed(seed)
        ours.append(summarise(augment(inputs, generator=generator), inputs))
    for stat in range(3):
        our_runs = torch.stack([torch.as_tensor(run[stat]) for run in ours])
        their_runs = torch.stack([torch.as_tensor(run[stat]) for run in theirs])
        deviations = torch.cat([our_runs - our_runs.mean(0), their_runs - their_runs.mean(0)])
        spread = deviations.pow(2).sum(0).div(4).sqrt()  # pooled seed-to-seed std, 4 dof
        standard_error = spread * (2 / 3) ** 0.5  # of the difference of two 3-run means
        allowance = 0.5 if stat < 2 else 0.0
        difference = (our_runs.mean(0) - their_runs.mean(0)).abs()
        assert (difference <= 4 * standard_error + allowance).all(), (stat, difference,
                                                                      standard_error)
    # Both layers skipped (0.25), or ops that happen to leave the image as it is.
    assert 0.2 < ours[0][2] < 0.35


def test_draws_follow_timms_distributions():
    """Op choice uniform with replacement, prob, magnitude N(9, 0.5) clipped to [0, 10], sign;
    weighted choice without replacement and mstd > 100 as uniform(0, m)."""
    augment = DeviceRandAugment('rand-m9-mstd0.5-inc1', make_hparams())
    draws = augment.draw(40000, generator=torch.Generator().manual_seed(0))
    applied = draws.ops >= 0
    assert abs(applied.double().mean() - 0.5) < 0.01
    counts = torch.bincount(draws.ops[applied], minlength=len(augment.op_names)).double()
    expected = applied.sum() / len(augment.op_names)
    assert ((counts - expected).abs() < 5 * expected.sqrt()).all()
    clipped = np.clip(np.random.default_rng(0).normal(9.0, 0.5, 400000), 0, 10)
    assert abs(draws.magnitude.mean() - clipped.mean()) < 0.01
    assert abs(draws.magnitude.std() - clipped.std()) < 0.01
    assert draws.magnitude.max() <= 10.0
    assert abs(draws.negate.double().mean() - 0.5) < 0.01

    weighted = DeviceRandAugment('rand-m8-n3-p1.0-mstd101-tweights', make_hparams())
    draws = weighted.draw(20000, generator=torch.Generator().manual_seed(1))
    assert all(len(set(row)) == 3 for row in draws.ops.tolist())  # no repeats, none skipped
    first = torch.bincount(draws.ops[:, 0], minlength=len(weighted.op_names)).double()
    expected = 20000 * weighted.choice_weights
    assert ((first - expected).abs() < 5 * expected.sqrt() + 1).all()
    assert abs(draws.magnitude.mean() - 4.0) < 0.05  # uniform(0, 8)
    assert abs(draws.magnitude.std() - 8 / 12 ** 0.5) < 0.05


def test_parses_config_as_timm():
    """Settings come from timm's own parsing; the hparams dict is not modified."""
    hparams = make_hparams('bilinear')
    before = dict(hparams)
    augment = DeviceRandAugment('rand-m7-n3-p0.3-mstd1.5-mmax12', hparams)
    assert hparams == before
    assert augment.op_names == tuple(timm_aa._RAND_TRANSFORMS)
    assert (augment.num_layers, augment.prob, augment.magnitude) == (3, 0.3, 7.0)
    assert (augment.magnitude_std, augment.magnitude_max) == (1.5, 12)
    assert augment.filters == ('bilinear',) and augment.fill == hparams['img_mean']
    assert DeviceRandAugment('rand-m9').filters == ('bilinear', 'bicubic')  # timm's random filter
    with pytest.raises(ValueError, match='GaussianBlur'):
        DeviceRandAugment('rand-m9-t3a')


PIL_RESAMPLE = {InterpolationMode.BICUBIC: Image.BICUBIC, InterpolationMode.BILINEAR: Image.BILINEAR,
                InterpolationMode.NEAREST: Image.NEAREST}


def pil_resize(crop, size, pil_filter):
    """(3, h, w) uint8 -> (3, size[0], size[1]) uint8, resized by PIL."""
    image = Image.fromarray(crop.permute(1, 2, 0).numpy()).resize(size[::-1], pil_filter)
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


@pytest.mark.parametrize('interpolation', list(PIL_RESAMPLE))
def test_resize_crops_is_pils_resize(interpolation):
    """Each crop resized exactly as PIL resizes it alone: downscales, upscales, one-pixel crops,
    sizes that are not square, one filter for all crops or one per crop."""
    image = make_images(1, seed=5)[0]
    boxes = [(0, 0, 40, 48), (3, 5, 17, 30), (10, 2, 25, 9), (7, 20, 3, 4), (0, 0, 30, 48),
             (12, 12, 1, 1), (5, 0, 1, 48)]
    crops = [image[:, top:top + h, left:left + w] for top, left, h, w in boxes]
    for size in ((24, 24), (20, 37), (64, 5)):
        expected = torch.stack([pil_resize(crop, size, PIL_RESAMPLE[interpolation])
                                for crop in crops])
        padded, sizes = pad_crops(crops)
        assert torch.equal(resize_crops(padded, sizes, size, interpolation=interpolation), expected)
        per_crop = [interpolation.value] * len(crops)
        assert torch.equal(resize_crops(padded, sizes, size, interpolation=per_crop), expected)
    with pytest.raises(ValueError):
        resize_crops(*pad_crops(crops), 24, interpolation='lanczos')


def test_resize_crops_over_several_chunks_with_mixed_filters(monkeypatch):
    """More crops than a chunk (chunks of 4 here), from one pixel to the whole image, each with
    its own filter: every crop is PIL's resize of it, whatever chunk it was sorted into."""
    monkeypatch.setattr(device_augment, 'RESIZE_CHUNK', 4)
    rng = random.Random(3)
    image = make_images(1, seed=6)[0]
    filters = list(PIL_RESAMPLE)
    crops, modes = [], []
    for index in range(11):
        height, width = rng.randint(1, HEIGHT), rng.randint(1, WIDTH)
        top, left = rng.randint(0, HEIGHT - height), rng.randint(0, WIDTH - width)
        crops.append(image[:, top:top + height, left:left + width])
        modes.append(filters[index % len(filters)])
    crops.append(image)
    modes.append(InterpolationMode.BICUBIC)
    got = resize_crops(*pad_crops(crops), (20, 26), interpolation=modes)
    expected = torch.stack([pil_resize(crop, (20, 26), PIL_RESAMPLE[mode])
                            for crop, mode in zip(crops, modes)])
    assert torch.equal(got, expected)


def test_pil_coefficients_are_pils_fixed_point_weights():
    """Rows of PIL's coefficients sum to 2^22 (up to PIL's per-tap rounding), start where the
    filter's support starts, and an unscaled line is the identity."""
    lengths = torch.tensor([5, 48, 225, 500])
    first, coefficients = device_augment.pil_coefficients(lengths, 224, InterpolationMode.BICUBIC)
    assert first.shape == (4, 224) and coefficients.shape[:2] == (4, 224)
    sums = coefficients.sum(-1)
    taps = coefficients.shape[-1]
    assert (sums - 2 ** 22).abs().max() <= taps // 2 + 1
    identity_first, identity = device_augment.pil_coefficients(torch.tensor([30]), 30,
                                                               InterpolationMode.BICUBIC)
    centre = (identity == 2 ** 22).nonzero()[:, 1:]
    assert torch.equal(identity_first[0] + centre[:, 1], torch.arange(30))
    assert (identity != 0).sum() == 30


def test_shapes_dtype_device_and_no_in_place():
    """(B, 3, H, W) uint8 in, same shape, dtype and device out; the input is left alone; the
    same generator seed gives the same output; channels-last input gives the same pixels."""
    augment = DeviceRandAugment('rand-m9-mstd0.5-inc1', make_hparams())
    images = make_images(64, seed=2)
    original = images.clone()
    output = augment(images, generator=torch.Generator().manual_seed(7))
    assert output.shape == images.shape and output.dtype == torch.uint8
    assert output.device == images.device and output.data_ptr() != images.data_ptr()
    assert torch.equal(images, original)
    assert not torch.equal(output, images)
    again = augment(images.contiguous(memory_format=torch.channels_last),
                    generator=torch.Generator().manual_seed(7))
    assert torch.equal(again, output)
    with pytest.raises(ValueError):
        augment(images.float())
