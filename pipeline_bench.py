"""``python datasets.py bench``: training images/s of the input pipeline, per loader worker.

Two loaders read the same training images with the same flags (main.py's defaults unless
given), the same samplers and per-sample seeds:

* ``pipeline``: the training loader exactly as ``main.py`` builds it (``main.build_loaders``):
  torchvision decoding, uint8 images from the workers, normalisation and random erasing
  batched on ``--device``;
* ``per-image``: the plain timm transform (PIL decode, crop, flips, RandAugment, ``ToTensor``,
  ``Normalize``, ``RandomErasing`` in every worker), float32 batches moved to ``--device``.

Rounds alternate between the two (the first of each, which starts the workers, is not
counted); each round takes ``--images`` images. Reported: each loader's median round and the
median of the rounds' ratios.
"""
import argparse
import statistics
import sys
import time

import torch

from datasets import DATA_SETS
from utils import NON_NEGATIVE_INT, POSITIVE_INT, synchronize

DEFAULT_ROUNDS = 7
DEFAULT_IMAGES = 512
DEFAULT_BATCH_SIZE = 32
# scikit-image's bundled photographs (no download needed); grey ones are made RGB.
SAMPLE_PHOTOS = ('astronaut', 'coffee', 'chelsea', 'rocket', 'hubble_deep_field',
                 'immunohistochemistry', 'retina', 'camera', 'coins', 'moon', 'brick', 'grass',
                 'gravel')
SAMPLE_SIZE = (500, 375)  # ImageNet's most common size
SAMPLE_COPIES = 40  # of each photograph, in two classes: 16 batches of 32 per epoch
# Images per second one H200 trains DeiT-S at (bf16, batch 256), times eight GPUs: what a node's
# loaders must deliver.
NODE_IMAGES_PER_S = 8 * 5600


def get_args_parser() -> argparse.ArgumentParser:
    """The bench's flags; every other training flag keeps main.py's default."""
    from utils import OneLineErrorParser

    parser = OneLineErrorParser(
        description='Training input pipeline images/s per worker, against the per-image timm transform.',
        command='datasets.py bench', prog='python datasets.py bench')
    parser.add_argument('--data-path', required=True, help='an ImageFolder tree (train/<class>/<image>)')
    parser.add_argument('--data-set', default='IMNET', choices=DATA_SETS)
    parser.add_argument('--input-size', type=POSITIVE_INT, default=224)
    parser.add_argument('--workers', type=NON_NEGATIVE_INT, default=1, help='loader worker processes (0: in this process)')
    parser.add_argument('--batch-size', type=POSITIVE_INT, default=DEFAULT_BATCH_SIZE)
    parser.add_argument('--images', type=POSITIVE_INT, default=DEFAULT_IMAGES, help='images per round')
    parser.add_argument('--rounds', type=POSITIVE_INT, default=DEFAULT_ROUNDS, help='timed rounds per pipeline')
    parser.add_argument('--device', default='cpu', help='where the batches go (cpu, cuda)')
    parser.add_argument('--main-flags', default='', metavar='"FLAGS"',
                        help='further main.py flags, e.g. --main-flags="--reprob 0 --aa none"')
    parser.add_argument('--workers-only', action='store_true',
                        help="time the loaders' workers alone: the batches are not moved to the "
                             'device nor finished there (the CPU side of --gpu-augment without a GPU)')
    parser.add_argument('--sample-photos', action='store_true',
                        help="first write scikit-image's sample photographs, JPEG at 500x375, as "
                             'an ImageFolder tree in --data-path')
    parser.add_argument('--sample-copies', type=POSITIVE_INT, default=SAMPLE_COPIES,
                        help='copies of each photograph --sample-photos writes (13 photographs)')
    return parser


def write_sample_photos(root: str, copies: int = SAMPLE_COPIES) -> int:
    """Writes ``root/{train,val}/<class>/<name>_<copy>.jpg``: scikit-image's photographs resized
    to ``SAMPLE_SIZE`` (bicubic) and saved as JPEG (quality 90), ``copies`` of each for training
    and one for validation; returns the number of training images."""
    import os
    import re

    import numpy as np
    import skimage.data
    from PIL import Image

    from datasets import DatasetError

    # Only into an empty folder or one it wrote before: never among a user's own images.
    ours = re.compile(rf'(train|val)/class[01]/({"|".join(SAMPLE_PHOTOS)})_\d+\.jpg')
    for folder, _, files in os.walk(root, followlinks=True):
        for name in files:
            found = os.path.relpath(os.path.join(folder, name), root).replace(os.sep, '/')
            if not ours.fullmatch(found):
                raise DatasetError(f'--data-path {root} holds {found}: --sample-photos writes '
                                   f'into an empty folder (or one it wrote before)')
    count = 0
    for index, name in enumerate(SAMPLE_PHOTOS):
        pixels = getattr(skimage.data, name)()
        if pixels.ndim == 2:
            pixels = np.stack([pixels] * 3, axis=-1)
        photo = Image.fromarray(pixels[..., :3]).resize(SAMPLE_SIZE, Image.BICUBIC)
        for split, count_in_split in (('train', copies), ('val', 1)):
            class_dir = os.path.join(root, split, f'class{index % 2}')
            os.makedirs(class_dir, exist_ok=True)
            for copy in range(count_in_split):
                photo.save(os.path.join(class_dir, f'{name}_{copy}.jpg'), quality=90)
        count += copies
    return count


def training_args(args: argparse.Namespace) -> argparse.Namespace:
    """main.py's flags for these data: its defaults, the bench's settings and ``--main-flags``."""
    import shlex

    from main import check_args, get_args_parser as main_parser
    from utils import OneLineErrorParser

    parser = OneLineErrorParser(command='datasets.py bench: --main-flags', parents=[main_parser()],
                                add_help=False)
    train_args = parser.parse_args(
        ['--data-set', args.data_set, '--data-path', args.data_path, '--input-size',
         str(args.input_size), '--batch-size', str(args.batch_size), '--num_workers',
         str(args.workers), '--device', args.device, '--mixup', '0', '--cutmix', '0',  # not timed
         *shlex.split(args.main_flags)])
    check_args(train_args)
    return train_args


class PerImageLoader:
    """The reference: timm's per-image transform in the workers, float32 batches to ``device``."""

    def __init__(self, train_args: argparse.Namespace, device: torch.device):
        from datasets import build_dataset
        from input_pipeline import build_transform
        from samplers import SeededDataset, SeededSampler, build_train_sampler

        transform = build_transform(
            True, input_size=train_args.input_size, color_jitter=train_args.color_jitter,
            auto_augment=train_args.aa, interpolation=train_args.train_interpolation,
            re_prob=train_args.reprob, re_mode=train_args.remode, re_count=train_args.recount,
            scale=tuple(train_args.scale), ratio=tuple(train_args.ratio), hflip=train_args.hflip,
            vflip=train_args.vflip)
        dataset, _ = build_dataset(True, data_set=train_args.data_set,
                                   data_path=train_args.data_path, transform=transform,
                                   inat_category=train_args.inat_category)
        sampler = build_train_sampler(dataset, num_replicas=1, rank=0,
                                      repeated_aug=train_args.repeated_aug, seed=train_args.seed)
        self.sampler = SeededSampler(sampler, train_args.seed, 0)
        self.loader = torch.utils.data.DataLoader(
            SeededDataset(dataset), sampler=self.sampler, batch_size=train_args.batch_size,
            drop_last=True, num_workers=train_args.num_workers,
            persistent_workers=train_args.num_workers > 0, pin_memory=device.type == 'cuda')
        self.device = device

    def __iter__(self):
        for images, targets in self.loader:
            yield images.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)


def time_round(loader, epoch: int, images: int, device: torch.device) -> float:
    """Seconds per image to take at least ``images`` images from ``loader`` in whole epochs, the
    first being ``epoch`` (no batch left in the workers to run into the next round's time)."""
    taken = 0
    start = time.perf_counter()
    while taken < images:
        loader.sampler.set_epoch(epoch)
        epoch += 1
        for _, targets in loader:
            taken += len(targets)
    synchronize(device)
    return (time.perf_counter() - start) / taken


def run(args: argparse.Namespace) -> dict:
    """Times both loaders; returns seconds per image of each (median round), the median of
    the rounds' ratios and the device the batches went to."""
    from main import build_loaders
    from utils import DistState, resolve_device

    train_args = training_args(args)
    device = resolve_device(args.device)
    dist_state = DistState(distributed=False, rank=0, world_size=1, local_rank=0, device=device,
                           backend=None)
    pipeline, _, _ = build_loaders(train_args, dist_state, train=True)
    loaders = {'pipeline': pipeline, 'per-image': PerImageLoader(train_args, device)}
    if args.workers_only:
        loaders = {name: loader.loader for name, loader in loaders.items()}
    times = {name: [] for name in loaders}
    # Distinct epochs: every round sees new crops and augmentations.
    epochs_per_round = -(-args.images // (len(pipeline) * args.batch_size))
    for round_index in range(args.rounds + 1):
        for name, loader in loaders.items():
            seconds = time_round(loader, epoch=round_index * epochs_per_round,
                                 images=args.images, device=device)
            if round_index:  # the first round starts the workers
                times[name].append(seconds)
    result = {name: statistics.median(values) for name, values in times.items()}
    # The median of each round's own ratio: the two loaders of a round see the same machine.
    result['ratio'] = statistics.median(
        reference / pipeline for reference, pipeline in zip(times['per-image'], times['pipeline']))
    result['device'] = str(device)  # --device cuda falls back to the CPU where CUDA is absent
    return result


def main(argv=None) -> int:
    """Runs the bench on ``argv`` and prints its table; returns the exit status."""
    from datasets import DatasetError
    from main import UsageError

    args = get_args_parser().parse_args(argv)
    try:
        if args.sample_photos:
            written = write_sample_photos(args.data_path, args.sample_copies)
            print(f'{written} training and {len(SAMPLE_PHOTOS)} validation photographs written '
                  f'to {args.data_path}')
        result = run(args)
    except (DatasetError, UsageError, OSError) as err:
        print(f'datasets.py bench: error: {err}', file=sys.stderr)
        return 2
    workers = max(args.workers, 1)
    print(f'{args.data_set} {args.data_path}, input {args.input_size}, batch {args.batch_size}, '
          f'{args.workers} worker(s), {"workers only" if args.workers_only else "device " + result["device"]}, '
          f'{args.main_flags or "main.py defaults"}, median of {args.rounds} rounds of {args.images} images')
    for name in ('per-image', 'pipeline'):
        per_worker = 1 / result[name] / workers
        print(f'{name:>10}: {per_worker:8.1f} images/s per worker '
              f'({NODE_IMAGES_PER_S / per_worker:,.0f} workers for {NODE_IMAGES_PER_S:,} images/s)')
    print(f'     ratio: {result["ratio"]:.2f}x')
    return 0


if __name__ == '__main__':
    sys.exit(main())
