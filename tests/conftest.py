"""Fixtures shared by several test files."""
import pytest

from dataset_helpers import DIGITS_TRAIN_SIZE, DIGITS_VAL_SIZE


@pytest.fixture(scope='session')
def digits_tree(tmp_path_factory):
    """The digits exported once as an ImageFolder tree (shared: writing 1,797 PNGs takes a moment)."""
    import datasets

    root = tmp_path_factory.mktemp('digits')
    counts = datasets.export_digits_imagefolder(str(root))
    assert counts == {'train': DIGITS_TRAIN_SIZE, 'val': DIGITS_VAL_SIZE}
    return root
