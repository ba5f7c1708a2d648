"""Helpers shared by tests/test_datasets.py and tests/test_pack_arrow.py (their shared fixture
``digits_tree`` is in tests/conftest.py)."""
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

NUM_DIGITS = 1797
DIGITS_TRAIN_SIZE = 1438
DIGITS_VAL_SIZE = 359


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

