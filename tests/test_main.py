"""End-to-end tests of main.py on the CPU: learning, torchrun with sharded evaluation, finetuning
from DeiT weights, exact resume after a SIGKILL, and the release README's commands through the
deprecated launcher.

Every run uses the embedded DIGITS data (or an ImageFolder tree of it) and small settings so
that the file takes a few minutes on 2 cores. Multi-process runs get OMP_NUM_THREADS=1: two
processes with two threads each on two cores are many times slower.

Run: ``python -m pytest tests/test_main.py -q`` from the repository root.
"""
import glob
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import main as mtvit_main  # noqa: E402
import models_mtvit  # noqa: E402,F401  (registers the models with timm)
from engine import keep_rate_at  # noqa: E402
import checkpoints  # noqa: E402
from checkpoints import CheckpointError  # noqa: E402

RUN_TIMEOUT_S = 900
DIGITS_VAL = 359
DIGITS_TRAIN = 1438

# The learning run (its command is in the README).
LEARN_EPOCHS = 10
LEARN_ITERS = DIGITS_TRAIN // 64
LEARN_SHRINK_START, LEARN_SHRINK_EPOCHS = 2, 6
LEARN_ARGS = ['--data-set', 'DIGITS', '--model', 'deit_tiny_patch16_shrink_base', '--multi-scale',
              '--input-size', '64', '--batch-size', '64', '--epochs', str(LEARN_EPOCHS),
              '--lr', '2e-3', '--warmup-epochs', '2', '--mixup', '0', '--cutmix', '0',
              '--reprob', '0', '--scale', '0.6', '1.0', '--hflip', '0', '--drop-path', '0',
              '--shrink_start_epoch', str(LEARN_SHRINK_START),
              '--shrink_epochs', str(LEARN_SHRINK_EPOCHS), '--no-repeated-aug', '--device', 'cpu',
              '--num_workers', '2']


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def child_env(threads=None):
    env = dict(os.environ)
    for name in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'LOCAL_WORLD_SIZE', 'MASTER_ADDR',
                 'MASTER_PORT', 'GROUP_RANK', 'TORCHELASTIC_RUN_ID'):
        env.pop(name, None)
    if threads is not None:
        env['OMP_NUM_THREADS'] = str(threads)
        env['MKL_NUM_THREADS'] = str(threads)
    env['PYTHONUNBUFFERED'] = '1'
    return env


def free_port():
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def run(cmd, threads=None, timeout=RUN_TIMEOUT_S, cwd=REPO_ROOT):
    """Runs a command to the end; fails the test with its output when it exits non-zero."""
    start = time.time()
    proc = subprocess.run([str(part) for part in cmd], cwd=cwd, env=child_env(threads),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          timeout=timeout)
    elapsed = time.time() - start
    assert proc.returncode == 0, (f'exit {proc.returncode} after {elapsed:.0f}s: {cmd}\n'
                                  f'--- stdout\n{proc.stdout[-4000:]}\n'
                                  f'--- stderr\n{proc.stderr[-4000:]}')
    return proc


def main_py(*args):
    return [sys.executable, 'main.py', *args]


def launcher(module, *args, use_env=True, nproc=2):
    """``python -m torch.distributed.{run,launch} --nproc_per_node=N [--use_env] main.py``."""
    cmd = [sys.executable, '-m', module, f'--nproc_per_node={nproc}', '--master_port',
           str(free_port())]
    if use_env and module == 'torch.distributed.launch':
        cmd.append('--use_env')
    return cmd + ['main.py', *args]


def read_log(output_dir):
    with open(os.path.join(output_dir, 'log.txt')) as handle:
        lines = [line for line in handle.read().splitlines() if line.strip()]
    return [json.loads(line) for line in lines]


def read_tensorboard_scalars(runs_dir):
    """{tag: [(step, value), ...]} from the TFRecord event files under ``runs_dir``.

    No tensorboard reader is installed, so the records are read by hand: each is
    uint64 length, uint32 masked CRC of the length, the serialized Event, uint32 masked CRC.
    """
    from tensorboardX.proto import event_pb2
    files = sorted(glob.glob(os.path.join(runs_dir, '**', 'events.out.tfevents.*'),
                             recursive=True))
    assert files, f'no tensorboard event file under {runs_dir}'
    scalars = {}
    for path in files:
        data = Path(path).read_bytes()
        position = 0
        while position < len(data):
            (length,) = struct.unpack('<Q', data[position:position + 8])
            position += 12
            event = event_pb2.Event()
            event.ParseFromString(data[position:position + length])
            position += length + 4
            for value in event.summary.value:
                if value.WhichOneof('value') == 'simple_value':
                    scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
        assert position == len(data), f'{path}: trailing bytes, not a TFRecord file'
    return scalars


def load_weights_only(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def acc1_lines(stdout):
    """The ``* Acc@1 X`` values printed by engine.evaluate, as strings."""
    return re.findall(r'^\* Acc@1 (\S+)', stdout, flags=re.MULTILINE)


def accuracy_lines(stdout):
    return re.findall(r'Accuracy of the network on the (\d+) test images: (\S+)%', stdout)


def export_digits_tree(root, train_per_class=None, val_per_class=None):
    """``python datasets.py export-digits --dst root``, optionally thinned to a few images per
    class (keeping the file-name order) so that runs on it are short."""
    run([sys.executable, 'datasets.py', 'export-digits', '--dst', root])
    for split, keep in (('train', train_per_class), ('val', val_per_class)):
        if keep is None:
            continue
        for class_dir in sorted(Path(root, split).iterdir()):
            for image in sorted(class_dir.iterdir())[keep:]:
                image.unlink()
    return root


# ---------------------------------------------------------------------------------------------
# 1. Learning: MTViT-T multi-scale at 64x64 on DIGITS with the keep-rate schedule
# ---------------------------------------------------------------------------------------------

def test_learning_digits_multi_scale_with_keep_rate_schedule(tmp_path):
    out = tmp_path / 'learn'
    start = time.time()
    run(main_py(*LEARN_ARGS, '--output_dir', out))
    elapsed = time.time() - start

    log = read_log(out)
    assert [entry['epoch'] for entry in log] == list(range(LEARN_EPOCHS))
    n_parameters = sum(p.numel() for p in mtvit_main.create_model(
        mtvit_main.get_args_parser().parse_args(LEARN_ARGS + ['--output_dir', str(out)]),
        num_classes=10).parameters())
    for entry in log:
        for key in ('train_loss', 'train_lr', 'train_keep_rate', 'test_acc1', 'test_acc5',
                    'test_loss', 'epoch', 'n_parameters'):
            assert key in entry, (key, entry)
        assert entry['n_parameters'] == n_parameters
        assert entry['test_num_samples'] == DIGITS_VAL
        # The logged rate is the one reached at the end of the epoch (SPEC 2).
        end_of_epoch = (entry['epoch'] + 1) * LEARN_ITERS - 1
        assert entry['train_keep_rate'] == pytest.approx(
            keep_rate_at(end_of_epoch, LEARN_ITERS, 0.7, LEARN_SHRINK_START, LEARN_SHRINK_EPOCHS))
    assert log[0]['train_keep_rate'] == 1.0
    assert log[-1]['train_keep_rate'] == pytest.approx(0.7)
    final = log[-1]['test_acc1']
    print(f'\nlearning run: {LEARN_EPOCHS} epochs, val top-1 {final:.2f}% '
          f'(per epoch {[round(e["test_acc1"], 1) for e in log]}), {elapsed:.0f} s')
    assert final >= 85.0, f'val top-1 {final:.2f}% after {LEARN_EPOCHS} epochs'
    assert log[-1]['train_loss'] < log[0]['train_loss']

    scalars = read_tensorboard_scalars(out / 'runs')
    for tag in ('loss', 'lr', 'keep_rate', 'test_acc1', 'test_acc5'):
        assert scalars.get(tag), f'tensorboard scalar {tag} missing: {sorted(scalars)}'
    assert [step for step, _ in scalars['test_acc1']] == list(range(LEARN_EPOCHS))
    assert scalars['test_acc1'][-1][1] == pytest.approx(final, rel=1e-6)
    assert scalars['test_acc5'][-1][1] == pytest.approx(log[-1]['test_acc5'], rel=1e-6)
    for step, value in scalars['keep_rate']:  # steps are global training iterations
        assert value == pytest.approx(keep_rate_at(step, LEARN_ITERS, 0.7, LEARN_SHRINK_START,
                                                   LEARN_SHRINK_EPOCHS), rel=1e-6)
    assert min(value for _, value in scalars['keep_rate']) == pytest.approx(0.7, rel=1e-6)
    assert max(step for step, _ in scalars['loss']) >= (LEARN_EPOCHS - 1) * LEARN_ITERS

    checkpoint = load_weights_only(out / 'checkpoint.pth')
    assert type(checkpoint['args']) is dict
    assert checkpoint['args']['multi_scale'] is True
    assert checkpoint['epoch'] == LEARN_EPOCHS - 1
    for key in ('model', 'optimizer', 'lr_scheduler', 'model_ema', 'scaler', 'rng_states'):
        assert key in checkpoint, key
    assert 'pos_embed_list.1' in checkpoint['model'] and 'pos_embed' not in checkpoint['model']


# ---------------------------------------------------------------------------------------------
# 2. torchrun on 2 CPU processes with --dist-eval, then a single-process --eval
# ---------------------------------------------------------------------------------------------

def test_torchrun_dist_eval_matches_single_process_eval(tmp_path):
    out = tmp_path / 'dist'
    train = run(launcher('torch.distributed.run', '--data-set', 'DIGITS',
                         '--model', 'deit_tiny_patch16_shrink_base', '--multi-scale',
                         '--input-size', '32', '--batch-size', '32', '--epochs', '2',
                         '--shrink_start_epoch', '0', '--shrink_epochs', '1', '--dist-eval',
                         '--device', 'cpu', '--num_workers', '1', '--output_dir', out),
                threads=1)
    dist_acc1 = acc1_lines(train.stdout)
    assert len(dist_acc1) == 2, train.stdout[-3000:]  # one evaluation per epoch, rank 0 only
    assert [n for n, _ in accuracy_lines(train.stdout)] == [str(DIGITS_VAL)] * 2
    assert '| distributed init (rank 0/2, gloo)' in train.stdout + train.stderr
    log = read_log(out)
    assert [entry['epoch'] for entry in log] == [0, 1]
    assert all(entry['test_num_samples'] == DIGITS_VAL for entry in log)  # shards add up
    assert log[1]['train_keep_rate'] == pytest.approx(0.7)
    assert f'{log[1]["test_acc1"]:.3f}' == dist_acc1[-1]

    # No --multi-scale and no --input-size: both come from the checkpoint.
    evaluation = run(main_py('--data-set', 'DIGITS', '--model', 'deit_tiny_patch16_shrink_base',
                             '--batch-size', '32', '--device', 'cpu', '--num_workers', '1',
                             '--eval', '--resume', out / 'checkpoint.pth'))
    assert acc1_lines(evaluation.stdout) == [dist_acc1[-1]]
    assert accuracy_lines(evaluation.stdout) == [(str(DIGITS_VAL),
                                                  f'{float(dist_acc1[-1]):.1f}')]

    # --compile: the same evaluation through torch.compile (the reductions at the checkpoint's
    # keep rate, the sort called rather than compiled); a near-tie may flip one prediction.
    compiled = run(main_py('--data-set', 'DIGITS', '--model', 'deit_tiny_patch16_shrink_base',
                           '--batch-size', '32', '--device', 'cpu', '--num_workers', '1',
                           '--eval', '--compile', '--resume', out / 'checkpoint.pth'))
    [compiled_acc1] = acc1_lines(compiled.stdout)
    assert abs(float(compiled_acc1) - float(dist_acc1[-1])) <= 100 / DIGITS_VAL + 1e-3


# ---------------------------------------------------------------------------------------------
# 3. Finetuning MTViT-T multi-scale at 64x64 from timm DeiT-Tiny weights
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def deit_tiny_checkpoints(tmp_path_factory):
    """A randomly initialised timm deit_tiny_patch16_224 saved as {'model': sd} .pth and as
    .safetensors."""
    import timm
    from safetensors.torch import save_file
    root = tmp_path_factory.mktemp('deit')
    torch.manual_seed(123)
    source = timm.create_model('deit_tiny_patch16_224', pretrained=False)
    state_dict = {key: value.detach().clone().contiguous()
                  for key, value in source.state_dict().items()}
    pth, safetensors = root / 'deit_tiny.pth', root / 'deit_tiny.safetensors'
    torch.save({'model': state_dict}, pth)
    save_file(state_dict, str(safetensors))
    return state_dict, pth, safetensors


def mtvit_tiny_multi_scale_64(num_classes=10, seed=0):
    import timm
    torch.manual_seed(seed)
    return timm.create_model('deit_tiny_patch16_shrink_base', pretrained=False, multi_scale=True,
                             img_size=64, num_classes=num_classes)


def bicubic_pos_embed(pos_embed, side):
    """The class-token entry unchanged; the 14x14 patch grid bicubically resized to side x side."""
    grid = pos_embed[:, 1:].reshape(1, 14, 14, -1).permute(0, 3, 1, 2)
    resized = F.interpolate(grid, size=(side, side), mode='bicubic', align_corners=False)
    return torch.cat([pos_embed[:, :1], resized.permute(0, 2, 3, 1).reshape(1, side * side, -1)],
                     dim=1)


@pytest.mark.parametrize('fmt', ['pth', 'safetensors'])
def test_finetune_start_state_from_deit(deit_tiny_checkpoints, fmt):
    source, pth, safetensors = deit_tiny_checkpoints
    model = mtvit_tiny_multi_scale_64()
    fresh = {key: value.clone() for key, value in model.state_dict().items()}
    checkpoints.finetune_from(model, str(pth if fmt == 'pth' else safetensors))
    loaded = model.state_dict()

    backbone = [key for key in source if key.startswith(('blocks.', 'patch_embed.', 'norm.'))
                or key == 'cls_token']
    assert len(backbone) == 12 * 12 + 2 + 2 + 1
    for key in backbone:
        assert torch.equal(loaded[key], source[key]), key
    assert 'pos_embed' not in loaded
    torch.testing.assert_close(loaded['pos_embed_list.0'], bicubic_pos_embed(source['pos_embed'], 2),
                               rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(loaded['pos_embed_list.1'], bicubic_pos_embed(source['pos_embed'], 4),
                               rtol=1e-6, atol=1e-7)
    # The 1000-class head does not fit 10 classes: it keeps its init, as does the fusion module.
    assert loaded['head.weight'].shape == (10, 192)
    for key in loaded:
        if key.startswith(('head.', 'up.')):
            assert torch.equal(loaded[key], fresh[key]), key


def test_finetune_refuses_checkpoint_without_backbone(deit_tiny_checkpoints, tmp_path):
    source, _, _ = deit_tiny_checkpoints
    partial = {key: value for key, value in source.items() if key != 'blocks.5.mlp.fc1.weight'}
    path = tmp_path / 'partial.pth'
    torch.save({'model': partial}, path)
    with pytest.raises(CheckpointError, match='blocks.5.mlp.fc1.weight'):
        checkpoints.finetune_from(mtvit_tiny_multi_scale_64(), str(path))
    head_only = tmp_path / 'head_only.pth'
    torch.save({'model': {'head.weight': source['head.weight']}}, head_only)
    with pytest.raises(CheckpointError):
        checkpoints.finetune_from(mtvit_tiny_multi_scale_64(), str(head_only))


def test_finetune_one_epoch_keeps_deit_weights(deit_tiny_checkpoints, tmp_path):
    source, _, safetensors = deit_tiny_checkpoints
    out = tmp_path / 'finetune'
    proc = run(main_py('--data-set', 'DIGITS', '--model', 'deit_tiny_patch16_shrink_base',
                       '--multi-scale', '--input-size', '64', '--batch-size', '64', '--epochs', '1',
                       '--lr', '2e-5', '--min-lr', '1e-6', '--weight-decay', '1e-6',
                       '--warmup-epochs', '0', '--shrink_start_epoch', '0', '--shrink_epochs', '0',
                       '--finetune', safetensors, '--device', 'cpu', '--num_workers', '2',
                       '--output_dir', out))
    assert 'finetune from' in proc.stdout
    trained = load_weights_only(out / 'checkpoint.pth')['model']
    fresh = mtvit_tiny_multi_scale_64(seed=7).state_dict()
    for key in source:
        if not key.startswith('blocks.') or not key.endswith('weight') or 'norm' in key:
            continue
        change = (trained[key] - source[key]).norm() / source[key].norm()
        assert change < 0.02, (key, float(change))
        # A randomly initialised model would be far away: the weights were really loaded.
        assert (fresh[key] - source[key]).norm() / source[key].norm() > 1.0
    assert read_log(out)[0]['train_keep_rate'] == pytest.approx(0.7)


# ---------------------------------------------------------------------------------------------
# 4. Exact resume after SIGKILL
# ---------------------------------------------------------------------------------------------

RESUME_ARGS = ['--data-set', 'DIGITS', '--model', 'deit_tiny_patch16_shrink_base',
               '--input-size', '32', '--batch-size', '64', '--epochs', '3',
               '--shrink_start_epoch', '1', '--shrink_epochs', '1', '--model-ema',
               '--model-ema-decay', '0.9', '--device', 'cpu', '--num_workers', '2']


def test_resume_after_sigkill_is_exact(tmp_path, monkeypatch):
    full_dir, killed_dir = tmp_path / 'full', tmp_path / 'killed'
    popen = dict(cwd=REPO_ROOT, env=child_env(threads=1), stdout=subprocess.PIPE,
                 stderr=subprocess.STDOUT, text=True, start_new_session=True)
    # The uninterrupted run and the one to be killed run side by side (one core each).
    full = subprocess.Popen(main_py(*RESUME_ARGS, '--output_dir', str(full_dir)), **popen)
    killed = subprocess.Popen(main_py(*RESUME_ARGS, '--output_dir', str(killed_dir)),
                              stdout=subprocess.DEVNULL, **{k: v for k, v in popen.items()
                                                            if k != 'stdout'})
    try:
        deadline = time.time() + RUN_TIMEOUT_S
        log_path = killed_dir / 'log.txt'
        while True:
            assert killed.poll() is None, 'the run to be killed ended by itself'
            assert time.time() < deadline, 'no epoch-1 checkpoint in time'
            if log_path.exists() and len(log_path.read_text().splitlines()) >= 2:
                break
            time.sleep(0.05)
        os.killpg(killed.pid, signal.SIGKILL)
        killed.wait(timeout=60)
    finally:
        if killed.poll() is None:
            os.killpg(killed.pid, signal.SIGKILL)
            killed.wait()
    assert load_weights_only(killed_dir / 'checkpoint.pth')['epoch'] == 1, \
        'killed too late: epoch 2 already saved'

    resumed = run(main_py(*RESUME_ARGS, '--output_dir', killed_dir,
                          '--resume', killed_dir / 'checkpoint.pth'), threads=1)
    assert 'resumed' in resumed.stdout
    full_out, _ = full.communicate(timeout=RUN_TIMEOUT_S)
    assert full.returncode == 0, full_out[-4000:]

    reference = load_weights_only(full_dir / 'checkpoint.pth')
    continued = load_weights_only(killed_dir / 'checkpoint.pth')
    assert reference['epoch'] == continued['epoch'] == 2
    for part in ('model', 'model_ema'):
        assert reference[part].keys() == continued[part].keys()
        different = [key for key in reference[part]
                     if not torch.equal(reference[part][key], continued[part][key])]
        assert not different, f'{part} differs after resume: {different[:5]}'
    # The EMA really moved away from the model (decay 0.9), so its comparison means something.
    assert not torch.equal(reference['model']['head.weight'], reference['model_ema']['head.weight'])
    assert [e['epoch'] for e in read_log(killed_dir)] == [0, 1, 2]
    assert read_log(killed_dir)[2] == read_log(full_dir)[2]

    # A checkpoint saved without AMP (CPU: empty scaler state) resumes where AMP is on (CUDA).
    real_grad_scaler = torch.amp.GradScaler
    monkeypatch.setattr(torch.amp, 'GradScaler',
                        lambda device, enabled=False: real_grad_scaler(device, enabled=True))
    for name in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK'):
        monkeypatch.delenv(name, raising=False)
    assert mtvit_main.cli([*RESUME_ARGS, '--num_workers', '0', '--output_dir', str(tmp_path / 'amp'),
                           '--resume', str(full_dir / 'checkpoint.pth')]) == 0


# ---------------------------------------------------------------------------------------------
# 5. The release README's commands through the deprecated launcher
# ---------------------------------------------------------------------------------------------

SMALL_RUN = ['--epochs', '1', '--input-size', '64', '--batch-size', '32', '--device', 'cpu']

README_TRAIN_T = ('--model deit_tiny_patch16_shrink_base  --base_keep_rate 0.7 --input-size 224 '
                  '--batch-size 256 --warmup-epochs 5 --shrink_start_epoch 10 --shrink_epochs 100 '
                  '--epochs 300 --dist-eval  --data-path {data} --output_dir {out} --multi-scale')
README_TRAIN_S = ('--model deit_small_patch16_shrink_base  --base_keep_rate 0.7 --input-size 224 '
                  '--batch-size 128 --warmup-epochs 5 --shrink_start_epoch 10 --shrink_epochs 100 '
                  '--epochs 300 --dist-eval  --data-path {data} --output_dir {out} --multi-scale')
README_FINETUNE = ('--model deit_small_patch16_shrink_base  --base_keep_rate 0.7 --input-size 224 '
                   '--sched cosine --lr 2e-5 --min-lr 1e-6 --weight-decay 1e-6 --batch-size 256 '
                   '--shrink_start_epoch 0 --warmup-epochs 0 --shrink_epochs 0  --epochs 30 '
                   '--dist-eval --finetune {checkpoint}  --data-path {data}   --output_dir {out}')
README_EVAL = ('--model deit_small_patch16_shrink_base  --base_keep_rate 0.7 --batch-size 256 '
               '--eval  --resume {checkpoint}  --data-path {data} ')


@pytest.fixture(scope='module')
def small_digits_tree(tmp_path_factory):
    # 13 training images per class: 130 images, 65 per process, 2 batches of 32 each.
    return export_digits_tree(str(tmp_path_factory.mktemp('tree') / 'digits'),
                              train_per_class=13, val_per_class=5)


def test_readme_mtvit_t_training_command(small_digits_tree, tmp_path):
    out = tmp_path / 'train_t'
    proc = run(launcher('torch.distributed.launch',
                        *README_TRAIN_T.format(data=small_digits_tree, out=out).split(),
                        *SMALL_RUN), threads=1)
    assert [n for n, _ in accuracy_lines(proc.stdout)] == ['50']
    checkpoint = load_weights_only(out / 'checkpoint.pth')
    assert checkpoint['args']['multi_scale'] is True and checkpoint['args']['input_size'] == 64
    assert checkpoint['model']['pos_embed_list.0'].shape == (1, 5, 192)
    assert checkpoint['model']['pos_embed_list.1'].shape == (1, 17, 192)
    [entry] = read_log(out)
    assert entry['train_keep_rate'] == 1.0  # --shrink_start_epoch 10: no reduction yet


def test_readme_mtvit_s_train_finetune_eval(small_digits_tree, tmp_path):
    data = small_digits_tree
    train_dir, finetune_dir = tmp_path / 'train', tmp_path / 'finetune'

    # MTViT-S multi-scale training, `--use_env` (LOCAL_RANK in the environment).
    run(launcher('torch.distributed.launch',
                 *README_TRAIN_S.format(data=data, out=train_dir).split(), *SMALL_RUN), threads=1)
    trained = load_weights_only(train_dir / 'checkpoint.pth')
    assert 'pos_embed_list.1' in trained['model']
    assert trained['args']['multi_scale'] is True and trained['args']['local_rank'] is None
    assert [entry['test_num_samples'] for entry in read_log(train_dir)] == [50]

    # Finetuning from that checkpoint, without --use_env: the launcher passes --local-rank.
    run(launcher('torch.distributed.launch',
                 *README_FINETUNE.format(checkpoint=train_dir / 'checkpoint.pth', data=data,
                                         out=finetune_dir).split(), *SMALL_RUN, use_env=False),
        threads=1)
    finetuned = load_weights_only(finetune_dir / 'checkpoint.pth')
    assert finetuned['args']['local_rank'] == 0
    # The multi-scale front end follows the MTViT checkpoint finetuned from.
    assert finetuned['args']['multi_scale'] is True and 'pos_embed_list.1' in finetuned['model']
    torch.testing.assert_close(finetuned['model']['blocks.6.attn.qkv.weight'],
                               trained['model']['blocks.6.attn.qkv.weight'], rtol=0, atol=1e-3)
    assert read_log(finetune_dir)[0]['train_keep_rate'] == pytest.approx(0.7)

    # Evaluation, single process, no --multi-scale, of the multi-scale training checkpoint.
    evaluation = run(main_py(*README_EVAL.format(checkpoint=train_dir / 'checkpoint.pth',
                                                 data=data).split(), *SMALL_RUN))
    [(count, accuracy)] = accuracy_lines(evaluation.stdout)
    assert count == '50'
    assert float(accuracy) == round(accuracy_in_process(trained['model'], data, input_size=64), 1)


def accuracy_in_process(state_dict, data, input_size):
    """Top-1 % of an MTViT-S multi-scale state dict at its configured keep rate (0.7) on
    ``data/val``, computed here without main.py or engine.evaluate (same batches of 32)."""
    import timm
    from torchvision.datasets import ImageFolder

    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    from torchvision import transforms

    from input_pipeline import build_worker_transform
    model = timm.create_model('deit_small_patch16_shrink_base', pretrained=False, multi_scale=True,
                              img_size=input_size, num_classes=10, base_keep_rate=0.7).eval()
    model.load_state_dict(state_dict)
    # main.py's pixels (its uint8 worker transform), normalised here in float32.
    transform = transforms.Compose([build_worker_transform(is_train=False, input_size=input_size),
                                    transforms.ConvertImageDtype(torch.float32),
                                    transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])
    val = ImageFolder(os.path.join(data, 'val'), transform=transform)
    loader = torch.utils.data.DataLoader(val, batch_size=32, shuffle=False)
    with torch.no_grad():
        correct = sum(int((model(images).argmax(dim=1) == labels).sum()) for images, labels in loader)
    return 100.0 * correct / len(val)
