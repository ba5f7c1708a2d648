"""Tests for pack_arrow.py: packing ImageFolder trees into Arrow files, reading them back as
``--data-set ARROW``, bad images in packed files, and the command line (also through its
earlier spelling ``python datasets.py``)."""
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
from torchvision.datasets import ImageFolder

from dataset_helpers import (DIGITS_TRAIN_SIZE, DIGITS_VAL_SIZE, REPO_ROOT, assert_same_samples,
                             pixels, write_corrupt_tree, write_good_jpeg, write_mixed_tree)

import datasets
import input_pipeline
import pack_arrow
from datasets import DatasetError


def run_cli(*args, script='pack_arrow.py'):
    """Run ``python SCRIPT ARGS`` in a fresh process; return the completed process."""
    return subprocess.run([sys.executable, str(REPO_ROOT / script), *args],
                          capture_output=True, text=True, timeout=120, cwd=str(REPO_ROOT))


def test_arrow_bad_image_named_and_skipped(tmp_path):
    root = write_corrupt_tree(tmp_path / 'tree')
    pack_arrow.pack_imagefolder(str(root), str(tmp_path / 'packed'))
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
    counts = pack_arrow.pack_imagefolder(str(source), str(tmp_path / 'packed'), rows_per_batch=2)
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
    pack_arrow.pack_imagefolder(str(digits_tree), str(tmp_path / 'packed'))
    packed = datasets.ArrowImageDataset(str(tmp_path / 'packed' / 'val.arrow'))
    assert_same_samples(packed, ImageFolder(str(digits_tree / 'val')))


def test_pack_validates_every_split_before_writing(tmp_path):
    (tmp_path / 'tree' / 'train' / 'a').mkdir(parents=True)
    write_good_jpeg(tmp_path / 'tree' / 'train' / 'a' / 'x.jpg', seed=0)
    with pytest.raises(DatasetError, match='val'):
        pack_arrow.pack_imagefolder(str(tmp_path / 'tree'), str(tmp_path / 'packed'))
    assert not (tmp_path / 'packed').exists()


def test_arrow_errors(tmp_path):
    with pytest.raises(DatasetError, match='train.arrow'):
        datasets.build_dataset(is_train=True, data_set='ARROW', data_path=str(tmp_path), transform=None)
    (tmp_path / 'train.arrow').write_bytes(b'not arrow at all')
    with pytest.raises(DatasetError, match='cannot open packed file'):
        datasets.build_dataset(is_train=True, data_set='ARROW', data_path=str(tmp_path), transform=None)


def test_arrow_dataset_pickles_small_and_works_in_worker_processes(tmp_path):
    source = write_mixed_tree(tmp_path / 'tree')
    pack_arrow.pack_imagefolder(str(source), str(tmp_path / 'packed'), rows_per_batch=3)
    transform = input_pipeline.build_transform(is_train=False, input_size=16)
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
    assert len(lines) == 1 and lines[0].startswith('pack_arrow.py: error: ')
    assert str(missing) in lines[0]
    assert 'Traceback' not in failed.stderr
    assert not (tmp_path / 'out').exists()


def test_cli_export_digits_in_process(tmp_path, capsys):
    assert pack_arrow.main(['export-digits', '--dst', str(tmp_path / 'digits')]) == 0
    assert f'train: {DIGITS_TRAIN_SIZE} images' in capsys.readouterr().out
    assert len(ImageFolder(str(tmp_path / 'digits' / 'val'))) == DIGITS_VAL_SIZE
    assert pack_arrow.main(['export-digits', '--dst', str(tmp_path / 'digits')]) == 2
    assert capsys.readouterr().err.startswith('pack_arrow.py: error: refusing')


def test_cli_earlier_spelling_through_datasets_py(tmp_path):
    source = write_mixed_tree(tmp_path / 'tree')
    done = run_cli('pack', '--src', str(source), '--dst', str(tmp_path / 'packed'), script='datasets.py')
    assert done.returncode == 0, done.stderr
    assert 'train: 12 images' in done.stdout and 'val: 5 images' in done.stdout
    assert pack_arrow.main(['pack', '--src', str(tmp_path / 'missing'), '--dst', str(tmp_path / 'out')]) == 2


def test_pack_unreadable_file_leaves_no_partial_output(tmp_path):
    source = write_mixed_tree(tmp_path / 'tree')
    packed = tmp_path / 'packed'
    pack_arrow.pack_imagefolder(str(source), str(packed))
    before = (packed / 'train.arrow').read_bytes()
    dangling = source / 'train' / 'dog' / 'zz_missing.jpg'
    dangling.symlink_to(tmp_path / 'nothing-here.jpg')
    with pytest.raises(DatasetError) as excinfo:
        pack_arrow.pack_imagefolder(str(source), str(packed))
    assert str(dangling) in str(excinfo.value)
    assert sorted(os.listdir(packed)) == ['train.arrow', 'val.arrow']
    assert (packed / 'train.arrow').read_bytes() == before
