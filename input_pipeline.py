"""The training and evaluation input pipeline: uint8 images from the workers, the rest on the device.

A training loader worker does only the per-image work: decode (``datasets.decode_image`` with
``as_tensor``), the random resized crop, the flips and the colour augmentation (RandAugment or
colour jitter, timm's PIL implementations), and hands over a (3, H, W) uint8 tensor;
``collate_images`` stacks them without a float copy, and ``DeviceLoader`` moves each batch to the
device, where normalisation and random erasing run batched. The per-image timm transform
(``build_transform``, normalised float32 images per worker) is the reference: with the same
random draws the training images are its pixels up to the resize of the crop (torch's kernel,
within 2 levels, see ``resized_crop``); the evaluation images (PIL's resize) are its pixels, and
so are those of the device path without RandAugment and random erasing (PIL's resize on the
device, ``device_augment.resize_crops``; ``build_gpu_augment(auto_augment='none')``, a library
form: main.py's ``--gpu-augment`` is for offloading RandAugment and requires its policy).

``python datasets.py bench`` (``pipeline_bench.py``) measures this pipeline against the reference.
"""
import random
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from device_augment import DeviceRandAugment, pad_crops, resize_crops

# DeiT's eval resize: the crop keeps 87.5% of the resized side (256 -> 224).
EVAL_CROP_FRACTION = 0.875
# DeiT treats inputs of at most this size as CIFAR-like: pad-and-crop instead of resized crops.
SMALL_INPUT_MAX = 32
SMALL_INPUT_CROP_PADDING = 4

# --train-interpolation's values ('random': bilinear or bicubic): RandAugment's geometric ops
# (PIL's affine transforms) take no other filter, and --gpu-augment resizes with each of these.
TRAIN_INTERPOLATIONS = ('bicubic', 'bilinear', 'nearest', 'random')
# The filters torch resamples as PIL does (antialiased); the others (nearest, which torch and PIL
# round differently, lanczos, hamming, box) are left to PIL.
TORCH_FILTERS = {InterpolationMode.BICUBIC: 'bicubic', InterpolationMode.BILINEAR: 'bilinear'}


class ResizeIfSmaller:
    """Upscale an image whose shorter side is below ``size`` so that it equals ``size``.

    DeiT's pipeline for inputs of at most 32 pixels assumes the images are already that large
    (CIFAR); smaller images (e.g. the 8x8 digits) would make RandomCrop fail and CenterCrop pad
    with black. Images at least ``size`` pixels are returned unchanged, so CIFAR is unaffected.
    """

    def __init__(self, size, interpolation=InterpolationMode.BICUBIC):
        self.size = size
        self.interpolation = interpolation

    def __call__(self, image):
        """Return ``image``, upscaled if its shorter side is below ``size``."""
        if min(image.size) >= self.size:
            return image
        return transforms.functional.resize(image, self.size, interpolation=self.interpolation)

    def __repr__(self):
        return f'{self.__class__.__name__}(size={self.size}, interpolation={self.interpolation.value})'


def _small_input_steps(is_train, input_size):
    """DeiT's geometry for inputs of at most 32 pixels (PIL): upscale smaller images, then a
    4-pixel padded random crop (train) or a center crop (eval)."""
    crop = (transforms.RandomCrop(input_size, padding=SMALL_INPUT_CROP_PADDING) if is_train
            else transforms.CenterCrop(input_size))
    return [ResizeIfSmaller(input_size), crop]


def _eval_steps(input_size):
    """DeiT's evaluation geometry (PIL): the shorter side resized to ``input_size / 0.875``
    (bicubic), then the centre crop; for inputs of at most 32 pixels ``_small_input_steps``."""
    if input_size <= SMALL_INPUT_MAX:
        return _small_input_steps(False, input_size)
    return [transforms.Resize(int(input_size / EVAL_CROP_FRACTION),
                              interpolation=InterpolationMode.BICUBIC),
            transforms.CenterCrop(input_size)]


def _timm_train_steps(input_size, color_jitter, auto_augment, interpolation, scale, ratio,
                      hflip, vflip, re_prob=0.0, re_mode='pixel', re_count=1, use_prefetcher=True):
    """timm's training transform in its three parts, as lists: (crop and flips, colour
    augmentation, final steps: ToTensor, Normalize, RandomErasing; nothing with
    ``use_prefetcher``). For ``input_size <= 32`` the crop is DeiT's (``_small_input_steps``)."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform

    if auto_augment in ('', 'none'):
        auto_augment = None
    parts = create_transform(
        input_size=input_size, is_training=True, color_jitter=color_jitter,
        auto_augment=auto_augment, interpolation=interpolation, re_prob=re_prob,
        re_mode=re_mode, re_count=re_count, scale=scale, ratio=ratio, hflip=hflip, vflip=vflip,
        mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, separate=True,
        use_prefetcher=use_prefetcher)
    crop_and_flips, colour, final = (part.transforms for part in parts)
    if input_size <= SMALL_INPUT_MAX:
        crop_and_flips[0:1] = _small_input_steps(True, input_size)
    return crop_and_flips, colour, final if not use_prefetcher else []


def build_transform(is_train, input_size, color_jitter=0.4, auto_augment='rand-m9-mstd0.5-inc1',
                    interpolation='bicubic', re_prob=0.25, re_mode='pixel', re_count=1,
                    scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5, vflip=0.0):
    """Build DeiT's train or eval transform for square inputs of ``input_size`` pixels.

    Training uses timm's ``create_transform`` (random resized crop, flips, RandAugment, random
    erasing); for ``input_size <= 32`` the resized crop becomes a 4-pixel padded random crop as
    in DeiT. Evaluation resizes to ``input_size / 0.875`` (only above 32 pixels), center-crops,
    and normalises with the ImageNet mean and std. ``auto_augment`` of None, '' or 'none'
    disables RandAugment. Images smaller than a small ``input_size`` are upscaled first.
    """
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    if is_train:
        crop_and_flips, colour, final = _timm_train_steps(
            input_size, color_jitter, auto_augment, interpolation, scale, ratio, hflip, vflip,
            re_prob=re_prob, re_mode=re_mode, re_count=re_count, use_prefetcher=False)
        return transforms.Compose(crop_and_flips + colour + final)
    return transforms.Compose(_eval_steps(input_size) + [
        transforms.ToTensor(), transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])


def to_image_tensor(image) -> torch.Tensor:
    """A PIL image, an (H, W, 3) uint8 array or a (3, H, W) uint8 tensor -> (3, H, W) uint8 tensor.

    The PIL and array cases return a channels-last view (no copy beyond NumPy's), which is the
    layout the resize kernels and ``collate_images`` read fastest.
    """
    if isinstance(image, torch.Tensor):
        return image
    if isinstance(image, Image.Image) and image.mode != 'RGB':
        image = image.convert('RGB')  # only when needed: convert() copies even an RGB image
    array = np.array(image, dtype=np.uint8)
    return torch.from_numpy(array).permute(2, 0, 1)


def to_pil_image(image) -> Image.Image:
    """A (3, H, W) uint8 tensor (or a PIL image, returned as it is) -> RGB PIL image."""
    if isinstance(image, Image.Image):
        return image
    return Image.fromarray(image.permute(1, 2, 0).contiguous().numpy())


def resized_crop(image: torch.Tensor, top: int, left: int, height: int, width: int,
                 size, interpolation: InterpolationMode) -> torch.Tensor:
    """Crop ``image`` (3, H, W) uint8 and resize the crop to ``size`` (h, w): (3, h, w) uint8.

    For bicubic and bilinear, torch's antialiased uint8 resampling is Pillow-SIMD's algorithm
    (PIL's filters, bicubic with a = -0.5, in 16-bit instead of PIL's 22-bit fixed point): a
    pixel differs from PIL's by at most 2 of 255 levels, in a quarter to a third of PIL's time.
    Other filters are PIL's own.
    """
    region = image[:, top:top + height, left:left + width]
    if interpolation not in TORCH_FILTERS:
        resized = transforms.functional.resize(to_pil_image(region), list(size), interpolation)
        return to_image_tensor(resized)
    # Channels-last input: the uint8 kernels then write the output without a layout copy.
    region = region.unsqueeze(0).contiguous(memory_format=torch.channels_last)
    return F.interpolate(region, size=tuple(size), mode=TORCH_FILTERS[interpolation],
                         antialias=True)[0]


class RandomResizedCrop:
    """timm's ``RandomResizedCropAndInterpolation`` on (3, H, W) uint8 tensors.

    The crop and filter are drawn exactly as timm draws them (same generator, same order), so a
    seeded run crops where the per-image transform crops; only the resampling is ``resized_crop``'s.
    """

    def __init__(self, crop):
        self.crop = crop

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        top, left, height, width = self.crop.get_params(image, self.crop.scale, self.crop.ratio)
        interpolation = self.crop.interpolation
        if isinstance(interpolation, (tuple, list)):
            interpolation = random.choice(interpolation)
        return resized_crop(image, top, left, height, width, self.crop.size, interpolation)

    def __repr__(self):
        return f'{self.__class__.__name__}({self.crop!r})'


class RandomCropBox:
    """timm's random resized crop without the resize (``--gpu-augment``): the box drawn as timm
    draws it, (3, H, W) uint8 -> (3, h, w) uint8, a copy (a view would ship the whole image to
    the main process). The filter, when timm draws one, is drawn on the device side."""

    def __init__(self, crop):
        self.crop = crop

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        top, left, height, width = self.crop.get_params(image, self.crop.scale, self.crop.ratio)
        return image[:, top:top + height, left:left + width].contiguous()

    def __repr__(self):
        return f'{self.__class__.__name__}(scale={self.crop.scale}, ratio={self.crop.ratio})'


class ToImageTensor:
    """Transform step: any image -> (3, H, W) uint8 tensor (``to_image_tensor``)."""

    def __call__(self, image):
        return to_image_tensor(image)

    def __repr__(self):
        return f'{self.__class__.__name__}()'


class ToPILImage:
    """Transform step: (3, H, W) uint8 tensor -> PIL image, for timm's PIL colour augmentations."""

    def __call__(self, image):
        return to_pil_image(image)

    def __repr__(self):
        return f'{self.__class__.__name__}()'


def build_worker_transform(is_train, input_size, color_jitter=0.4,
                           auto_augment='rand-m9-mstd0.5-inc1', interpolation='bicubic',
                           scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5, vflip=0.0):
    """The per-image part of the pipeline: image (PIL or (3, H, W) uint8) -> (3, S, S) uint8.

    The same steps, flags and random draws as ``build_transform`` without its last
    three (``ToTensor``, ``Normalize``, ``RandomErasing``), which ``DeviceLoader`` runs batched.
    Small inputs (``input_size <= 32``) keep the reference's PIL steps: their images are tiny.
    """
    if not is_train:
        # PIL's resize, as the reference: evaluation gives the per-image transform's pixels (the
        # accuracy a paper reports), at a cost that matters little outside training.
        return transforms.Compose([ToPILImage(), *_eval_steps(input_size), ToImageTensor()])
    crop_and_flips, colour, _ = _timm_train_steps(input_size, color_jitter, auto_augment,
                                                  interpolation, scale, ratio, hflip, vflip)
    if input_size <= SMALL_INPUT_MAX:  # the reference's PIL steps: the images are tiny
        steps = [ToPILImage(), *crop_and_flips]
    else:
        steps = [ToImageTensor(), RandomResizedCrop(crop_and_flips[0]), *crop_and_flips[1:]]
        if colour:
            steps.append(ToPILImage())
    return transforms.Compose(steps + colour + [ToImageTensor()])


class DeviceAugment:
    """``--gpu-augment``'s device half: the crops of a batch resized to ``size`` as PIL resizes
    them (each with timm's filter, drawn per sample when timm draws one) and timm's RandAugment
    (none if ``rand_augment`` is None), batched but drawn per sample (``device_augment.py``); the
    crops of ``collate_crops`` -> (B, 3, S, S) uint8."""

    def __init__(self, crop, rand_augment=None):
        self.size = crop.size
        self.filters = crop.interpolation
        self.rand_augment = (None if rand_augment is None
                             else DeviceRandAugment.from_timm(rand_augment))

    def __call__(self, padded_crops):
        """``(padded, sizes)`` of ``collate_crops``, ``padded`` on the device -> (B, 3, S, S) uint8."""
        padded, sizes = padded_crops
        filters = self.filters
        if isinstance(filters, (tuple, list)):
            filters = [random.choice(filters) for _ in range(len(padded))]
        resized = resize_crops(padded, sizes, self.size, interpolation=filters)
        return resized if self.rand_augment is None else self.rand_augment(resized)


def build_gpu_augment(input_size, auto_augment='rand-m9-mstd0.5-inc1', interpolation='bicubic',
                      scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5, vflip=0.0):
    """``--gpu-augment``: (worker transform: image -> its (3, h, w) uint8 crop, flipped,
    ``DeviceAugment``). Needs an input above 32 pixels and a RandAugment ('rand-...') policy, or
    ``auto_augment='none'`` (the device then only resizes)."""
    crop_and_flips, colour, _ = _timm_train_steps(input_size, None, auto_augment, interpolation,
                                                  scale, ratio, hflip, vflip)
    worker = transforms.Compose([ToImageTensor(), RandomCropBox(crop_and_flips[0]),
                                 *crop_and_flips[1:]])
    return worker, DeviceAugment(crop_and_flips[0], colour[0] if colour else None)


def collate_images(batch):
    """The workers' collate: ``(image (3, S, S) uint8, target)`` pairs -> ((B, 3, S, S) uint8,
    (B,) int64). The images are channels-last views (the resize's output, PIL's arrays) and are
    stacked as they lie (torch's ``default_collate``: in a worker straight into shared memory)
    into a channels-last batch; timm's ``fast_collate`` adds them one by one into a contiguous
    batch, eight times slower at 224 pixels. ``DeviceLoader`` makes the batch contiguous when it
    converts it to float on the device."""
    images = [image for image, _ in batch]
    if not images[0].permute(1, 2, 0).is_contiguous():  # (3, H, W) images laid out as such
        return torch.utils.data.default_collate(images), _collate_targets(batch)
    pixels = torch.utils.data.default_collate([image.permute(1, 2, 0) for image in images])
    return pixels.permute(0, 3, 1, 2), _collate_targets(batch)


def _collate_targets(batch) -> torch.Tensor:
    """The targets of ``(image, target)`` pairs: (B,) int64, whatever integer type they have
    (the losses and Mixup index with them)."""
    return torch.as_tensor([target for _, target in batch], dtype=torch.int64)


def collate_crops(batch):
    """``--gpu-augment``'s collate: ((the crops zero-padded into one (B, 3, max h, max w) uint8
    tensor, their (B, 2) heights and widths), targets (B,) int64). One tensor: one shared-memory
    segment to the main process, one copy to the device, one batched resize there."""
    return pad_crops([image for image, _ in batch]), _collate_targets(batch)


def normalization(mean, std, device) -> tuple:
    """The normalisation of uint8 images as a (1, 3, 1, 1) float32 shift ``255 mean`` and scale
    ``1 / (255 std)`` on ``device``, for ``normalize_uint8``. A product, not a quotient:
    dividing by a broadcast tensor is six times slower on the CPU, and the two differ by a
    rounding (< 3e-7)."""
    shift = torch.tensor([255 * value for value in mean], device=device).view(1, -1, 1, 1)
    scale = torch.tensor([1 / (255 * value) for value in std], device=device).view(1, -1, 1, 1)
    return shift, scale


def normalize_uint8(images: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor
                    ) -> torch.Tensor:
    """(B, 3, H, W) uint8 -> a new contiguous (B, 3, H, W) float32 ``(x - shift) * scale``
    (``normalization``'s tensors): the model's input, in the loaders and the visualisation."""
    # One pass converts and makes the batch contiguous (collate_images stacks channels-last).
    images = images.to(torch.float32, memory_format=torch.contiguous_format)
    return images.sub_(shift).mul_(scale)


class DeviceLoader:
    """A loader of uint8 batches seen as one of normalised float32 batches on ``device``.

    Each batch is normalised (``(x - 255 mean) / (255 std)``) and, with ``re_prob`` > 0,
    randomly erased there (timm's ``RandomErasing``, drawn per sample as in the per-image
    transform). On CUDA the next batch is copied on a side stream while the current one trains.
    Unlike timm's ``PrefetchLoader``, which also erases one batch ahead, the erasing draws
    happen when a batch is handed out, in the order of the training step's own draws (Mixup),
    so that a run resumed after step k draws what an uninterrupted one draws.
    """

    def __init__(self, loader: torch.utils.data.DataLoader, device: torch.device,
                 re_prob: float = 0.0, re_mode: str = 'pixel', re_count: int = 1,
                 device_augment: Optional[DeviceAugment] = None):
        from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
        from timm.data.random_erasing import RandomErasing

        self.loader = loader
        self.device = torch.device(device)
        self.shift, self.scale = normalization(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD,
                                               self.device)
        self.random_erasing = (RandomErasing(probability=re_prob, mode=re_mode, max_count=re_count,
                                             device=self.device) if re_prob > 0 else None)
        self.device_augment = device_augment
        self.copy_stream = None

    def __iter__(self):
        """Yields ``(images (B, 3, S, S) float32 normalised, targets (B,))`` on the device."""
        if self.device.type == 'cuda' and self.copy_stream is None:
            # One stream for the loader's life: the allocator pools blocks per stream.
            self.copy_stream = torch.cuda.Stream(device=self.device)
        staged = None
        for images, targets in self.loader:
            next_staged = self._copy(images, targets)
            if staged is not None:
                yield self._finish(*staged)
            staged = next_staged
        if staged is not None:
            yield self._finish(*staged)

    def _copy(self, images, targets: torch.Tensor):
        """``images``: a (B, 3, S, S) uint8 batch, or with ``device_augment`` padded crops.
        Returns the device copies and the event that marks their arrival (None off CUDA)."""
        if self.copy_stream is None:
            return self._to_device(images), self._to_device(targets), None
        # Blocks the training step just freed may be handed out below: the copy must not
        # overwrite them before the step's queued kernels have read them.
        self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.copy_stream):
            copies = self._to_device(images), self._to_device(targets)
            # An event per batch: waiting on the stream would also wait for the copy of the
            # batch after it, queued behind the step this one is for.
            arrived = torch.cuda.Event()
            arrived.record(self.copy_stream)
        return (*copies, arrived)

    def _to_device(self, tensors):
        if isinstance(tensors, tuple):  # collate_crops' (padded, sizes): the sizes stay here
            padded, sizes = tensors
            return padded.to(self.device, non_blocking=True), sizes
        return tensors.to(self.device, non_blocking=True)

    def _finish(self, images, targets: torch.Tensor, arrived: Optional[torch.cuda.Event]):
        if arrived is not None:
            torch.cuda.current_stream(self.device).wait_event(arrived)
        if self.device_augment is not None:
            images = self.device_augment(images)
        images = normalize_uint8(images, self.shift, self.scale)
        if self.random_erasing is not None:
            images = self.random_erasing(images)
        return images, targets

    def __len__(self):
        return len(self.loader)

    def start_workers(self) -> None:
        """Forks the loader's persistent workers now rather than at its first pass.

        A fork while another thread takes the GIL from outside Python (gloo's threads, as DDP's
        gradient all-reduces finish) can leave the child deadlocked on a CPython without the fix
        of gh-112275 (3.11.7 among them): a validation loader forked at the first evaluation,
        right after a training epoch, then waits for that worker forever. What this first pass
        reads ahead, the next one discards.
        """
        if self.loader.num_workers > 0:
            iter(self.loader)

    @property
    def batch_size(self):
        """The wrapped DataLoader's, as the training loop reads it."""
        return self.loader.batch_size

    @property
    def sampler(self):
        """The wrapped DataLoader's (``set_epoch`` goes to it)."""
        return self.loader.sampler

    @property
    def dataset(self):
        """The wrapped DataLoader's."""
        return self.loader.dataset


def build_loader(dataset, device, batch_size: int, sampler=None, drop_last: bool = False,
                 num_workers: int = 0, pin_memory: bool = False, generator=None,
                 worker_init_fn=None, re_prob: float = 0.0, re_mode: str = 'pixel',
                 re_count: int = 1, device_augment: Optional[DeviceAugment] = None) -> DeviceLoader:
    """A ``DeviceLoader`` over ``dataset``, whose items are ``(uint8 (3, S, S), target)``, or
    ``(uint8 (3, h, w) crop, target)`` with ``device_augment`` (``build_gpu_augment``; the
    crops travel padded, see ``collate_crops``).

    Workers are persistent (no restart at every epoch); ``generator`` seeds their base seeds.
    """
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
        num_workers=num_workers, persistent_workers=num_workers > 0, pin_memory=pin_memory,
        generator=generator, worker_init_fn=worker_init_fn,
        collate_fn=collate_crops if device_augment is not None else collate_images)
    return DeviceLoader(loader, device, re_prob=re_prob, re_mode=re_mode, re_count=re_count,
                        device_augment=device_augment)
