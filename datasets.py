"""Datasets for MTViT training (the transforms and loaders are in ``input_pipeline.py``).

Supported sources (``build_dataset``):

* ``IMNET``  - an ImageFolder tree ``<data-path>/train/<class>/<image>`` and ``val/``.
* ``CIFAR``  - CIFAR-100 as extracted by torchvision (``<data-path>/cifar-100-python``).
* ``INAT`` / ``INAT19`` - iNaturalist 2018 / 2019 (COCO-style json files).
* ``DIGITS`` - scikit-learn's bundled handwritten digits, needs no download.
* ``ARROW``  - an ImageFolder tree packed into Arrow IPC files by ``pack_arrow.py``.

The packer and the command line (``pack``, ``export-digits``) live in ``pack_arrow.py``.
"""
import bisect
import io
import json
import os
import sys

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.datasets import ImageFolder
from torchvision.io import ImageReadMode, decode_image as decode_to_tensor

DATA_SETS = ('IMNET', 'CIFAR', 'INAT', 'INAT19', 'DIGITS', 'ARROW')
INAT_CATEGORIES = ('kingdom', 'phylum', 'class', 'order', 'supercategory', 'family', 'genus', 'name')
INAT_YEARS = {'INAT': 2018, 'INAT19': 2019}

IMAGEFOLDER_LAYOUT = '<data-path>/train/<class>/<image> and <data-path>/val/<class>/<image>'
ARROW_LAYOUT = '<data-path>/train.arrow and <data-path>/val.arrow written by `python pack_arrow.py pack`'

# Fixed for all time: changing either changes which digits are validation images.
DIGITS_SPLIT_SEED = 0
DIGITS_VAL_FRACTION = 0.2
DIGITS_MAX_VALUE = 16
DIGITS_NUM_CLASSES = 10

# Signatures of the files torchvision decodes itself (JPEG, PNG); others go through PIL.
TORCHVISION_DECODED = (b'\xff\xd8\xff', b'\x89PNG\r\n\x1a\n')
ARROW_FORMAT_KEY = b'mtvit_packed_imagefolder'
ARROW_FORMAT_VERSION = b'1'
ARROW_CLASSES_KEY = b'classes'
# How many offending class folders an error message lists before abbreviating.
MAX_NAMES_IN_MESSAGE = 5


class DatasetError(Exception):
    """A data problem the user can fix (missing files, wrong layout, unreadable image)."""


# ---------------------------------------------------------------------------
# Image decoding and the shared bad-image policy
# ---------------------------------------------------------------------------

def decode_image(fileobj, name, as_tensor=False):
    """Decode an encoded image from ``fileobj`` to RGB, as ImageFolder's loader does.

    Returns a PIL image, or with ``as_tensor`` a (3, H, W) uint8 tensor: JPEG and 8-bit PNG
    then go through ``torchvision.io.decode_image`` (libjpeg-turbo/libpng, the same pixels as
    PIL's, without a PIL image in between), other files through PIL. Any failure raises
    ``DatasetError('cannot decode image <name>: ...')`` with PIL's account of the problem.
    """
    if as_tensor:
        data = fileobj.read()
        if data.startswith(TORCHVISION_DECODED):
            try:
                image = decode_to_tensor(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                                         mode=ImageReadMode.RGB)
                if image.dtype == torch.uint8:  # 16-bit PNGs: PIL's 8-bit conversion, as before
                    return image
            except RuntimeError:
                pass  # PIL names the problem
        fileobj = io.BytesIO(data)
    try:
        with Image.open(fileobj) as image:
            image = image.convert('RGB')
    except Exception as exc:
        # Broken files surface as many exception types depending on the PIL plugin
        # (OSError, SyntaxError, struct.error, DecompressionBombError...): all mean "bad image".
        if isinstance(exc, UnidentifiedImageError):
            # PIL's own text repeats the file object's repr; the name is already in the message.
            detail = 'not a recognised image format'
        else:
            detail = ' '.join(str(exc).split())
        raise DatasetError(f'cannot decode image {name}: {type(exc).__name__}: {detail}') from exc
    return torch.from_numpy(np.array(image)).permute(2, 0, 1) if as_tensor else image


def read_image_file(path, as_tensor=False):
    """Read and decode the image file at ``path`` (``decode_image``); ``DatasetError`` names it on failure."""
    try:
        with open(path, 'rb') as handle:
            return decode_image(handle, name=path, as_tensor=as_tensor)
    except OSError as exc:
        raise DatasetError(f'cannot decode image {path}: {type(exc).__name__}: {exc.strerror or exc}') from exc


class BadImagePolicy:
    """Mixin shared by every dataset that decodes image files.

    Subclasses implement ``_load_raw(index) -> (image, target)``, raising ``DatasetError`` for
    an unreadable image, and set ``root``, ``transform``, ``target_transform``, ``skip_bad_images``.
    Images are decoded to PIL, or to (3, H, W) uint8 tensors when ``tensor_images`` is set.
    With skipping off, the error propagates. With skipping on, the sample is replaced by the next
    readable one (wrapping around), a warning naming the file is printed once, and the index is
    remembered so it is not decoded again. ``bad_images`` counts distinct bad samples met by this
    process (each DataLoader worker keeps its own count).
    """

    tensor_images = False

    def _reset_bad_images(self):
        self.bad_images = 0
        self._bad_indices = set()

    def __getitem__(self, index):
        num_samples = len(self)
        if not -num_samples <= index < num_samples:
            # Plain iteration over a Dataset stops on IndexError; wrapping around here would never end.
            raise IndexError(f'index {index} out of range for {num_samples} samples')
        for offset in range(num_samples):
            candidate = (index + offset) % num_samples
            if candidate in self._bad_indices:
                continue
            try:
                image, target = self._load_raw(candidate)
            except DatasetError as err:
                if not self.skip_bad_images:
                    raise
                self._bad_indices.add(candidate)
                self.bad_images += 1
                print(f'warning: skipping bad image: {err}', file=sys.stderr, flush=True)
                continue
            if self.transform is not None:
                image = self.transform(image)
            if self.target_transform is not None:
                target = self.target_transform(target)
            return image, target
        raise DatasetError(f'no readable image left in {self.root}: '
                           f'all {num_samples} samples failed to decode')


# ---------------------------------------------------------------------------
# ImageFolder (IMNET)
# ---------------------------------------------------------------------------

class ImageFolderDataset(BadImagePolicy, ImageFolder):
    """torchvision's ImageFolder with clear decode errors and optional skipping of bad images."""

    def __init__(self, root, transform=None, target_transform=None, skip_bad_images=False):
        super().__init__(root, transform=transform, target_transform=target_transform,
                         loader=read_image_file, allow_empty=True)
        self.skip_bad_images = skip_bad_images
        self._reset_bad_images()

    def _load_raw(self, index):
        path, target = self.samples[index]
        return read_image_file(path, self.tensor_images), target


def _class_folders(split_dir):
    # Same rule as torchvision's find_classes, so the check agrees with what ImageFolder indexes.
    return sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir())


def check_split_dir(data_path, split):
    """``data_path/split`` if it is a folder with class folders; else a ``DatasetError`` naming
    what is missing and the expected layout."""
    split_dir = os.path.join(data_path, split)
    if not os.path.isdir(data_path):
        raise DatasetError(f'data path {data_path} does not exist or is not a directory; expected {IMAGEFOLDER_LAYOUT}')
    if not os.path.isdir(split_dir):
        raise DatasetError(f'missing folder {split_dir}; expected {IMAGEFOLDER_LAYOUT}')
    if not _class_folders(split_dir):
        raise DatasetError(f'no class folders in {split_dir}; expected {IMAGEFOLDER_LAYOUT}')
    return split_dir


def _names_for_message(names):
    shown = ', '.join(names[:MAX_NAMES_IN_MESSAGE])
    hidden = len(names) - MAX_NAMES_IN_MESSAGE
    return f'{shown} and {hidden} more' if hidden > 0 else shown


def open_image_folder(data_path, split, transform=None, skip_bad_images=False):
    """Open ``data_path/split`` as an ``ImageFolderDataset``, validating the layout.

    Raises ``DatasetError`` naming the path when the folder is missing, has no class folders,
    or has class folders without images (torchvision's image extensions).
    """
    split_dir = check_split_dir(data_path, split)
    dataset = ImageFolderDataset(split_dir, transform=transform, skip_bad_images=skip_bad_images)
    classes_with_images = {target for _, target in dataset.samples}
    empty = [name for index, name in enumerate(dataset.classes) if index not in classes_with_images]
    if empty:
        raise DatasetError(f'no images in class folder(s) {_names_for_message(empty)} of {split_dir}; '
                           f'expected {IMAGEFOLDER_LAYOUT}')
    return dataset


def _check_same_classes(val_classes, train_classes, val_name, train_name):
    # ImageFolder indexes each split's own sorted class list: a class missing from one split
    # would silently shift every later label, so the splits must agree exactly.
    if list(val_classes) != list(train_classes):
        missing = sorted(set(train_classes) ^ set(val_classes))
        raise DatasetError(f'classes of {val_name} differ from those of {train_name} '
                           f'(in one but not the other: {_names_for_message(missing)}); '
                           f'both splits need the same class list')


# ---------------------------------------------------------------------------
# iNaturalist (INAT, INAT19)
# ---------------------------------------------------------------------------

def _load_json(path, layout):
    if not os.path.isfile(path):
        raise DatasetError(f'missing file {path}; expected {layout}')
    try:
        with open(path, encoding='utf-8') as handle:
            return json.load(handle)
    except (OSError, ValueError) as exc:
        raise DatasetError(f'cannot read json file {path}: {exc}') from exc


class INatDataset(BadImagePolicy, torch.utils.data.Dataset):
    """iNaturalist 2018/2019 read from the official json files, DeiT-compatible labels.

    ``root`` holds ``train<year>.json``, ``val<year>.json`` (COCO style: ``images`` with
    ``id``/``file_name``, ``annotations`` with ``image_id``/``category_id``), ``categories.json``
    (one record per category id with the levels of ``INAT_CATEGORIES``) and the image folders.
    Classes are the distinct values of level ``category`` in order of first appearance among the
    training annotations (DeiT's order), so train and val share indices. Image paths are
    ``root/<file_name>``; DeiT's layout, which drops the supercategory folder
    (``root/train_val2018/<category id>/<file>``), is used instead when that is what is on disk.
    """

    def __init__(self, root, train=True, year=2018, category='name', transform=None,
                 target_transform=None, skip_bad_images=False):
        if category not in INAT_CATEGORIES:
            raise DatasetError(f'unknown iNaturalist category level {category!r}; '
                               f'choose one of {", ".join(INAT_CATEGORIES)}')
        layout = (f'<data-path>/train{year}.json, <data-path>/val{year}.json, '
                  f'<data-path>/categories.json and the image folders they name')
        if not os.path.isdir(root):
            raise DatasetError(f'data path {root} does not exist or is not a directory; expected {layout}')
        self.root = root
        self.year = year
        self.category = category
        self.transform = transform
        self.target_transform = target_transform
        self.skip_bad_images = skip_bad_images
        self._reset_bad_images()

        categories_path = os.path.join(root, 'categories.json')
        level_of = self._category_levels(_load_json(categories_path, layout), categories_path)
        train_path = os.path.join(root, f'train{year}.json')
        train_data = _load_json(train_path, layout)
        split_path = train_path if train else os.path.join(root, f'val{year}.json')
        split_data = train_data if train else _load_json(split_path, layout)

        class_to_idx = {}
        for annotation in self._records(train_data, 'annotations', train_path):
            value = self._level(level_of, annotation, train_path)
            class_to_idx.setdefault(value, len(class_to_idx))
        self.classes = list(class_to_idx)
        self.class_to_idx = class_to_idx
        self.nb_classes = len(self.classes)

        category_of_image = {}
        for annotation in self._records(split_data, 'annotations', split_path):
            category_of_image[annotation.get('image_id')] = annotation
        self.samples = []
        for image in self._records(split_data, 'images', split_path):
            annotation = category_of_image.get(image.get('id'))
            if annotation is None or 'file_name' not in image:
                raise DatasetError(f'image record {image.get("id")!r} in {split_path} '
                                   f'lacks a file_name or an annotation')
            value = self._level(level_of, annotation, split_path)
            if value not in class_to_idx:
                raise DatasetError(f'{category} {value!r} of image {image["file_name"]} in {split_path} '
                                   f'never occurs in {train_path}')
            self.samples.append((image['file_name'], class_to_idx[value]))
        if not self.samples:
            raise DatasetError(f'no images listed in {split_path}; expected {layout}')
        self._resolve_paths(layout)
        self.targets = [target for _, target in self.samples]

    @staticmethod
    def _records(data, key, path):
        records = data.get(key) if isinstance(data, dict) else None
        if not isinstance(records, list) or not all(isinstance(record, dict) for record in records):
            raise DatasetError(f'{path} has no "{key}" list; expected COCO-style iNaturalist json')
        return records

    def _category_levels(self, categories, path):
        # The official file is a list ordered by id; records carrying an "id" are keyed by it.
        if not isinstance(categories, list):
            raise DatasetError(f'{path} must be a list of category records')
        level_of = {}
        for position, record in enumerate(categories):
            if not isinstance(record, dict) or self.category not in record:
                raise DatasetError(f'category record {position} in {path} has no "{self.category}" field')
            level_of[int(record.get('id', position))] = record[self.category]
        return level_of

    @staticmethod
    def _level(level_of, annotation, path):
        category_id = annotation.get('category_id')
        try:
            return level_of[int(category_id)]
        except (KeyError, TypeError, ValueError):
            raise DatasetError(f'category_id {category_id!r} in {path} is not in categories.json') from None

    def _resolve_paths(self, layout):
        # One probe decides the layout for the whole split: stat-ing every file of a
        # 400k-image dataset would be slow on network file systems.
        first_name = self.samples[0][0]
        official = self._official_path(first_name)
        deit_style = self._deit_path(first_name)
        if os.path.isfile(official):
            resolve = self._official_path
        elif deit_style != official and os.path.isfile(deit_style):
            resolve = self._deit_path
        else:
            tried = official if deit_style == official else f'{official} nor at {deit_style}'
            raise DatasetError(f'image {first_name} not found at {tried}; expected {layout}')
        self.samples = [(resolve(name), target) for name, target in self.samples]

    def _official_path(self, file_name):
        return os.path.join(self.root, file_name)

    def _deit_path(self, file_name):
        parts = file_name.split('/')
        if len(parts) != 4:
            return self._official_path(file_name)
        top_folder, _, category_id, image_name = parts
        return os.path.join(self.root, top_folder, category_id, image_name)

    def __len__(self):
        return len(self.samples)

    def _load_raw(self, index):
        path, target = self.samples[index]
        return read_image_file(path, self.tensor_images), target


# ---------------------------------------------------------------------------
# Handwritten digits (DIGITS)
# ---------------------------------------------------------------------------

def digits_split(is_train):
    """Return ``(images, labels, indices)`` of the fixed train or val split of sklearn's digits.

    ``images`` is uint8 RGB (N, 8, 8, 3) scaled from 0..16 to 0..255, ``labels`` (N,) int64,
    ``indices`` (N,) the positions in ``sklearn.datasets.load_digits()``. The split is
    stratified: each class's indices are permuted by NumPy's legacy ``RandomState(0)`` (its
    stream is frozen across NumPy versions) and the first 20% (rounded) go to val. The same
    stream then shuffles the split's samples, so that any run of them mixes the classes.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    labels = digits.target.astype(np.int64)
    rng = np.random.RandomState(DIGITS_SPLIT_SEED)
    chosen = []
    for label in range(DIGITS_NUM_CLASSES):
        members = np.flatnonzero(labels == label)
        shuffled = members[rng.permutation(len(members))]
        num_val = int(round(len(members) * DIGITS_VAL_FRACTION))
        chosen.append(np.sort(shuffled[num_val:] if is_train else shuffled[:num_val]))
    indices = np.concatenate(chosen)
    # Class order would put only zeros in the first batches and the first visualised images.
    indices = indices[rng.permutation(len(indices))]
    gray = np.round(digits.images[indices] * (255.0 / DIGITS_MAX_VALUE)).astype(np.uint8)
    images = np.repeat(gray[..., None], 3, axis=-1)
    return images, labels[indices], indices


class DigitsDataset(torch.utils.data.Dataset):
    """scikit-learn's handwritten digits as 8x8 RGB PIL images (or (3, 8, 8) uint8 tensors with
    ``tensor_images``): the fixed, stratified, shuffled split."""

    tensor_images = False

    def __init__(self, is_train, transform=None, target_transform=None):
        self.images, labels, self.indices = digits_split(is_train)
        self.targets = labels.tolist()
        self.classes = [str(label) for label in range(DIGITS_NUM_CLASSES)]
        self.transform = transform
        self.target_transform = target_transform

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        image = self.images[index]
        image = torch.from_numpy(image).permute(2, 0, 1) if self.tensor_images else Image.fromarray(image)
        target = self.targets[index]
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return image, target


def export_digits_imagefolder(root):
    """Write the digits split as an ImageFolder tree ``root/{train,val}/<class>/<index>.png``.

    ``<index>`` is the zero-padded position in ``load_digits()``, so ImageFolder over the tree
    yields exactly ``DigitsDataset``'s samples, ordered by (label, index) instead of shuffled.
    Returns ``{split: image count}``.
    Refuses (``DatasetError``) to write into a non-empty split folder.
    """
    counts = {}
    for split, is_train in (('train', True), ('val', False)):
        split_dir = os.path.join(root, split)
        if os.path.isdir(split_dir) and os.listdir(split_dir):
            raise DatasetError(f'refusing to export digits into non-empty folder {split_dir}')
        images, labels, indices = digits_split(is_train)
        for image, label, index in zip(images, labels, indices):
            class_dir = os.path.join(split_dir, str(label))
            os.makedirs(class_dir, exist_ok=True)
            Image.fromarray(image).save(os.path.join(class_dir, f'{index:04d}.png'))
        counts[split] = len(labels)
    return counts


# ---------------------------------------------------------------------------
# Packed Arrow datasets (ARROW)
# ---------------------------------------------------------------------------

class ArrowImageDataset(BadImagePolicy, torch.utils.data.Dataset):
    """A packed ImageFolder split read from a memory-mapped Arrow IPC file.

    Yields exactly the (image, label) samples of ImageFolder over the source tree, in its order.
    The file is opened again lazily in each process that reads samples; pickling (e.g. to
    DataLoader workers) carries only the path, labels and batch offsets.
    """

    def __init__(self, path, transform=None, target_transform=None, skip_bad_images=False):
        self.root = path
        self.transform = transform
        self.target_transform = target_transform
        self.skip_bad_images = skip_bad_images
        self._reset_bad_images()
        self._batches = None
        reader = self._open_reader()
        metadata = reader.schema.metadata or {}
        if metadata.get(ARROW_FORMAT_KEY) != ARROW_FORMAT_VERSION or ARROW_CLASSES_KEY not in metadata:
            raise DatasetError(f'{path} is not a packed image dataset; '
                               f'expected a file written by `python pack_arrow.py pack`')
        self.classes = json.loads(metadata[ARROW_CLASSES_KEY].decode('utf-8'))
        self.class_to_idx = {name: index for index, name in enumerate(self.classes)}
        batch_lengths = [reader.get_batch(index).num_rows for index in range(reader.num_record_batches)]
        self._batch_starts = np.cumsum([0] + batch_lengths[:-1]).tolist()
        self.targets = reader.read_all().column('label').to_numpy().astype(np.int64).tolist()

    def _open_reader(self):
        import pyarrow as pa

        if not os.path.isfile(self.root):
            raise DatasetError(f'missing packed file {self.root}; expected {ARROW_LAYOUT}')
        try:
            return pa.ipc.open_file(pa.memory_map(self.root, 'r'))
        except (OSError, pa.ArrowInvalid) as exc:
            raise DatasetError(f'cannot open packed file {self.root}: {exc}') from exc

    def __getstate__(self):
        state = self.__dict__.copy()
        state['_batches'] = None
        return state

    def __len__(self):
        return len(self.targets)

    def _load_raw(self, index):
        if self._batches is None:
            reader = self._open_reader()
            # Zero-copy views into the memory map; only the touched pages are ever read.
            self._batches = [reader.get_batch(number) for number in range(reader.num_record_batches)]
        batch_number = bisect.bisect_right(self._batch_starts, index) - 1
        batch = self._batches[batch_number]
        row = index - self._batch_starts[batch_number]
        encoded = batch.column('image')[row].as_buffer()
        name = f'{self.root} row {index} ({batch.column("path")[row].as_py()})'
        return decode_image(io.BytesIO(encoded), name=name, as_tensor=self.tensor_images), self.targets[index]


# ---------------------------------------------------------------------------
# Entry point used by main.py
# ---------------------------------------------------------------------------

def build_dataset(is_train, data_set, data_path, transform, inat_category='name', skip_bad_images=False,
                  tensor_images=False):
    """Build the train (``is_train``) or val split of ``data_set``; return ``(dataset, num_classes)``.

    ``data_set`` is one of ``DATA_SETS``; ``data_path`` is ignored for DIGITS. User-fixable
    problems (missing folders or files, wrong layout, absent CIFAR) raise ``DatasetError``.
    ``skip_bad_images`` applies to the file-based sets (IMNET, INAT, INAT19, ARROW).
    ``tensor_images``: the transform receives (3, H, W) uint8 tensors instead of PIL images
    (CIFAR always gives PIL images).
    """
    dataset, num_classes = _open_dataset(is_train, data_set, data_path, transform, inat_category,
                                         skip_bad_images)
    dataset.tensor_images = tensor_images
    return dataset, num_classes


def _open_dataset(is_train, data_set, data_path, transform, inat_category, skip_bad_images):
    if data_set not in DATA_SETS:
        raise DatasetError(f'unknown data set {data_set!r}; choose one of {", ".join(DATA_SETS)}')
    if data_set == 'DIGITS':
        dataset = DigitsDataset(is_train, transform=transform)
        return dataset, len(dataset.classes)
    if not data_path:
        raise DatasetError(f'data set {data_set} needs a data path (--data-path)')
    data_path = os.fspath(data_path)
    split = 'train' if is_train else 'val'

    if data_set == 'IMNET':
        dataset = open_image_folder(data_path, split, transform=transform, skip_bad_images=skip_bad_images)
        train_dir = os.path.join(data_path, 'train')
        if not is_train and os.path.isdir(train_dir):
            _check_same_classes(dataset.classes, _class_folders(train_dir), dataset.root, train_dir)
        return dataset, len(dataset.classes)

    if data_set == 'CIFAR':
        from torchvision.datasets import CIFAR100

        try:
            dataset = CIFAR100(data_path, train=is_train, transform=transform, download=False)
        except RuntimeError as exc:
            raise DatasetError(f'CIFAR-100 not found or corrupted in {data_path}; expected the extracted '
                               f'folder {os.path.join(data_path, "cifar-100-python")} (nothing is downloaded)') from exc
        return dataset, len(dataset.classes)

    if data_set in INAT_YEARS:
        dataset = INatDataset(data_path, train=is_train, year=INAT_YEARS[data_set], category=inat_category,
                              transform=transform, skip_bad_images=skip_bad_images)
        return dataset, dataset.nb_classes

    if not os.path.isdir(data_path):
        raise DatasetError(f'data path {data_path} does not exist or is not a directory; expected {ARROW_LAYOUT}')
    dataset = ArrowImageDataset(os.path.join(data_path, f'{split}.arrow'), transform=transform,
                                skip_bad_images=skip_bad_images)
    train_file = os.path.join(data_path, 'train.arrow')
    if not is_train and os.path.isfile(train_file):
        _check_same_classes(dataset.classes, ArrowImageDataset(train_file).classes, dataset.root, train_file)
    return dataset, len(dataset.classes)


# `python datasets.py pack|export-digits ...` (pack_arrow.py's command line) and
# `python datasets.py bench ...` (pipeline_bench.py's).
if __name__ == '__main__':
    if sys.argv[1:2] == ['bench']:
        from pipeline_bench import main
        sys.exit(main(sys.argv[2:]))
    from pack_arrow import main

    sys.exit(main())
