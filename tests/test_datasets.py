"""Tests for datasets.py: transforms, every data set kind, bad images, Arrow packing and the CLI."""
import hashlib
import json
import multiprocessing
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms
from torchvision.datasets import ImageFolder

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import datasets  # noqa: E402
from datasets import DatasetError  # noqa: E402

NUM_DIGITS = 1797
# sha256 of the validation indices (little-endian int64): pins the split for every machine.
DIGITS_VAL_SHA256 = '6bd7ef13e268b8ba45a298543f5571e07a7ee91cfc871f59b912625c7afa4fac'
DIGITS_TRAIN_SIZE = 1438
DIGITS_VAL_SIZE = 359


# ---------------------------------------------------------------------------
# Fixtures and helpers
# ---------------------------------------------------------------------------

@pytest.fixture(scope='module')
def digits_tree(tmp_path_factory):
    """The digits exported once as an ImageFolder tree (shared: writing 1,797 PNGs takes a moment)."""
    root = tmp_path_factory.mktemp('digits')
    counts = datasets.export_digits_imagefolder(str(root))
    assert counts == {'train': DIGITS_TRAIN_SIZE, 'val': DIGITS_VAL_SIZE}
    return root


def random_image(rng, mode, size):
    """A random PIL image of ``mode`` ('RGB', 'L', 'RGBA' or 'P') and (width, height) ``size``."""
    width, height = size
    if mode == 'RGB':
        return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    if mode == 'RGBA':
        return Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=np.uint8))
    gray = Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8))
    return gray if mode == 'L' else gray.convert('P')


def write_mixed_tree(root, seed=0):
    """Write a small ImageFolder tree mixing PNG/JPEG and colour modes; return the root."""
    rng = np.random.default_rng(seed)
    layout = {
        'train': {'cat': 5, 'dog': 4, 'emu': 3},
        'val': {'cat': 2, 'dog': 2, 'emu': 1},
    }
    modes = ['RGB', 'L', 'RGBA', 'P']
    for split, classes in layout.items():
        for class_name, count in classes.items():
            class_dir = Path(root) / split / class_name
            class_dir.mkdir(parents=True)
            for number in range(count):
                mode = modes[number % len(modes)]
                size = (int(rng.integers(5, 20)), int(rng.integers(5, 20)))
                image = random_image(rng, mode, size)
                if number % 2 == 0 and mode in ('RGB', 'L'):
                    image.save(class_dir / f'img{number}.jpg', quality=90)
                else:
                    image.save(class_dir / f'img{number}.png')
    return Path(root)


def write_good_jpeg(path, seed):
    """Write a random 16x16 RGB JPEG."""
    image = random_image(np.random.default_rng(seed), 'RGB', (16, 16))
    image.save(path, quality=90)


def write_truncated_jpeg(path):
    """Write a JPEG cut to half its length (a typical partially downloaded file)."""
    write_good_jpeg(path, seed=99)
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[:len(data) // 2])


def write_corrupt_tree(root):
    """One class: a.jpg good, b.jpg truncated, c.jpg good, d.jpg garbage (last, to test wrap-around)."""
    class_dir = Path(root) / 'train' / 'only'
    class_dir.mkdir(parents=True)
    write_good_jpeg(class_dir / 'a.jpg', seed=1)
    write_truncated_jpeg(class_dir / 'b.jpg')
    write_good_jpeg(class_dir / 'c.jpg', seed=3)
    (class_dir / 'd.jpg').write_bytes(b'\xff\xd8 definitely not a jpeg')
    (Path(root) / 'val' / 'only').mkdir(parents=True)
    write_good_jpeg(Path(root) / 'val' / 'only' / 'v.jpg', seed=4)
    return Path(root)


def pixels(image):
    """An image as a numpy array, for exact comparisons."""
    return np.asarray(image)


def assert_same_samples(dataset, reference):
    """Every (image, label) pair of ``dataset`` equals ``reference``'s, in the same order."""
    assert len(dataset) == len(reference)
    for index in range(len(reference)):
        image, label = dataset[index]
        expected_image, expected_label = reference[index]
        assert label == expected_label
        assert image.mode == expected_image.mode == 'RGB'
        np.testing.assert_array_equal(pixels(image), pixels(expected_image))


def run_cli(*args):
    """Run ``python datasets.py ARGS`` in a fresh process; return the completed process."""
    return subprocess.run([sys.executable, str(REPO_ROOT / 'datasets.py'), *args],
                          capture_output=True, text=True, timeout=120, cwd=str(REPO_ROOT))


# ---------------------------------------------------------------------------
# DIGITS
# ---------------------------------------------------------------------------

def test_digits_split_is_pinned_stratified_disjoint_and_complete():
    from sklearn.datasets import load_digits

    train_images, train_labels, train_indices = datasets.digits_split(is_train=True)
    val_images, val_labels, val_indices = datasets.digits_split(is_train=False)

    again = datasets.digits_split(is_train=False)
    np.testing.assert_array_equal(again[2], val_indices)
    digest = hashlib.sha256(np.asarray(val_indices, dtype='<i8').tobytes()).hexdigest()
    assert digest == DIGITS_VAL_SHA256

    assert len(train_indices) == DIGITS_TRAIN_SIZE and len(val_indices) == DIGITS_VAL_SIZE
    assert not set(train_indices.tolist()) & set(val_indices.tolist())
    assert sorted(train_indices.tolist() + val_indices.tolist()) == list(range(NUM_DIGITS))

    digits = load_digits()
    all_counts = np.bincount(digits.target, minlength=10)
    val_counts = np.bincount(val_labels, minlength=10)
    assert len(all_counts) == 10 and (np.bincount(train_labels, minlength=10) > 0).all()
    np.testing.assert_array_equal(val_counts, np.round(all_counts * 0.2).astype(int))
    np.testing.assert_array_equal(train_labels, digits.target[train_indices])

    assert train_images.dtype == np.uint8 and train_images.shape == (DIGITS_TRAIN_SIZE, 8, 8, 3)
    expected = np.round(digits.images[val_indices] * 255 / 16).astype(np.uint8)
    for channel in range(3):
        np.testing.assert_array_equal(val_images[..., channel], expected)
    assert val_images.min() == 0 and val_images.max() == 255

    order = list(zip(val_labels.tolist(), val_indices.tolist()))
    assert order == sorted(order)


def test_build_dataset_digits_ignores_path_and_transforms_to_input_size():
    train_set, num_classes = datasets.build_dataset(
        is_train=True, data_set='DIGITS', data_path='/does/not/matter',
        transform=datasets.build_transform(is_train=True, input_size=32))
    val_set, val_classes = datasets.build_dataset(
        is_train=False, data_set='DIGITS', data_path=None,
        transform=datasets.build_transform(is_train=False, input_size=48))
    assert num_classes == val_classes == 10
    assert (len(train_set), len(val_set)) == (DIGITS_TRAIN_SIZE, DIGITS_VAL_SIZE)
    assert train_set.classes == [str(digit) for digit in range(10)]

    image, label = train_set[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert label == train_set.targets[0] == 0
    image, label = val_set[len(val_set) - 1]
    assert image.shape == (3, 48, 48) and label == 9

    raw_set, _ = datasets.build_dataset(is_train=False, data_set='DIGITS', data_path=None, transform=None)
    raw_image, _ = raw_set[0]
    assert raw_image.size == (8, 8) and raw_image.mode == 'RGB'


def test_exported_digits_tree_equals_digits_dataset(digits_tree):
    for is_train, split in ((True, 'train'), (False, 'val')):
        folder = ImageFolder(str(digits_tree / split))
        digits = datasets.DigitsDataset(is_train)
        assert folder.classes == digits.classes
        assert folder.targets == digits.targets
        assert_same_samples(folder, digits)


def test_export_digits_refuses_non_empty_folder(digits_tree):
    with pytest.raises(DatasetError, match='non-empty'):
        datasets.export_digits_imagefolder(str(digits_tree))


# ---------------------------------------------------------------------------
# Transforms
# ---------------------------------------------------------------------------

def test_train_transform_passes_crop_and_flip_settings():
    transform = datasets.build_transform(is_train=True, input_size=64, scale=(0.5, 1.0),
                                         ratio=(0.9, 1.1), hflip=0.0, vflip=0.5)
    crop = transform.transforms[0]
    assert crop.size == (64, 64) and crop.scale == (0.5, 1.0) and crop.ratio == (0.9, 1.1)
    kinds = [type(step).__name__ for step in transform.transforms]
    assert 'RandomVerticalFlip' in kinds and 'RandomHorizontalFlip' not in kinds
    assert 'RandomErasing' in kinds
    image = Image.new('RGB', (100, 80), (200, 10, 10))
    assert transform(image).shape == (3, 64, 64)


def test_small_train_transform_uses_padded_random_crop():
    transform = datasets.build_transform(is_train=True, input_size=32, auto_augment='none', re_prob=0.0)
    first, second = transform.transforms[:2]
    assert isinstance(first, datasets.ResizeIfSmaller)
    assert isinstance(second, transforms.RandomCrop)
    assert second.size == (32, 32) and second.padding == 4
    assert not any('RandAugment' in type(step).__name__ for step in transform.transforms)
    assert transform(Image.new('RGB', (8, 8))).shape == (3, 32, 32)
    assert transform(Image.new('RGB', (32, 32))).shape == (3, 32, 32)


def test_eval_transform_resizes_crops_and_normalises():
    transform = datasets.build_transform(is_train=False, input_size=224)
    resize = transform.transforms[0]
    assert isinstance(resize, transforms.Resize)
    assert resize.size == 256 and resize.interpolation == transforms.InterpolationMode.BICUBIC
    white = transform(Image.new('RGB', (300, 400), (255, 255, 255)))
    assert white.shape == (3, 224, 224)
    expected = (1 - torch.tensor((0.485, 0.456, 0.406))) / torch.tensor((0.229, 0.224, 0.225))
    torch.testing.assert_close(white[:, 100, 100], expected)

    small = datasets.build_transform(is_train=False, input_size=32)
    assert not any(isinstance(step, transforms.Resize) for step in small.transforms)
    cifar_like = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    expected_tensor = transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))(
        transforms.ToTensor()(cifar_like))
    torch.testing.assert_close(small(cifar_like), expected_tensor)


# ---------------------------------------------------------------------------
# IMNET (ImageFolder) and CIFAR
# ---------------------------------------------------------------------------

def assert_layout_error(excinfo, path):
    message = str(excinfo.value)
    assert str(path) in message
    assert 'train/<class>/<image>' in message
    assert '\n' not in message


def test_imagefolder_missing_data_path(tmp_path):
    missing = tmp_path / 'nowhere'
    with pytest.raises(DatasetError) as excinfo:
        datasets.build_dataset(is_train=True, data_set='IMNET', data_path=str(missing), transform=None)
    assert_layout_error(excinfo, missing)


def test_imagefolder_missing_val_folder(tmp_path):
    (tmp_path / 'train' / 'a').mkdir(parents=True)
    write_good_jpeg(tmp_path / 'train' / 'a' / 'x.jpg', seed=0)
    with pytest.raises(DatasetError) as excinfo:
        datasets.build_dataset(is_train=False, data_set='IMNET', data_path=str(tmp_path), transform=None)
    assert_layout_error(excinfo, tmp_path / 'val')


def test_imagefolder_without_class_folders(tmp_path):
    (tmp_path / 'train').mkdir()
    (tmp_path / 'train' / 'stray.jpg').write_bytes(b'')
    with pytest.raises(DatasetError, match='no class folders') as excinfo:
        datasets.build_dataset(is_train=True, data_set='IMNET', data_path=str(tmp_path), transform=None)
    assert_layout_error(excinfo, tmp_path / 'train')


def test_imagefolder_class_folder_without_images(tmp_path):
    (tmp_path / 'train' / 'full').mkdir(parents=True)
    (tmp_path / 'train' / 'empty').mkdir()
    write_good_jpeg(tmp_path / 'train' / 'full' / 'x.jpg', seed=0)
    (tmp_path / 'train' / 'empty' / 'notes.txt').write_text('not an image')
    with pytest.raises(DatasetError, match='no images in class folder') as excinfo:
        datasets.build_dataset(is_train=True, data_set='IMNET', data_path=str(tmp_path), transform=None)
    assert_layout_error(excinfo, tmp_path / 'train')
    assert 'empty' in str(excinfo.value)


def test_imagefolder_val_classes_must_match_train(tmp_path):
    for split, classes in (('train', ['a', 'b', 'c']), ('val', ['a', 'c'])):
        for name in classes:
            (tmp_path / split / name).mkdir(parents=True)
            write_good_jpeg(tmp_path / split / name / 'x.jpg', seed=0)
    with pytest.raises(DatasetError, match='differ') as excinfo:
        datasets.build_dataset(is_train=False, data_set='IMNET', data_path=str(tmp_path), transform=None)
    assert str(tmp_path / 'val') in str(excinfo.value) and 'b' in str(excinfo.value)


def test_imagefolder_loads_digits_tree(digits_tree):
    transform = datasets.build_transform(is_train=False, input_size=32)
    dataset, num_classes = datasets.build_dataset(is_train=False, data_set='IMNET',
                                                  data_path=str(digits_tree), transform=transform)
    assert num_classes == 10 and len(dataset) == DIGITS_VAL_SIZE
    digits = datasets.DigitsDataset(is_train=False, transform=transform)
    for index in (0, 100, DIGITS_VAL_SIZE - 1):
        image, label = dataset[index]
        expected_image, expected_label = digits[index]
        assert label == expected_label
        torch.testing.assert_close(image, expected_image)


def test_cifar_absent_is_a_dataset_error_and_never_downloads(tmp_path):
    with pytest.raises(DatasetError) as excinfo:
        datasets.build_dataset(is_train=True, data_set='CIFAR', data_path=str(tmp_path), transform=None)
    message = str(excinfo.value)
    assert str(tmp_path) in message and 'cifar-100-python' in message
    assert list(tmp_path.iterdir()) == []


def test_unknown_data_set_and_missing_path():
    with pytest.raises(DatasetError, match='unknown data set'):
        datasets.build_dataset(is_train=True, data_set='MNIST', data_path='/x', transform=None)
    with pytest.raises(DatasetError, match='--data-path'):
        datasets.build_dataset(is_train=True, data_set='IMNET', data_path=None, transform=None)


# ---------------------------------------------------------------------------
# INAT / INAT19
# ---------------------------------------------------------------------------

INAT_CATEGORIES = [
    {'id': 0, 'name': 'Quercus robur', 'genus': 'Quercus', 'family': 'Fagaceae', 'order': 'Fagales',
     'class': 'Magnoliopsida', 'phylum': 'Tracheophyta', 'kingdom': 'Plantae', 'supercategory': 'Plantae'},
    {'id': 1, 'name': 'Quercus alba', 'genus': 'Quercus', 'family': 'Fagaceae', 'order': 'Fagales',
     'class': 'Magnoliopsida', 'phylum': 'Tracheophyta', 'kingdom': 'Plantae', 'supercategory': 'Plantae'},
    {'id': 2, 'name': 'Passer domesticus', 'genus': 'Passer', 'family': 'Passeridae', 'order': 'Passeriformes',
     'class': 'Aves', 'phylum': 'Chordata', 'kingdom': 'Animalia', 'supercategory': 'Aves'},
    {'id': 3, 'name': 'Passer montanus', 'genus': 'Passer', 'family': 'Passeridae', 'order': 'Passeriformes',
     'class': 'Aves', 'phylum': 'Chordata', 'kingdom': 'Animalia', 'supercategory': 'Aves'},
]
# (image id, category id) per split; train's first-appearance order of names is 2, 0, 3, 1.
INAT_SPLITS = {
    'train': [(10, 2), (11, 0), (12, 2), (13, 3), (14, 1), (15, 0)],
    'val': [(20, 1), (21, 3), (22, 0)],
}


def write_inat_tree(root, year, deit_layout):
    """Write categories.json, train/val json files and tiny PNGs for ``year``.

    ``deit_layout`` stores images without the supercategory folder, as DeiT's reader expects.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / 'categories.json').write_text(json.dumps(INAT_CATEGORIES))
    top_folder = f'train_val{year}'
    for split, records in INAT_SPLITS.items():
        images, annotations = [], []
        for image_id, category_id in records:
            category = INAT_CATEGORIES[category_id]
            file_name = f'{top_folder}/{category["supercategory"]}/{category_id}/{image_id}.png'
            on_disk = root / (f'{top_folder}/{category_id}/{image_id}.png' if deit_layout else file_name)
            on_disk.parent.mkdir(parents=True, exist_ok=True)
            Image.new('RGB', (6, 4), (image_id, category_id, 0)).save(on_disk)
            images.append({'id': image_id, 'file_name': file_name, 'width': 6, 'height': 4})
            annotations.append({'id': image_id + 1000, 'image_id': image_id, 'category_id': category_id})
        (root / f'{split}{year}.json').write_text(json.dumps({'images': images, 'annotations': annotations}))
    return root


@pytest.mark.parametrize('data_set,year,deit_layout', [('INAT', 2018, False), ('INAT19', 2019, True)])
def test_inat_levels_give_shared_class_indices(tmp_path, data_set, year, deit_layout):
    root = write_inat_tree(tmp_path / 'inat', year, deit_layout)

    train_set, num_classes = datasets.build_dataset(is_train=True, data_set=data_set, data_path=str(root),
                                                    transform=None, inat_category='name')
    val_set, val_classes = datasets.build_dataset(is_train=False, data_set=data_set, data_path=str(root),
                                                  transform=None, inat_category='name')
    assert num_classes == val_classes == 4
    assert train_set.classes == ['Passer domesticus', 'Quercus robur', 'Passer montanus', 'Quercus alba']
    name_index = {category_id: train_set.classes.index(INAT_CATEGORIES[category_id]['name'])
                  for category_id in range(4)}
    assert train_set.targets == [name_index[category] for _, category in INAT_SPLITS['train']]
    assert val_set.targets == [name_index[category] for _, category in INAT_SPLITS['val']] == [3, 2, 1]

    image, label = val_set[1]
    assert label == 2 and image.size == (6, 4)
    assert image.getpixel((0, 0)) == (21, 3, 0)

    genus_train, genus_classes = datasets.build_dataset(is_train=True, data_set=data_set, data_path=str(root),
                                                        transform=None, inat_category='genus')
    genus_val, _ = datasets.build_dataset(is_train=False, data_set=data_set, data_path=str(root),
                                          transform=None, inat_category='genus')
    assert genus_classes == 2 and genus_train.classes == ['Passer', 'Quercus']
    assert genus_train.targets == [0, 1, 0, 0, 1, 1]
    assert genus_val.targets == [1, 0, 1]

    kingdom_set, kingdom_classes = datasets.build_dataset(is_train=True, data_set=data_set, data_path=str(root),
                                                          transform=None, inat_category='kingdom')
    assert kingdom_classes == 2 and kingdom_set.classes == ['Animalia', 'Plantae']


def test_inat_errors_name_the_file(tmp_path):
    root = write_inat_tree(tmp_path / 'inat', 2018, deit_layout=False)
    with pytest.raises(DatasetError, match='category level'):
        datasets.build_dataset(is_train=True, data_set='INAT', data_path=str(root), transform=None,
                               inat_category='species')
    with pytest.raises(DatasetError) as excinfo:
        datasets.build_dataset(is_train=True, data_set='INAT19', data_path=str(root), transform=None)
    assert str(root / 'train2019.json') in str(excinfo.value)

    val_json = json.loads((root / 'val2018.json').read_text())
    val_json['annotations'][0]['category_id'] = 7
    (root / 'val2018.json').write_text(json.dumps(val_json))
    with pytest.raises(DatasetError, match='category_id 7'):
        datasets.build_dataset(is_train=False, data_set='INAT', data_path=str(root), transform=None)

    (root / 'train_val2018' / 'Plantae' / '1' / '14.png').unlink()
    inat, _ = datasets.build_dataset(is_train=True, data_set='INAT', data_path=str(root), transform=None)
    with pytest.raises(DatasetError, match='14.png'):
        inat[4]


# ---------------------------------------------------------------------------
# Bad images (shared by ImageFolder, iNaturalist and Arrow)
# ---------------------------------------------------------------------------

def test_corrupt_jpeg_raises_naming_the_file(tmp_path):
    root = write_corrupt_tree(tmp_path / 'tree')
    dataset, _ = datasets.build_dataset(is_train=True, data_set='IMNET', data_path=str(root), transform=None)
    assert pixels(dataset[0][0]).shape == (16, 16, 3)
    bad_path = str(root / 'train' / 'only' / 'b.jpg')
    with pytest.raises(DatasetError) as excinfo:
        dataset[1]
    message = str(excinfo.value)
    assert message.startswith(f'cannot decode image {bad_path}: ') and '\n' not in message
    with pytest.raises(DatasetError, match='d.jpg'):
        dataset[3]


def test_skip_bad_images_substitutes_next_readable_and_counts(tmp_path, capsys):
    root = write_corrupt_tree(tmp_path / 'tree')
    dataset, _ = datasets.build_dataset(is_train=True, data_set='IMNET', data_path=str(root),
                                        transform=None, skip_bad_images=True)
    reference = ImageFolder(str(root / 'train'))
    good_a = pixels(reference[0][0])
    good_c = pixels(reference[2][0])

    np.testing.assert_array_equal(pixels(dataset[1][0]), good_c)
    np.testing.assert_array_equal(pixels(dataset[1][0]), good_c)
    assert dataset.bad_images == 1
    np.testing.assert_array_equal(pixels(dataset[3][0]), good_a)
    assert dataset.bad_images == 2
    np.testing.assert_array_equal(pixels(dataset[2][0]), good_c)
    assert dataset.bad_images == 2
    with pytest.raises(IndexError):
        dataset[len(dataset)]
    assert [label for _, label in dataset] == [0, 0, 0, 0]

    warnings = capsys.readouterr().err
    assert warnings.count('b.jpg') == 1 and warnings.count('d.jpg') == 1


def test_all_images_bad_is_an_error(tmp_path):
    class_dir = tmp_path / 'train' / 'only'
    class_dir.mkdir(parents=True)
    write_truncated_jpeg(class_dir / 'x.jpg')
    dataset, _ = datasets.build_dataset(is_train=True, data_set='IMNET', data_path=str(tmp_path),
                                        transform=None, skip_bad_images=True)
    with pytest.raises(DatasetError, match='no readable image'):
        dataset[0]


def test_arrow_bad_image_named_and_skipped(tmp_path):
    root = write_corrupt_tree(tmp_path / 'tree')
    datasets.pack_imagefolder(str(root), str(tmp_path / 'packed'))
    strict, _ = datasets.build_dataset(is_train=True, data_set='ARROW', data_path=str(tmp_path / 'packed'),
                                       transform=None)
    with pytest.raises(DatasetError) as excinfo:
        strict[1]
    message = str(excinfo.value)
    assert str(tmp_path / 'packed' / 'train.arrow') in message and 'b.jpg' in message

    lenient, _ = datasets.build_dataset(is_train=True, data_set='ARROW', data_path=str(tmp_path / 'packed'),
                                        transform=None, skip_bad_images=True)
    reference = ImageFolder(str(root / 'train'))
    np.testing.assert_array_equal(pixels(lenient[1][0]), pixels(reference[2][0]))
    np.testing.assert_array_equal(pixels(lenient[3][0]), pixels(reference[0][0]))
    assert lenient.bad_images == 2


# ---------------------------------------------------------------------------
# Arrow packing
# ---------------------------------------------------------------------------

def test_pack_mixed_tree_reads_back_exactly(tmp_path):
    import pyarrow as pa

    source = write_mixed_tree(tmp_path / 'tree')
    counts = datasets.pack_imagefolder(str(source), str(tmp_path / 'packed'), rows_per_batch=2)
    assert counts == {'train': 12, 'val': 5}
    assert sorted(os.listdir(tmp_path / 'packed')) == ['train.arrow', 'val.arrow']

    for split in ('train', 'val'):
        reference = ImageFolder(str(source / split))
        packed, num_classes = datasets.build_dataset(is_train=split == 'train', data_set='ARROW',
                                                     data_path=str(tmp_path / 'packed'), transform=None)
        assert num_classes == 3
        assert packed.classes == reference.classes == ['cat', 'dog', 'emu']
        assert packed.targets == reference.targets
        assert_same_samples(packed, reference)

        with pa.memory_map(str(tmp_path / 'packed' / f'{split}.arrow')) as source_file:
            reader = pa.ipc.open_file(source_file)
            assert reader.num_record_batches == (len(reference) + 1) // 2
            table = reader.read_all()
        assert table.schema.field('label').type == pa.int32()
        assert json.loads(table.schema.metadata[b'classes']) == reference.classes
        raw = table.column('image').to_pylist()
        assert raw == [Path(path).read_bytes() for path, _ in reference.samples]


def test_pack_digits_tree_equals_imagefolder(digits_tree, tmp_path):
    datasets.pack_imagefolder(str(digits_tree), str(tmp_path / 'packed'))
    packed = datasets.ArrowImageDataset(str(tmp_path / 'packed' / 'val.arrow'))
    assert_same_samples(packed, ImageFolder(str(digits_tree / 'val')))


def test_pack_validates_every_split_before_writing(tmp_path):
    (tmp_path / 'tree' / 'train' / 'a').mkdir(parents=True)
    write_good_jpeg(tmp_path / 'tree' / 'train' / 'a' / 'x.jpg', seed=0)
    with pytest.raises(DatasetError, match='val'):
        datasets.pack_imagefolder(str(tmp_path / 'tree'), str(tmp_path / 'packed'))
    assert not (tmp_path / 'packed').exists()


def test_arrow_errors(tmp_path):
    with pytest.raises(DatasetError, match='train.arrow'):
        datasets.build_dataset(is_train=True, data_set='ARROW', data_path=str(tmp_path), transform=None)
    (tmp_path / 'train.arrow').write_bytes(b'not arrow at all')
    with pytest.raises(DatasetError, match='cannot open packed file'):
        datasets.build_dataset(is_train=True, data_set='ARROW', data_path=str(tmp_path), transform=None)


def test_arrow_dataset_pickles_small_and_works_in_worker_processes(tmp_path):
    source = write_mixed_tree(tmp_path / 'tree')
    datasets.pack_imagefolder(str(source), str(tmp_path / 'packed'), rows_per_batch=3)
    transform = datasets.build_transform(is_train=False, input_size=16)
    packed = datasets.ArrowImageDataset(str(tmp_path / 'packed' / 'train.arrow'), transform=transform)
    packed[0]
    assert packed._batches is not None
    state = pickle.loads(pickle.dumps(packed))
    assert state._batches is None
    assert len(pickle.dumps(packed)) < 4096

    # spawn, not fork: the workers really receive the dataset pickled.
    loader = torch.utils.data.DataLoader(packed, batch_size=5, num_workers=2, shuffle=False,
                                         multiprocessing_context=multiprocessing.get_context('spawn'))
    images, labels = zip(*loader)
    images, labels = torch.cat(images), torch.cat(labels)
    reference = ImageFolder(str(source / 'train'), transform=transform)
    assert labels.tolist() == reference.targets
    torch.testing.assert_close(images, torch.stack([reference[index][0] for index in range(len(reference))]))


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def test_cli_pack_and_errors(tmp_path):
    source = write_mixed_tree(tmp_path / 'tree')
    done = run_cli('pack', '--src', str(source), '--dst', str(tmp_path / 'packed'), '--rows-per-batch', '4')
    assert done.returncode == 0, done.stderr
    assert 'train: 12 images' in done.stdout and 'val: 5 images' in done.stdout
    packed = datasets.ArrowImageDataset(str(tmp_path / 'packed' / 'val.arrow'))
    assert_same_samples(packed, ImageFolder(str(source / 'val')))

    missing = tmp_path / 'no-such-tree'
    failed = run_cli('pack', '--src', str(missing), '--dst', str(tmp_path / 'out'))
    assert failed.returncode == 2
    assert failed.stdout == ''
    lines = failed.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: ') and str(missing) in lines[0]
    assert 'Traceback' not in failed.stderr
    assert not (tmp_path / 'out').exists()


def test_cli_export_digits_in_process(tmp_path, capsys):
    assert datasets.main(['export-digits', '--dst', str(tmp_path / 'digits')]) == 0
    assert f'train: {DIGITS_TRAIN_SIZE} images' in capsys.readouterr().out
    assert len(ImageFolder(str(tmp_path / 'digits' / 'val'))) == DIGITS_VAL_SIZE
    assert datasets.main(['export-digits', '--dst', str(tmp_path / 'digits')]) == 2
    assert capsys.readouterr().err.startswith('error: refusing')


def test_pack_unreadable_file_leaves_no_partial_output(tmp_path):
    source = write_mixed_tree(tmp_path / 'tree')
    dangling = source / 'train' / 'dog' / 'zz_missing.jpg'
    dangling.symlink_to(tmp_path / 'nothing-here.jpg')
    with pytest.raises(DatasetError) as excinfo:
        datasets.pack_imagefolder(str(source), str(tmp_path / 'packed'))
    assert str(dangling) in str(excinfo.value)
    assert os.listdir(tmp_path / 'packed') == []
