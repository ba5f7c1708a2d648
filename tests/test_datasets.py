"""Tests for datasets.py: transforms, every data set kind and bad images (Arrow packing and the
command line: tests/test_pack_arrow.py)."""
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms
from torchvision.datasets import ImageFolder

from dataset_helpers import (DIGITS_TRAIN_SIZE, DIGITS_VAL_SIZE, NUM_DIGITS, assert_same_samples,
                             pixels, write_corrupt_tree, write_good_jpeg, write_truncated_jpeg)

import datasets
import input_pipeline
from datasets import DatasetError

# sha256 of the validation indices (little-endian int64) sorted by (label, index): pins which
# digits are validation images, for every machine (the set of the first, unshuffled release).
DIGITS_VAL_SET_SHA256 = '6bd7ef13e268b8ba45a298543f5571e07a7ee91cfc871f59b912625c7afa4fac'
# sha256 of the validation indices in the dataset's (shuffled) order: pins the order too.
DIGITS_VAL_ORDER_SHA256 = '282a7d82034ebf69810aaf1a04c6bbe3a540d3174478916d1b2354661d186c05'


def digits_positions(dataset):
    """{load_digits() index: position in ``dataset``} of a DigitsDataset."""
    return {int(index): position for position, index in enumerate(dataset.indices)}


def load_digits_index(path):
    """The load_digits() index in the name of an exported file (``<class>/<index>.png``)."""
    return int(Path(path).stem)


# ---------------------------------------------------------------------------
# DIGITS
# ---------------------------------------------------------------------------

def test_digits_split_is_pinned_stratified_disjoint_and_complete():
    from sklearn.datasets import load_digits

    train_images, train_labels, train_indices = datasets.digits_split(is_train=True)
    val_images, val_labels, val_indices = datasets.digits_split(is_train=False)

    again = datasets.digits_split(is_train=False)
    np.testing.assert_array_equal(again[2], val_indices)
    by_class = val_indices[np.lexsort((val_indices, val_labels))]
    assert hashlib.sha256(np.asarray(by_class, dtype='<i8').tobytes()).hexdigest() == DIGITS_VAL_SET_SHA256
    assert hashlib.sha256(np.asarray(val_indices, dtype='<i8').tobytes()).hexdigest() == DIGITS_VAL_ORDER_SHA256

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


def test_digits_splits_are_a_fixed_shuffle_of_the_same_sets():
    first = {is_train: datasets.digits_split(is_train) for is_train in (True, False)}
    second = {is_train: datasets.digits_split(is_train) for is_train in (True, False)}
    for is_train in (True, False):
        images, labels, indices = first[is_train]
        for part, again in zip((images, labels, indices), second[is_train]):
            np.testing.assert_array_equal(part, again)
        # Not in class order: the first images (first batch, first visualised) mix the digits.
        assert len(set(labels[:10].tolist())) > 1, labels[:10]
        order = list(zip(labels.tolist(), indices.tolist()))
        assert order != sorted(order)
    train_indices, val_indices = first[True][2], first[False][2]
    assert not set(train_indices.tolist()) & set(val_indices.tolist())
    assert len(set(train_indices.tolist())) == DIGITS_TRAIN_SIZE
    assert len(set(val_indices.tolist())) == DIGITS_VAL_SIZE


def test_build_dataset_digits_ignores_path_and_transforms_to_input_size():
    train_set, num_classes = datasets.build_dataset(
        is_train=True, data_set='DIGITS', data_path='/does/not/matter',
        transform=input_pipeline.build_transform(is_train=True, input_size=32))
    val_set, val_classes = datasets.build_dataset(
        is_train=False, data_set='DIGITS', data_path=None,
        transform=input_pipeline.build_transform(is_train=False, input_size=48))
    assert num_classes == val_classes == 10
    assert (len(train_set), len(val_set)) == (DIGITS_TRAIN_SIZE, DIGITS_VAL_SIZE)
    assert train_set.classes == [str(digit) for digit in range(10)]

    digit_of = load_digits_target()
    image, label = train_set[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert label == train_set.targets[0] == digit_of[train_set.indices[0]]
    image, label = val_set[len(val_set) - 1]
    assert image.shape == (3, 48, 48) and label == digit_of[val_set.indices[-1]]

    raw_set, _ = datasets.build_dataset(is_train=False, data_set='DIGITS', data_path=None, transform=None)
    raw_image, _ = raw_set[0]
    assert raw_image.size == (8, 8) and raw_image.mode == 'RGB'


def load_digits_target():
    from sklearn.datasets import load_digits

    return load_digits().target


def test_exported_digits_tree_equals_digits_dataset(digits_tree):
    for is_train, split in ((True, 'train'), (False, 'val')):
        folder = ImageFolder(str(digits_tree / split))
        digits = datasets.DigitsDataset(is_train)
        assert folder.classes == digits.classes
        # The same samples; the tree in ImageFolder's (label, index) order, the dataset shuffled.
        positions = digits_positions(digits)
        order = [positions[load_digits_index(path)] for path, _ in folder.samples]
        assert sorted(order) == list(range(len(digits)))
        assert folder.targets == [digits.targets[position] for position in order]
        assert_same_samples(folder, [digits[position] for position in order])


def test_export_digits_refuses_non_empty_folder(digits_tree):
    with pytest.raises(DatasetError, match='non-empty'):
        datasets.export_digits_imagefolder(str(digits_tree))


# ---------------------------------------------------------------------------
# Transforms
# ---------------------------------------------------------------------------

def test_train_transform_passes_crop_and_flip_settings():
    transform = input_pipeline.build_transform(is_train=True, input_size=64, scale=(0.5, 1.0),
                                         ratio=(0.9, 1.1), hflip=0.0, vflip=0.5)
    crop = transform.transforms[0]
    assert crop.size == (64, 64) and crop.scale == (0.5, 1.0) and crop.ratio == (0.9, 1.1)
    kinds = [type(step).__name__ for step in transform.transforms]
    assert 'RandomVerticalFlip' in kinds and 'RandomHorizontalFlip' not in kinds
    assert 'RandomErasing' in kinds
    image = Image.new('RGB', (100, 80), (200, 10, 10))
    assert transform(image).shape == (3, 64, 64)


def test_small_train_transform_uses_padded_random_crop():
    transform = input_pipeline.build_transform(is_train=True, input_size=32, auto_augment='none', re_prob=0.0)
    first, second = transform.transforms[:2]
    assert isinstance(first, input_pipeline.ResizeIfSmaller)
    assert isinstance(second, transforms.RandomCrop)
    assert second.size == (32, 32) and second.padding == 4
    assert not any('RandAugment' in type(step).__name__ for step in transform.transforms)
    assert transform(Image.new('RGB', (8, 8))).shape == (3, 32, 32)
    assert transform(Image.new('RGB', (32, 32))).shape == (3, 32, 32)


def test_eval_transform_resizes_crops_and_normalises():
    transform = input_pipeline.build_transform(is_train=False, input_size=224)
    resize = transform.transforms[0]
    assert isinstance(resize, transforms.Resize)
    assert resize.size == 256 and resize.interpolation == transforms.InterpolationMode.BICUBIC
    white = transform(Image.new('RGB', (300, 400), (255, 255, 255)))
    assert white.shape == (3, 224, 224)
    expected = (1 - torch.tensor((0.485, 0.456, 0.406))) / torch.tensor((0.229, 0.224, 0.225))
    torch.testing.assert_close(white[:, 100, 100], expected)

    small = input_pipeline.build_transform(is_train=False, input_size=32)
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
    transform = input_pipeline.build_transform(is_train=False, input_size=32)
    dataset, num_classes = datasets.build_dataset(is_train=False, data_set='IMNET',
                                                  data_path=str(digits_tree), transform=transform)
    assert num_classes == 10 and len(dataset) == DIGITS_VAL_SIZE
    digits = datasets.DigitsDataset(is_train=False, transform=transform)
    positions = digits_positions(digits)
    for index in (0, 100, DIGITS_VAL_SIZE - 1):
        image, label = dataset[index]
        expected_image, expected_label = digits[positions[load_digits_index(dataset.samples[index][0])]]
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
