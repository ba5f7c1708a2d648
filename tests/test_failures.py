"""Failures and recovery of main.py.

* Bad input (flags, data, checkpoints) ends the run with a non-zero exit and ONE line on stderr
  naming what is wrong, never a traceback.
* A pickle that needs code outside the allow-list is refused and never executed.
* A run killed (SIGKILL) at any moment, saves included, leaves a loadable checkpoint, and
  ``--resume`` / ``--auto-resume`` continue from the last finished epoch.
* A diverging run (``--lr 1e12``) stops with exit 1 and writes no checkpoint.
* A checkpoint of the original release (args as argparse.Namespace) loads.

Every run is ``main.cli`` in a child process forked from a server that has already imported
main.py (multiprocessing's forkserver with main preloaded), so a run costs no import time; its
stdout and stderr go to files of its own.
"""
import argparse
import glob
import hashlib
import json
import multiprocessing
import os
import pickle
import random
import re
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import models_mtvit  # noqa: E402  (registers the MTViT models with timm)
from datasets import digits_split  # noqa: E402
from checkpoints import load_checkpoint  # noqa: E402
from mtvit_reference import (ref_forward, reference_model, release_optimizer_state,  # noqa: E402
                             release_state_dict)

TINY = ['--model', 'deit_tiny_patch16_shrink_base', '--input-size', '32', '--batch-size', '32',
        '--num_workers', '0', '--device', 'cpu']
RUN_TIMEOUT = 120  # seconds; a run of this file's sizes takes a few

# Executed in the child: its output to files, one thread (two cores, several processes), run.
_CHILD_CODE = '''
import os, sys
for fd, path in ((1, OUT), (2, ERR)):
    handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(handle, fd)
    os.close(handle)
import torch
torch.set_num_threads(1)
sys.stdout.reconfigure(line_buffering=True)  # as `python -u`: lines survive a SIGKILL
import main
sys.exit(main.cli(ARGV))
'''

_context = None


def _mp_context():
    global _context
    if _context is None:
        _context = multiprocessing.get_context('forkserver')
        _context.set_forkserver_preload(['main'])
    return _context


class Run:
    """``main.cli(argv)`` in a child process; stdout/stderr in ``directory/name.{out,err}``."""

    def __init__(self, argv, directory, name):
        self.argv = [str(arg) for arg in argv]
        self.out_path = os.path.join(str(directory), f'{name}.out')
        self.err_path = os.path.join(str(directory), f'{name}.err')
        self.process = _mp_context().Process(
            target=exec, args=(_CHILD_CODE, {'ARGV': self.argv, 'OUT': self.out_path,
                                             'ERR': self.err_path}), daemon=True)
        self.process.start()

    def wait(self, timeout=RUN_TIMEOUT):
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
            raise AssertionError(f'main.py {" ".join(self.argv)} still running after {timeout} s')
        return self.process.exitcode

    def kill(self):
        self.process.kill()  # SIGKILL
        self.process.join()

    @property
    def exitcode(self):
        return self.process.exitcode

    def _read(self, path):
        return open(path).read() if os.path.exists(path) else ''

    @property
    def stdout(self):
        return self._read(self.out_path)

    @property
    def stderr(self):
        return self._read(self.err_path)


def run_main(argv, directory, name, timeout=RUN_TIMEOUT):
    run = Run(argv, directory, name)
    run.wait(timeout)
    return run


def assert_one_line_error(run, *needles, code=2):
    """Exit ``code``; stderr is exactly one ``main.py: error:`` line containing every needle."""
    assert 'Traceback' not in run.stderr + run.stdout, run.stderr
    assert run.exitcode == code, (run.exitcode, run.stderr)
    lines = run.stderr.splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith('main.py: error: '), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def sha256(path):
    with open(path, 'rb') as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def temporaries(directory):
    return glob.glob(os.path.join(str(directory), '.checkpoint.pth.*.tmp'))


def write_tree(root, train_per_class, val_per_class):
    """A small ImageFolder tree of real digits: root/{train,val}/<class>/<index>.png."""
    for split, per_class in (('train', train_per_class), ('val', val_per_class)):
        images, labels, indices = digits_split(split == 'train')
        for label in range(10):
            chosen = np.flatnonzero(labels == label)[:per_class]
            os.makedirs(os.path.join(root, split, str(label)), exist_ok=True)
            for position in chosen:
                Image.fromarray(images[position]).save(
                    os.path.join(root, split, str(label), f'{indices[position]:04d}.png'))
    return str(root)


def tree_args(root):
    return ['--data-set', 'IMNET', '--data-path', str(root)]


# ---------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def tree(tmp_path_factory):
    """70 training images (two batches of 32), 20 validation images."""
    return write_tree(tmp_path_factory.mktemp('tree'), 7, 2)


@pytest.fixture(scope='module')
def tiny_checkpoint(tree, tmp_path_factory):
    """checkpoint.pth of one finished epoch of deit_tiny at 32x32."""
    directory = tmp_path_factory.mktemp('tiny_run')
    run = run_main([*tree_args(tree), *TINY, '--epochs', '1', '--output_dir', directory],
                   directory, 'run')
    assert run.exitcode == 0, run.stderr
    return os.path.join(str(directory), 'checkpoint.pth')


# ---------------------------------------------------------------------------------------------
# 1. Bad input: one line naming the problem, non-zero exit, no traceback
# ---------------------------------------------------------------------------------------------

def test_missing_data_path(tmp_path):
    missing = tmp_path / 'no_such_imagenet'
    run = run_main([*tree_args(missing), *TINY], tmp_path, 'run')
    assert_one_line_error(run, str(missing), 'does not exist')


def test_malformed_data_path(tmp_path):
    data = tmp_path / 'flat'
    data.mkdir()
    Image.new('RGB', (8, 8)).save(data / 'image.png')  # images, but no train/ and val/
    run = run_main([*tree_args(data), *TINY], tmp_path, 'run')
    line = assert_one_line_error(run, str(data), 'missing folder')
    assert re.search(r'/(train|val)\b', line)


def test_unknown_model_lists_mtvit_names(tree, tmp_path):
    run = run_main([*tree_args(tree), *TINY, '--model', 'deit_smol_patch16_shrink_base'],
                   tmp_path, 'run')
    assert_one_line_error(run, '--model', 'deit_smol_patch16_shrink_base',
                          *models_mtvit.MTVIT_MODELS)


def test_use_lmdb_points_to_the_arrow_packing(tree, tmp_path):
    run = run_main([*tree_args(tree), *TINY, '--use-lmdb'], tmp_path, 'run')
    assert_one_line_error(run, '--use-lmdb', 'python pack_arrow.py pack --src SRC --dst DST',
                          '--data-set ARROW')  # pack_arrow.py's own flags (it has no positionals)


@pytest.mark.parametrize('flags, named', [
    (['--aa', 'none'], ['--gpu-augment', '--aa none', 'rand-']),
    (['--input-size', '32'], ['--gpu-augment', '--input-size', '32']),
])
def test_gpu_augment_needs_rand_augment_and_a_resized_crop(tree, tmp_path, flags, named):
    run = run_main([*tree_args(tree), *TINY, '--gpu-augment', *flags], tmp_path, 'run')
    assert_one_line_error(run, *named)


@pytest.mark.parametrize('rate', ['0', '1.5', '-0.3'])
def test_base_keep_rate_outside_range(tree, tmp_path, rate):
    run = run_main([*tree_args(tree), *TINY, '--base_keep_rate', rate], tmp_path, 'run')
    assert_one_line_error(run, '--base_keep_rate', str(float(rate)))


def test_drop_loc_outside_depth(tree, tmp_path):
    run = run_main([*tree_args(tree), *TINY, '--drop_loc', '(3, 6, 12)'], tmp_path, 'run')
    line = assert_one_line_error(run, '--drop_loc', '12', '0..11')
    assert 'deit_tiny_patch16_shrink_base' in line


def test_drop_loc_code_is_rejected_not_evaluated(tree, tmp_path):
    marker = tmp_path / 'evaluated'
    code = f"__import__('os').system('touch {marker}')"
    run = run_main([*tree_args(tree), *TINY, '--drop_loc', code], tmp_path, 'run')
    assert_one_line_error(run, '--drop_loc', 'not a list of block indices')
    assert not marker.exists()


def test_input_size_not_multiple_of_patch(tree, tmp_path):
    run = run_main([*tree_args(tree), *TINY, '--input-size', '40'], tmp_path, 'run')
    assert_one_line_error(run, '--input-size', '40x40', 'patch size 16')


def test_multi_scale_odd_patch_grid(tree, tmp_path):
    run = run_main([*tree_args(tree), *TINY, '--input-size', '48', '--multi-scale'],
                   tmp_path, 'run')
    assert_one_line_error(run, '--multi-scale', 'input size 48x48', '3x3')


def test_corrupt_image_named_then_skipped(tmp_path):
    data = write_tree(tmp_path / 'data', 4, 1)  # 40 training images: one batch of 32
    bad = os.path.join(data, 'train', '3', sorted(os.listdir(os.path.join(data, 'train', '3')))[0])
    content = open(bad, 'rb').read()
    with open(bad, 'wb') as handle:
        handle.write(content[:len(content) // 2])
    # Without repeated augmentation every training image is read in the one epoch, so the bad
    # one is always met.
    argv = [*tree_args(data), *TINY, '--epochs', '1', '--batch-size', '40', '--no-repeated-aug']
    run = run_main(argv, tmp_path, 'strict')
    assert_one_line_error(run, bad, 'cannot decode image')

    run = run_main([*argv, '--skip-bad-images'], tmp_path, 'skip')
    assert run.exitcode == 0, run.stderr
    assert 'Traceback' not in run.stderr
    assert f'skipping bad image: cannot decode image {bad}' in run.stderr
    assert 'Accuracy of the network on the 10 test images' in run.stdout


def test_truncated_checkpoint(tree, tiny_checkpoint, tmp_path):
    truncated = tmp_path / 'truncated.pth'
    content = open(tiny_checkpoint, 'rb').read()
    truncated.write_bytes(content[:len(content) * 2 // 3])
    for flag in ('--resume', '--finetune'):
        run = run_main([*tree_args(tree), *TINY, '--eval', flag, truncated], tmp_path, flag[2:])
        assert_one_line_error(run, str(truncated), 'truncated or corrupt')


def test_foreign_files(tree, tmp_path):
    from safetensors.torch import save_file
    text = tmp_path / 'notes.pth'
    text.write_text('these are not weights\n')
    unrelated = tmp_path / 'unrelated.safetensors'
    save_file({'encoder.layer.0.weight': torch.zeros(4, 4), 'decoder.bias': torch.zeros(4)},
              str(unrelated))
    for index, (path, flag, needle) in enumerate([
            (text, '--resume', 'not a readable PyTorch checkpoint'),
            (text, '--finetune', 'not a readable PyTorch checkpoint'),
            (unrelated, '--resume', 'unexpected: decoder.bias, encoder.layer.0.weight'),
            (unrelated, '--finetune', 'lacks backbone weights cls_token')]):
        run = run_main([*tree_args(tree), *TINY, '--epochs', '1', flag, path], tmp_path,
                       f'run{index}')
        assert_one_line_error(run, str(path), needle)


def test_checkpoint_of_another_model_lists_mismatch(tree, tiny_checkpoint, tmp_path):
    small = [*TINY, '--model', 'deit_small_patch16_shrink_base']
    run = run_main([*tree_args(tree), *small, '--eval', '--resume', tiny_checkpoint],
                   tmp_path, 'resume')
    line = assert_one_line_error(run, tiny_checkpoint, 'does not fit --model '
                                                       'deit_small_patch16_shrink_base (')
    assert 'blocks.0.attn.qkv.weight (576, 192) vs (1152, 384)' in line
    assert line.endswith('; it was saved by --model deit_tiny_patch16_shrink_base')
    run = run_main([*tree_args(tree), *small, '--epochs', '1', '--finetune', tiny_checkpoint],
                   tmp_path, 'finetune')
    line = assert_one_line_error(run, tiny_checkpoint, 'does not fit')
    assert 'blocks.0.attn.qkv.weight (576, 192) vs (1152, 384)' in line
    assert len(line) < 1500


# ---------------------------------------------------------------------------------------------
# 2. A malicious pickle is refused and never executed
# ---------------------------------------------------------------------------------------------

class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


@pytest.mark.parametrize('writer', ['torch.save', 'pickle-2', 'pickle-4', 'pickle-5'])
def test_malicious_pickle_refused(tree, tmp_path, writer):
    """A torch.save zip file, or a bare pickle of any protocol (torch refuses protocols 4 and 5
    before reaching the global: the message still names it)."""
    marker = tmp_path / 'payload_ran'
    evil = tmp_path / 'evil.pth'
    payload = {'model': {'cls_token': _Payload(marker)}, 'epoch': 3}
    if writer == 'torch.save':
        torch.save(payload, evil)
    else:
        with open(evil, 'wb') as handle:
            pickle.dump(payload, handle, protocol=int(writer[-1]))
    for flag in ('--resume', '--finetune'):
        run = run_main([*tree_args(tree), *TINY, '--epochs', '1', flag, evil], tmp_path,
                       flag[2:])
        assert_one_line_error(run, str(evil), 'outside the safe allow-list', 'system')
        assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# 3 and 5. SIGKILL at random moments; --resume and --auto-resume continue
# ---------------------------------------------------------------------------------------------

KILLS_AFTER_FIRST_SAVE = 8
KILL_BUDGET_SECONDS = 120  # a guard against a hang; about 40 s on 2 idle cores


def _wait_for(predicate, timeout, run):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        if run.exitcode is not None:
            return False
        time.sleep(0.005)
    return False


def _check_checkpoint(path, previous_epoch):
    checkpoint = load_checkpoint(path)
    assert {'model', 'optimizer', 'lr_scheduler', 'epoch', 'model_ema', 'scaler',
            'args'} <= set(checkpoint)
    assert isinstance(checkpoint['args'], dict)
    assert checkpoint['epoch'] >= previous_epoch
    for name, tensor in checkpoint['model'].items():
        assert torch.isfinite(tensor).all(), name
    return checkpoint['epoch']


def test_sigkill_at_random_moments_then_resume(tmp_path):
    """deit_small (a 350 MB checkpoint: saving is a large share of each ~1 s epoch), one batch
    per epoch, --epochs 100 --auto-resume, killed again and again: half of the kills as soon
    as a save has started, half at a random moment. After every kill the checkpoint loads, and
    the next run resumes from the epoch after it."""
    rng = random.Random(1234)
    data = write_tree(tmp_path / 'data', 4, 1)  # 40 training images: one batch, 10 val
    out = tmp_path / 'out'
    path = str(out / 'checkpoint.pth')
    argv = [*tree_args(data), *TINY, '--model', 'deit_small_patch16_shrink_base',
            '--epochs', '100', '--output_dir', out, '--auto-resume']
    epoch = -1
    kills = mid_save = resumes = cycle = 0
    started = time.time()
    while kills < KILLS_AFTER_FIRST_SAVE:
        assert time.time() - started < KILL_BUDGET_SECONDS, f'only {kills} kills'
        cycle += 1
        run = Run(argv, tmp_path, f'cycle{cycle}')
        if epoch < 0:  # the first save: kill at a random moment after it
            assert _wait_for(lambda: os.path.exists(path), 60, run), run.stderr
            time.sleep(rng.uniform(0, 1.5))
        elif cycle % 2:  # as soon as a save of this run has begun writing
            own = f'.checkpoint.pth.{run.process.pid}.'
            _wait_for(lambda: any(own in name for name in temporaries(out)), 30, run)
            time.sleep(rng.uniform(0, 0.05))
        else:  # at a random moment after this run has saved once
            mtime = os.path.getmtime(path)
            _wait_for(lambda: os.path.getmtime(path) > mtime, 60, run)
            time.sleep(rng.uniform(0, 1.5))
        assert run.exitcode is None, f'run ended by itself: {run.stderr}'
        run.kill()
        kills += 1
        if any(f'.checkpoint.pth.{run.process.pid}.' in name for name in temporaries(out)):
            mid_save += 1
        previous = epoch
        epoch = _check_checkpoint(path, previous)
        if previous >= 0 and 'resumed' in run.stdout:
            assert f'resumed {path} at epoch {previous + 1}\n' in run.stdout
            resumes += 1
    assert mid_save >= 2, f'{mid_save} kills landed during a save'
    assert resumes >= KILLS_AFTER_FIRST_SAVE // 2

    # --resume (explicitly) continues: one more epoch completes.
    run = run_main([*tree_args(data), *TINY, '--model', 'deit_small_patch16_shrink_base',
                    '--epochs', epoch + 2, '--output_dir', out, '--resume', path],
                   tmp_path, 'final')
    assert run.exitcode == 0, run.stderr
    assert f'resumed {path} at epoch {epoch + 1}\n' in run.stdout
    assert load_checkpoint(path)['epoch'] == epoch + 1
    logged = [json.loads(line)['epoch'] for line in open(out / 'log.txt')]
    assert logged[-1] == epoch + 1 and epoch + 1 >= 2
    # Temporaries of killed saves are cleaned up by the next successful save.
    assert temporaries(out) == []
    print(f'{kills} kills ({mid_save} during a save), {resumes} resumes, reached epoch '
          f'{epoch + 1} in {time.time() - started:.1f} s')


def test_auto_resume_after_kill(tree, tmp_path):
    out = tmp_path / 'out'
    path = str(out / 'checkpoint.pth')
    argv = [*tree_args(tree), *TINY, '--epochs', '50', '--output_dir', out, '--auto-resume']
    run = Run(argv, tmp_path, 'first')
    # Killed once epoch 1 is saved (log.txt is written after the save), at a random point of
    # a later epoch.
    log = out / 'log.txt'
    assert _wait_for(lambda: log.exists() and len(log.read_text().splitlines()) >= 2, 60,
                     run), run.stderr
    time.sleep(random.uniform(0, 0.5))
    run.kill()
    finished = load_checkpoint(path)['epoch']
    assert finished >= 1
    run = run_main([*tree_args(tree), *TINY, '--epochs', finished + 2, '--output_dir', out,
                    '--auto-resume'], tmp_path, 'second')
    assert run.exitcode == 0, run.stderr
    assert f'resumed {path} at epoch {finished + 1}\n' in run.stdout
    assert load_checkpoint(path)['epoch'] == finished + 1
    logged = [json.loads(line)['epoch'] for line in open(out / 'log.txt')]
    assert logged[-1] == finished + 1
    assert logged == sorted(set(logged)), logged  # no epoch trained twice


# ---------------------------------------------------------------------------------------------
# 4. Divergence stops the run without writing non-finite weights
# ---------------------------------------------------------------------------------------------

def test_divergence_stops_and_keeps_good_checkpoint(tree, tmp_path):
    out = tmp_path / 'out'
    # Epochs 0 and 1 run at the warm-up's lr 1e-6 (the schedule steps at each epoch's end, as
    # DeiT's) and are saved; epoch 2 runs at about 1e12 and diverges.
    run = run_main([*tree_args(tree), *TINY, '--epochs', '3', '--lr', '1e12', '--warmup-epochs',
                    '1', '--warmup-lr', '1e-6', '--output_dir', out], tmp_path, 'run')
    line = assert_one_line_error(run, code=1)
    assert re.fullmatch(r'main\.py: error: loss is (nan|inf) at epoch 2 iteration \d+, stopping '
                        r'training', line), line
    saved = torch.load(out / 'checkpoint.pth', map_location='cpu', weights_only=True)
    assert saved['epoch'] == 1
    assert all(torch.isfinite(value).all() for value in saved['model'].values())
    assert temporaries(out) == []
    assert len((out / 'log.txt').read_text().splitlines()) == 2


def test_non_finite_weights_are_never_saved(tmp_path, one_thread):
    from training import TrainingState
    from utils import NonFiniteLossError
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    state = TrainingState(model=model, optimizer=optimizer,
                          lr_scheduler=torch.optim.lr_scheduler.StepLR(optimizer, 1),
                          loss_scaler=torch.amp.GradScaler('cpu', enabled=False))
    path = tmp_path / 'checkpoint.pth'
    state.save(str(path), epoch=0, iteration=0, run_args={'lr': 0.1})
    before = sha256(path)
    with torch.no_grad():
        model.weight[0, 0] = float('nan')
    with pytest.raises(NonFiniteLossError, match=r'weights became non-finite at epoch 1 '
                                                  r'\(weight\)'):
        state.save(str(path), epoch=1, iteration=0, run_args={'lr': 0.1})
    assert sha256(path) == before
    assert load_checkpoint(path)['epoch'] == 0


# ---------------------------------------------------------------------------------------------
# A checkpoint written by the original release
# ---------------------------------------------------------------------------------------------

# The release's MTViT-T multi-scale at 32x32 (grid 2): its keep rates (0.7 at blocks 3, 6, 9).
RELEASE_CONFIG = dict(depth=12, multi_scale=True, dim=192, grid=2, patch=16, classes=10, hidden=768)
RELEASE_HEADS = 3
RELEASE_KEEP_RATES = [1, 1, 1, 0.7, 1, 1, 0.7, 1, 1, 0.7, 1, 1]
# The head is fitted so that the reference classifies the first 15 validation images correctly
# and the last 5 as the next digit: 75%, an accuracy that wrong weights do not reach by chance.
RELEASE_RIGHT = 15
RELEASE_MIN_MARGIN = 0.5


def _reference_logits(state_dict, images):
    """(B, classes) float64 logits of the slow reference (tests/mtvit_reference.py) on images."""
    model = reference_model(state_dict, num_heads=RELEASE_HEADS, keep_rates=RELEASE_KEEP_RATES)
    return ref_forward(model, images.double())[0]


def _release_checkpoint(path, epoch, images, labels):
    """What the release's main.py saved, built from the release's key names and shapes alone
    (not with this project's model): args an argparse.Namespace (its drop_loc a string), AdamW
    state of an older torch, a timm 0.4 cosine scheduler and NativeScaler state, multi-scale
    weights with pos_embed_list. Returns the reference's logits (B, 10) on ``images``."""
    state_dict = release_state_dict(seed=0, **RELEASE_CONFIG)
    dim, classes = RELEASE_CONFIG['dim'], RELEASE_CONFIG['classes']
    # The reference's class-token features: its logits through an identity head.
    features = _reference_logits({**state_dict, 'head.weight': torch.eye(dim, dtype=torch.float64),
                                  'head.bias': torch.zeros(dim, dtype=torch.float64)}, images)
    wanted = torch.cat([labels[:RELEASE_RIGHT], (labels[RELEASE_RIGHT:] + 1) % classes])
    targets = 2 * F.one_hot(wanted, classes).double() - 1
    state_dict['head.weight'] = torch.linalg.lstsq(features, targets).solution.t().float()
    state_dict['head.bias'] = torch.zeros(classes)
    scheduler_state = {
        't_initial': 300, 't_mul': 1.0, 'lr_min': 1e-5, 'decay_rate': 1.0, 'cycle_limit': 1,
        'warmup_t': 5, 'warmup_lr_init': 1e-6, 'warmup_prefix': False, 't_in_epochs': True,
        'warmup_steps': [(3e-5 - 1e-6) / 5] * 2, 'param_group_field': 'lr',
        '_initial_param_group_field': 'initial_lr', 'base_values': [3e-5, 3e-5],
        'metric': None, 'noise_range_t': None, 'noise_pct': 0.67, 'noise_std': 1.0,
        'noise_seed': 42}
    args = argparse.Namespace(
        model='deit_tiny_patch16_shrink_base', input_size=32, multi_scale=True,
        base_keep_rate=0.7, drop_loc='(3, 6, 9)', batch_size=32, epochs=300, lr=5e-4,
        data_set='IMNET', output_dir='/checkpoint/mtvit', device='cuda', seed=0)
    torch.save({'model': state_dict,
                'optimizer': release_optimizer_state(state_dict, lr=3e-5, weight_decay=0.05, seed=1),
                'lr_scheduler': scheduler_state, 'epoch': epoch, 'model_ema': dict(state_dict),
                'scaler': {'scale': 65536.0, 'growth_factor': 2.0, 'backoff_factor': 0.5,
                           'growth_interval': 2000, '_growth_tracker': 0},
                'args': args}, path)
    return _reference_logits(state_dict, images)


@pytest.fixture
def one_thread():
    """Torch on one thread in this process while the test runs (2 cores, children running)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_original_release_checkpoint_loads(tree, tmp_path, one_thread):
    from torchvision.datasets import ImageFolder

    from input_pipeline import build_transform
    val = ImageFolder(os.path.join(tree, 'val'), transform=build_transform(is_train=False, input_size=32))
    images = torch.stack([image for image, _ in val])
    labels = torch.tensor(val.targets)
    release = tmp_path / 'release_checkpoint.pth'
    logits = _release_checkpoint(release, epoch=4, images=images, labels=labels)
    top2 = logits.topk(2, dim=1).values
    assert (top2[:, 0] - top2[:, 1]).min() > RELEASE_MIN_MARGIN  # float32 cannot flip a prediction
    expected = 100.0 * (logits.argmax(dim=1) == labels).double().mean().item()
    assert expected == 100.0 * RELEASE_RIGHT / len(val)

    # The checkpoint through this project's loader and model gives the reference's logits.
    import timm
    from checkpoints import load_weights, model_state_dict
    model = timm.create_model('deit_tiny_patch16_shrink_base', num_classes=10, img_size=32,
                              multi_scale=True).eval()
    load_weights(model, model_state_dict(load_checkpoint(release), str(release)), str(release))
    with torch.no_grad():
        torch.testing.assert_close(model(images).double(), logits, rtol=0, atol=1e-4)

    # --eval: no --input-size or --multi-scale given, both come from the checkpoint.
    run = run_main([*tree_args(tree), '--model', 'deit_tiny_patch16_shrink_base',
                    '--batch-size', '32', '--num_workers', '0', '--device', 'cpu', '--eval',
                    '--resume', release], tmp_path, 'eval')
    assert run.exitcode == 0, run.stderr
    assert f'Accuracy of the network on the {len(val)} test images: {expected:.1f}%' in run.stdout

    # --resume: training continues at the epoch after the release's.
    out = tmp_path / 'out'
    run = run_main([*tree_args(tree), '--model', 'deit_tiny_patch16_shrink_base',
                    '--batch-size', '32', '--num_workers', '0', '--device', 'cpu',
                    '--epochs', '6', '--resume', release, '--output_dir', out],
                   tmp_path, 'resume')
    assert run.exitcode == 0, run.stderr
    assert f'resumed {release} at epoch 5' in run.stdout
    resumed = load_checkpoint(out / 'checkpoint.pth')
    assert resumed['epoch'] == 5
    assert resumed['args']['multi_scale'] is True and resumed['args']['input_size'] == 32
    assert 'pos_embed_list.1' in resumed['model']
