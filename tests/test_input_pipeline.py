"""Tests for input_pipeline.py: uint8 worker images (decode, crop, flips, colour), batched
normalisation and random erasing on the device, checked against the per-image timm transform."""
import io

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import ks_2samp
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.io import decode_image as torchvision_decode
from torchvision.transforms import InterpolationMode

from dataset_helpers import write_mixed_tree, write_truncated_jpeg

import datasets
import input_pipeline
from samplers import SeededDataset, SeededSampler, sample_seed, seeded_random_state

MEAN = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)
# Geometry-only training flags: no RandAugment (timm adds no colour jitter either with None).
NO_COLOUR = dict(auto_augment='none', color_jitter=None)


def photo_like(rng, width, height):
    """An (height, width, 3) uint8 array: smooth gradients and waves plus noise, like a photo."""
    y, x = np.mgrid[0:height, 0:width]
    phase = rng.uniform(0, 6, 3)
    base = np.stack([128 + 90 * np.sin(x / width * 3 + phase[0]) * np.cos(y / height * 2),
                     30 + 180 * y / height + 20 * np.sin(x / 7 + phase[1]),
                     50 + 150 * (x + y) / (width + height) + 30 * np.cos(y / 5 + phase[2])], -1)
    return np.clip(base + rng.normal(0, 10, base.shape), 0, 255).astype(np.uint8)


def as_tensor(image):
    """A PIL image -> (3, H, W) uint8 tensor, as ``build_dataset(tensor_images=True)`` yields."""
    return torch.from_numpy(np.array(image.convert('RGB'))).permute(2, 0, 1)


def to_levels(normalised):
    """Normalised float images -> the 0..255 scale, to state tolerances in levels."""
    return (normalised * STD + MEAN) * 255


class ImageList(torch.utils.data.Dataset):
    """``(transform(image), 0)`` over a list of images."""

    def __init__(self, images, transform):
        self.images = images
        self.transform = transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.transform(self.images[index]), 0


def new_pipeline(images, transform, seed, re_prob=0.0, erase_seed=0, device_augment=None):
    """The new pipeline over uint8 ``images`` in batches of 64: per-sample seeds from ``seed`` (as
    main.py draws them), the device's random erasing (and ``device_augment``'s draws) seeded by
    ``erase_seed``; (N, 3, S, S) float."""
    indices = torch.utils.data.SequentialSampler(range(len(images)))
    loader = input_pipeline.build_loader(SeededDataset(ImageList(images, transform)), 'cpu', 64,
                                         sampler=SeededSampler(indices, seed, rank=0), re_prob=re_prob,
                                         device_augment=device_augment)
    with seeded_random_state(erase_seed):
        return torch.cat([batch for batch, _ in loader])


def reference(images, transform, seed):
    """The per-image transform over PIL ``images``, with the per-sample seeds ``new_pipeline`` uses."""
    outputs = []
    for position, image in enumerate(images):
        with seeded_random_state(sample_seed(seed, 0, 0, position)):
            outputs.append(transform(image))
    return torch.stack(outputs)


@pytest.fixture(scope='module')
def sources():
    """Four photo-like PIL images of about 96x80 pixels."""
    rng = np.random.default_rng(0)
    return [Image.fromarray(photo_like(rng, 96 - 4 * k, 80 + 2 * k)) for k in range(4)]


# ---------------------------------------------------------------------------
# Decoding and resampling
# ---------------------------------------------------------------------------

def encoded(image, fmt):
    """``image`` encoded as ``fmt`` ('JPEG' or 'PNG'): bytes."""
    buffer = io.BytesIO()
    image.save(buffer, fmt, **({'quality': 90} if fmt == 'JPEG' else {}))
    return buffer.getvalue()


@pytest.mark.parametrize('fmt, mode', [('JPEG', 'RGB'), ('JPEG', 'L'), ('JPEG', 'CMYK'),
                                       ('PNG', 'RGB'), ('PNG', 'L'), ('PNG', 'RGBA'),
                                       ('PNG', 'P'), ('PNG', 'LA'), ('PNG', 'I;16')])
def test_decode_to_tensor_equals_pil(fmt, mode):
    rgb = photo_like(np.random.default_rng(1), 40, 30)
    if mode == 'I;16':
        image = Image.fromarray(rgb[..., 0].astype(np.uint16) * 257)
    elif mode in ('RGBA', 'LA'):
        image = Image.fromarray(rgb).convert(mode[:-1])
        image.putalpha(Image.fromarray(rgb[..., 1]))
    else:
        image = Image.fromarray(rgb).convert(mode)
    data = encoded(image, fmt)
    assert Image.open(io.BytesIO(data)).mode == mode
    if mode == 'I;16':  # torchvision gives 16 bits: the PIL fallback is the path under test
        assert torchvision_decode(torch.frombuffer(bytearray(data), dtype=torch.uint8)).dtype == torch.uint16
    decoded = datasets.decode_image(io.BytesIO(data), 'x.img', as_tensor=True)
    assert decoded.dtype == torch.uint8 and decoded.shape == (3, 30, 40)
    expected = np.asarray(Image.open(io.BytesIO(data)).convert('RGB'))
    np.testing.assert_array_equal(decoded.permute(1, 2, 0).numpy(), expected)


def test_truncated_jpeg_raises_dataset_error_like_pil(tmp_path):
    path = tmp_path / 'cut.jpg'
    write_truncated_jpeg(path)
    messages = []
    for as_tensor in (True, False):
        with pytest.raises(datasets.DatasetError) as info:
            datasets.decode_image(io.BytesIO(path.read_bytes()), 'cut.jpg', as_tensor=as_tensor)
        messages.append(str(info.value))
    assert messages[0].startswith('cannot decode image cut.jpg: ')
    assert messages[0] == messages[1]
    with pytest.raises(datasets.DatasetError, match=f'^cannot decode image {path}: '):
        datasets.read_image_file(str(path), as_tensor=True)


@pytest.mark.parametrize('mode, pil_filter', [(InterpolationMode.BICUBIC, Image.BICUBIC),
                                              (InterpolationMode.BILINEAR, Image.BILINEAR)])
def test_resized_crop_matches_pil(mode, pil_filter):
    rng = np.random.default_rng(2)
    # (left, top, right, bottom) boxes and (height, width) sizes: downscales and upscales.
    cases = [((10, 5, 100, 80), (48, 48)), ((0, 0, 120, 90), (40, 56)),
             ((30, 20, 60, 50), (64, 80)), ((7, 3, 27, 33), (50, 37))]
    for _ in range(3):
        array = photo_like(rng, 120, 90)
        for (left, top, right, bottom), (height, width) in cases:
            got = input_pipeline.resized_crop(torch.from_numpy(array).permute(2, 0, 1), top, left,
                                              bottom - top, right - left, (height, width), mode)
            expected = Image.fromarray(array).crop((left, top, right, bottom)).resize(
                (width, height), pil_filter)
            difference = np.abs(got.permute(1, 2, 0).numpy().astype(int) - np.asarray(expected, dtype=int))
            assert got.shape == (3, height, width)
            assert difference.max() <= 2 and difference.mean() < 0.5


# ---------------------------------------------------------------------------
# Exactness where the operations are deterministic
# ---------------------------------------------------------------------------

@pytest.mark.parametrize('width, height, size', [(81, 64, 56), (120, 90, 56), (70, 150, 48),
                                                 (40, 30, 64)])
def test_eval_path_is_exact(width, height, size):
    # Downscales, an upscale (40x30 -> 73 pixels) and the identity (int(56 / 0.875) = 64).
    image = Image.fromarray(photo_like(np.random.default_rng(3), width, height))
    transform = input_pipeline.build_worker_transform(False, size)
    worker = transform(as_tensor(image))
    assert worker.dtype == torch.uint8 and worker.shape == (3, size, size)
    got = new_pipeline([as_tensor(image)], transform, seed=0)
    expected = input_pipeline.build_transform(False, size)(image)
    torch.testing.assert_close(got[0], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(got[0], (worker / 255 - MEAN) / STD, atol=1e-5, rtol=0)


@pytest.mark.parametrize('interpolation', ['bicubic', 'bilinear'])
def test_gpu_augment_train_path_without_colour_is_exact(sources, interpolation):
    """--gpu-augment without RandAugment and erasing: random crops resized on the device (here the
    CPU), flips drawn in the workers: the reference's normalised pixels, crop for crop."""
    flags = dict(interpolation=interpolation, auto_augment='none')
    images = sources * 4
    worker, device_augment = input_pipeline.build_gpu_augment(48, **flags)
    assert device_augment.rand_augment is None
    got = new_pipeline([as_tensor(image) for image in images], worker, seed=6,
                       device_augment=device_augment)
    expected = reference(images, input_pipeline.build_transform(
        True, 48, re_prob=0.0, color_jitter=None, **flags), seed=6)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    other = reference(images, input_pipeline.build_transform(
        True, 48, re_prob=0.0, color_jitter=None, **flags), seed=7)
    assert (to_levels(got) - to_levels(other)).abs().mean() > 10


def test_train_path_without_resampling_is_exact_and_flips_like_the_reference():
    image = Image.fromarray(photo_like(np.random.default_rng(4), 48, 48))
    flags = dict(scale=(1, 1), ratio=(1, 1), hflip=0.5, **NO_COLOUR)
    images = [image] * 12
    got = new_pipeline([as_tensor(image)] * 12,
                          input_pipeline.build_worker_transform(True, 48, **flags), seed=5)
    expected = reference(images, input_pipeline.build_transform(True, 48, re_prob=0.0, **flags), seed=5)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    plain = (as_tensor(image) / 255 - MEAN) / STD
    flipped = [not torch.allclose(output, plain, atol=1e-5) for output in got]
    for output, is_flipped in zip(got, flipped):
        torch.testing.assert_close(output, plain.flip(-1) if is_flipped else plain, atol=1e-5, rtol=0)
    assert 0 < sum(flipped) < len(flipped)


@pytest.mark.parametrize('interpolation', ['bicubic', 'random'])
def test_train_path_crops_where_the_reference_crops(sources, interpolation):
    flags = dict(interpolation=interpolation, **NO_COLOUR)
    images = sources * 4
    got = new_pipeline([as_tensor(image) for image in images],
                          input_pipeline.build_worker_transform(True, 48, **flags), seed=6)
    expected = reference(images, input_pipeline.build_transform(True, 48, re_prob=0.0, **flags), seed=6)
    difference = (to_levels(got) - to_levels(expected)).abs()
    assert difference.mean() < 1.0 and difference.max() < 2.01
    # Different seeds give different crops: the agreement above is not a property of any crop.
    other = reference(images, input_pipeline.build_transform(True, 48, re_prob=0.0, **flags), seed=7)
    assert (to_levels(got) - to_levels(other)).abs().mean() > 10


@pytest.mark.parametrize('is_train', [True, False])
def test_small_inputs_keep_the_reference_pil_steps_exactly(is_train):
    # input_size <= 32: pad-and-crop (or eval's upscale) in PIL, RandAugment on; 8x8 is upscaled.
    rng = np.random.default_rng(8)
    sizes = [(40, 36), (43, 37), (8, 8)]
    images = [Image.fromarray(photo_like(rng, width, height)) for width, height in sizes] * 3
    got = new_pipeline([as_tensor(image) for image in images],
                          input_pipeline.build_worker_transform(is_train, 32), seed=9)
    transform = input_pipeline.build_transform(is_train, 32, **({'re_prob': 0.0} if is_train else {}))
    torch.testing.assert_close(got, reference(images, transform, seed=9), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------
# Statistics of the random operations
# ---------------------------------------------------------------------------

def test_augmented_batches_have_the_reference_statistics(sources):
    # Independent draws (other seeds) of 800 samples each. Over 10 seed pairs the per-channel
    # differences of the means spread by at most 0.03 (sd), those of the stds by 0.017: the
    # tolerances are about 3.5 times that. Without RandAugment the stds differ by 0.2 to 0.3.
    images = sources * 200
    got = new_pipeline([as_tensor(image) for image in images],
                          input_pipeline.build_worker_transform(True, 48), seed=10, re_prob=0.25)
    expected = reference(images, input_pipeline.build_transform(True, 48, re_prob=0.25), seed=11)
    torch.testing.assert_close(got.mean(dim=(0, 2, 3)), expected.mean(dim=(0, 2, 3)), atol=0.1, rtol=0)
    torch.testing.assert_close(got.std(dim=(0, 2, 3)), expected.std(dim=(0, 2, 3)), atol=0.06, rtol=0)


def test_gpu_augment_batches_have_the_reference_statistics(sources):
    # --gpu-augment: the workers crop, the device resizes and runs RandAugment; same tolerances.
    images = sources * 200
    worker, device_augment = input_pipeline.build_gpu_augment(48)
    got = new_pipeline([as_tensor(image) for image in images], worker, seed=10, re_prob=0.25,
                       device_augment=device_augment)
    assert got.shape == (800, 3, 48, 48) and got.dtype == torch.float32
    expected = reference(images, input_pipeline.build_transform(True, 48, re_prob=0.25), seed=11)
    torch.testing.assert_close(got.mean(dim=(0, 2, 3)), expected.mean(dim=(0, 2, 3)), atol=0.1, rtol=0)
    torch.testing.assert_close(got.std(dim=(0, 2, 3)), expected.std(dim=(0, 2, 3)), atol=0.06, rtol=0)


def test_gpu_augment_workers_crop_where_the_reference_crops(sources):
    """With the same seed the worker's crop is the reference's crop box, unresized (no flip)."""
    image = as_tensor(sources[0])
    worker, _ = input_pipeline.build_gpu_augment(48, hflip=0.0)
    crop_only = input_pipeline.build_transform(True, 48, auto_augment='none', re_prob=0.0,
                                               hflip=0.0).transforms[0]
    for seed in range(8):
        with seeded_random_state(seed):
            crop = worker(image)
        with seeded_random_state(seed):
            top, left, height, width = crop_only.get_params(sources[0], crop_only.scale, crop_only.ratio)
        assert torch.equal(crop, image[:, top:top + height, left:left + width])


def erased_fractions(erased, clean):
    """(fraction of images with a changed pixel, fraction of pixels changed) between two batches."""
    changed = (erased != clean).any(dim=1)
    return changed.flatten(1).any(dim=1).float().mean().item(), changed.float().mean().item()


def test_random_erasing_rate_on_the_device_and_in_the_reference(sources):
    images = sources * 50
    worker = input_pipeline.build_worker_transform(True, 48, **NO_COLOUR)
    tensors = [as_tensor(image) for image in images]
    erased = new_pipeline(tensors, worker, seed=12, re_prob=0.25, erase_seed=13)
    clean = new_pipeline(tensors, worker, seed=12)
    device_rates = erased_fractions(erased, clean)
    reference_rates = erased_fractions(
        reference(images, input_pipeline.build_transform(True, 48, re_prob=0.25, **NO_COLOUR), seed=12),
        reference(images, input_pipeline.build_transform(True, 48, re_prob=0.0, **NO_COLOUR), seed=12))
    for image_rate, pixel_rate in (device_rates, reference_rates):
        assert 0.15 <= image_rate <= 0.35
        # An erased image loses 2% to 33% of its area, 17.7% on average (sd 1.3% over 50 images).
        assert 0.12 * image_rate <= pixel_rate <= 0.24 * image_rate


def recorded_boxes(crop):
    """Wrap ``crop.get_params`` (a timm RandomResizedCropAndInterpolation); return its outputs' list."""
    boxes = []
    draw = crop.get_params

    def recording(*args):
        boxes.append(draw(*args))
        return boxes[-1]
    crop.get_params = recording
    return boxes


def test_crop_boxes_follow_timms_distribution(sources):
    image = sources[0]
    worker = input_pipeline.build_worker_transform(True, 48, **NO_COLOUR)
    crop_step = next(step for step in worker.transforms if isinstance(step, input_pipeline.RandomResizedCrop))
    new_boxes = recorded_boxes(crop_step.crop)
    timm_crop = input_pipeline.build_transform(True, 48, re_prob=0.0, **NO_COLOUR).transforms[0]
    timm_boxes = recorded_boxes(timm_crop)
    with seeded_random_state(20):
        outputs = [crop_step(as_tensor(image)) for _ in range(600)]
    with seeded_random_state(21):
        for _ in range(600):
            timm_crop(image)
    width, height = image.size
    assert all(output.shape == (3, 48, 48) and output.dtype == torch.uint8 for output in outputs)
    assert all(top + h <= height and left + w <= width for top, left, h, w in new_boxes)
    fractions = [[h * w / (width * height) for _, _, h, w in boxes] for boxes in (new_boxes, timm_boxes)]
    assert len(fractions[0]) == len(fractions[1]) == 600
    assert ks_2samp(*fractions).pvalue > 0.01


# ---------------------------------------------------------------------------
# Loader and datasets
# ---------------------------------------------------------------------------

def test_collate_images_stacks_either_layout_into_the_same_batch():
    """Channels-last views (the workers' images) and contiguous (3, H, W) images give the same
    (B, 3, H, W) uint8 values; targets (here numpy int32) come out int64."""
    rng = np.random.default_rng(31)
    views = [torch.from_numpy(photo_like(rng, 20, 16)).permute(2, 0, 1) for _ in range(3)]
    contiguous = [view.contiguous() for view in views]
    targets = [np.int32(1), np.int32(0), np.int32(2)]
    for images in (views, contiguous):
        batch, labels = input_pipeline.collate_images(list(zip(images, targets)))
        assert batch.dtype == torch.uint8 and torch.equal(batch, torch.stack(contiguous))
        assert labels.dtype == torch.int64 and labels.tolist() == [1, 0, 2]
    channels_last, _ = input_pipeline.collate_images(list(zip(views, targets)))
    assert channels_last.permute(0, 2, 3, 1).is_contiguous()
    _, crop_labels = input_pipeline.collate_crops(list(zip(views, targets)))  # --gpu-augment's
    assert crop_labels.dtype == torch.int64 and crop_labels.tolist() == [1, 0, 2]


def test_build_loader_end_to_end(tmp_path):
    rng = np.random.default_rng(30)
    for number in range(10):
        class_dir = tmp_path / 'train' / f'class{number % 3}'
        class_dir.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(photo_like(rng, 60 + number, 50))
        image.save(class_dir / (f'{number}.jpg' if number % 2 else f'{number}.png'))
    dataset, _ = datasets.build_dataset(True, 'IMNET', tmp_path, tensor_images=True,
                                        transform=input_pipeline.build_worker_transform(True, 36))
    runs = []
    # Workers started ahead (training does, for the validation loader): the same batches.
    for num_workers, start_workers in ((0, False), (1, False), (2, True)):
        sampler = SeededSampler(torch.utils.data.SequentialSampler(dataset), seed=3, rank=0)
        loader = input_pipeline.build_loader(SeededDataset(dataset), 'cpu', 4, sampler=sampler,
                                             num_workers=num_workers,
                                             generator=torch.Generator().manual_seed(0))
        assert len(loader) == len(loader.loader) == 3
        assert loader.batch_size == loader.loader.batch_size == 4
        assert loader.sampler is sampler is loader.loader.sampler
        if start_workers:
            loader.start_workers()
            assert all(worker.is_alive() for worker in loader.loader._iterator._workers)
        runs.append(list(loader))
    low, high = (-MEAN / STD).min().item(), ((1 - MEAN) / STD).max().item()
    for (images, targets), (images_1, targets_1), (images_2, targets_2) in zip(*runs):
        assert images.dtype == torch.float32 and images.shape[1:] == (3, 36, 36)
        assert images.is_contiguous()  # collated channels-last, made contiguous on the device
        assert targets.dtype == torch.int64 and targets.shape == images.shape[:1]
        assert low - 1e-5 <= images.min() and images.max() <= high + 1e-5
        assert torch.equal(images, images_1) and torch.equal(targets, targets_1)
        assert torch.equal(images, images_2) and torch.equal(targets, targets_2)
    assert [len(targets) for _, targets in runs[0]] == [4, 4, 2]
    assert torch.cat([targets for _, targets in runs[0]]).tolist() == dataset.targets


@pytest.mark.parametrize('data_set', ['DIGITS', 'IMNET'])
def test_tensor_images_equal_pil_images(tmp_path, data_set):
    data_path = None if data_set == 'DIGITS' else write_mixed_tree(tmp_path)
    for is_train in (True, False):
        tensors, _ = datasets.build_dataset(is_train, data_set, data_path, None, tensor_images=True)
        pil, _ = datasets.build_dataset(is_train, data_set, data_path, None)
        assert len(tensors) == len(pil) > 0
        for index in range(len(pil)):
            (tensor, label), (image, expected_label) = tensors[index], pil[index]
            assert label == expected_label and image.mode == 'RGB'
            assert tensor.dtype == torch.uint8 and tensor.shape == (3, image.height, image.width)
            np.testing.assert_array_equal(tensor.permute(1, 2, 0).numpy(), np.asarray(image))


def test_bench_prints_both_pipelines_and_their_ratio(tmp_path):
    """`python datasets.py bench --sample-photos`: the photographs written, one line per
    pipeline, and a ratio that is the quotient of the two figures; the header names the device
    the batches went to (the CPU where --device cuda has no GPU)."""
    import re
    import subprocess
    import sys

    from dataset_helpers import REPO_ROOT
    data = tmp_path / 'photos'
    result = subprocess.run(
        [sys.executable, 'datasets.py', 'bench', '--data-path', str(data), '--sample-photos',
         '--sample-copies', '2', '--input-size', '48', '--batch-size', '8', '--images', '16',
         '--rounds', '1', '--workers', '0', '--device', 'cuda'], cwd=REPO_ROOT,
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f', device {"cuda" if torch.cuda.is_available() else "cpu"}, ' in result.stdout
    assert len(list((data / 'train').glob('*/*.jpg'))) == 26
    assert len(list((data / 'val').glob('*/*.jpg'))) == 13
    rates = {name: float(value) for name, value in
             re.findall(r'(per-image|pipeline): +([\d.]+) images/s per worker', result.stdout)}
    ratio = float(re.search(r'ratio: ([\d.]+)x', result.stdout).group(1))
    assert set(rates) == {'per-image', 'pipeline'} and min(rates.values()) > 0
    assert ratio == pytest.approx(rates['pipeline'] / rates['per-image'], rel=0.02)


@pytest.mark.parametrize('flags, message', [
    (['--sample-copies', '0'], 'argument --sample-copies: 0 is not a positive integer'),
    (['--main-flags=--aa none --gpu-augment'], '--gpu-augment runs RandAugment on the device'),
])
def test_bench_errors_are_one_line(tmp_path, flags, message):
    """Bad bench flags: exit status 2 and one line naming the flag, before any photo is written."""
    import subprocess
    import sys

    from dataset_helpers import REPO_ROOT
    result = subprocess.run(
        [sys.executable, 'datasets.py', 'bench', '--data-path', str(tmp_path / 'photos'), *flags],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_sample_photos_never_go_among_a_users_images(tmp_path):
    import pipeline_bench
    from datasets import DatasetError
    data = tmp_path / 'photos'
    assert pipeline_bench.write_sample_photos(str(data), copies=1) == 13
    assert pipeline_bench.write_sample_photos(str(data), copies=1) == 13  # its own tree again
    users = tmp_path / 'mine'
    (users / 'train' / '3').mkdir(parents=True)
    (users / 'train' / '3' / 'a.png').write_bytes(b'a digit')
    with pytest.raises(DatasetError, match=f'--data-path {users} holds train/3/a.png'):
        pipeline_bench.write_sample_photos(str(users), copies=1)
    linked = tmp_path / 'linked'
    linked.mkdir()
    (linked / 'train').symlink_to(users / 'train')  # the user's folder under another name
    with pytest.raises(DatasetError, match=f'--data-path {linked} holds train/3/a.png'):
        pipeline_bench.write_sample_photos(str(linked), copies=1)
    assert sorted(str(path.relative_to(users)) for path in users.rglob('*')) == [
        'train', 'train/3', 'train/3/a.png']
