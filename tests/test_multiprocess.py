"""Faults that only show with several processes, under a 2-process torchrun on the CPU (gloo):
a NaN loss on one rank stops every rank at once, ``--visualize_mask`` writes each image once,
named by its dataset index, with or without ``--dist-eval``, and a CNN's BatchNorm statistics
follow rank 0's.

Run: ``python -m pytest -q tests/test_multiprocess.py`` from the repository root.
"""
import hashlib
import json
import re
import sys

import pytest
import timm
import torch

from multiproc import (REPO_ROOT, TINY_RUN, Processes, child_env, run_ok, torchrun, tree_args,
                       write_tree)

sys.path.insert(0, str(REPO_ROOT))

import models_mtvit  # noqa: E402,F401  (registers the MTViT models with timm)
from datasets import digits_split  # noqa: E402

# The NaN appears in the loss of rank 1 at this step of this epoch; --print-freq 1 checks the
# losses at every step, so every rank stops at this very step.
NAN_EPOCH, NAN_STEP = 1, 1
EXIT_WITHIN_S = 10  # a rank left waiting in a collective would wait for the 30-minute timeout

# Runs main.cli on one torchrun process with the criterion made to return NaN on rank 1 at
# (NAN_EPOCH, NAN_STEP); writes what happened (exit status, times, the checkpoint's digest when
# the NaN appeared) to RECORD_rank<r>.json. Output goes to OUT_rank<r>.{out,err}.
NAN_LAUNCHER = '''
import hashlib, json, os, sys, time
rank = int(os.environ['RANK'])
for fd, suffix in ((1, 'out'), (2, 'err')):
    handle = os.open(f'{OUT}_rank{rank}.{suffix}', os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(handle, fd)
    os.close(handle)
sys.stdout.reconfigure(line_buffering=True)
import losses, samplers
record = {'rank': rank}
position = {'epoch': None, 'step': 0}
real_set_epoch, real_forward = samplers.SeededSampler.set_epoch, losses.DistillationLoss.forward

def set_epoch(self, epoch, *args, **kwargs):
    position.update(epoch=epoch, step=0)
    return real_set_epoch(self, epoch, *args, **kwargs)

def forward(self, *args, **kwargs):
    loss = real_forward(self, *args, **kwargs)
    if (position['epoch'], position['step']) == (NAN_EPOCH, NAN_STEP):
        record['injected_at'] = time.time()
        with open(CHECKPOINT, 'rb') as handle:
            record['checkpoint_sha256'] = hashlib.sha256(handle.read()).hexdigest()
        if rank == 1:
            loss = loss * float('nan')
    position['step'] += 1
    return loss

samplers.SeededSampler.set_epoch, losses.DistillationLoss.forward = set_epoch, forward
import main
record['status'] = main.cli()
record['exited_at'] = time.time()
with open(f'{RECORD}_rank{rank}.json', 'w') as handle:
    json.dump(record, handle)
sys.exit(record['status'])
'''


@pytest.fixture(scope='module')
def tree(tmp_path_factory):
    """70 training images (two steps of 16 per process with two processes), 20 validation."""
    return write_tree(tmp_path_factory.mktemp('tree'), 7, 2)


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_nan_on_one_rank_stops_every_rank_at_once(tree, tmp_path):
    out = tmp_path / 'out'
    checkpoint = out / 'checkpoint.pth'
    script = tmp_path / 'nan_launcher.py'
    script.write_text(f'OUT = {str(tmp_path / "log")!r}\nRECORD = {str(tmp_path / "record")!r}\n'
                      f'CHECKPOINT = {str(checkpoint)!r}\nNAN_EPOCH, NAN_STEP = {NAN_EPOCH}, '
                      f'{NAN_STEP}\n' + NAN_LAUNCHER)
    [(status, output)] = Processes([(torchrun(*tree_args(tree), *TINY_RUN, '--epochs', '3',
                                              '--output_dir', out, script=script),
                                     child_env())]).wait()
    assert status == 1, output[-3000:]

    message = (f'main.py: error: loss is nan at epoch {NAN_EPOCH} iteration {NAN_STEP}, '
               f'stopping training')
    for rank in range(2):
        record = json.loads((tmp_path / f'record_rank{rank}.json').read_text())
        err = (tmp_path / f'log_rank{rank}.err').read_text()
        assert record['status'] == 1, err
        assert err.splitlines()[-1] == message, err
        assert 'Traceback' not in err
        assert record['exited_at'] - record['injected_at'] < EXIT_WITHIN_S, record
        # The checkpoint of epoch 0, as it was when the NaN appeared.
        assert sha256(checkpoint) == record['checkpoint_sha256']
    assert torch.load(checkpoint, map_location='cpu', weights_only=True)['epoch'] == NAN_EPOCH - 1
    assert len((out / 'log.txt').read_text().splitlines()) == NAN_EPOCH


# ---------------------------------------------------------------------------------------------
# --visualize_mask under torchrun (needs main.py to pass the validation dataset to visualize)
# ---------------------------------------------------------------------------------------------

N_VISUALIZATION = 6
DIGITS_VAL = 359


@pytest.fixture(scope='module')
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = timm.create_model('deit_tiny_patch16_shrink_base', img_size=32, num_classes=10)
    path = tmp_path_factory.mktemp('checkpoint') / 'checkpoint.pth'
    torch.save({'model': model.state_dict()}, path)
    return path


@pytest.mark.parametrize('dist_eval', [False, True])
def test_visualize_mask_under_torchrun_writes_each_image_once(tiny_checkpoint, tmp_path,
                                                              dist_eval):
    out = tmp_path / 'pictures'
    output = run_ok(torchrun('--data-set', 'DIGITS', '--model', 'deit_tiny_patch16_shrink_base',
                             '--batch-size', '4', '--num_workers', '0', '--device', 'cpu',
                             '--visualize_mask', '--n_visualization', N_VISUALIZATION,
                             '--resume', tiny_checkpoint, '--output_dir', out,
                             *(['--dist-eval'] if dist_eval else [])))
    # Spread evenly over the validation images ordered by class, named by dataset index.
    labels = digits_split(False)[1].tolist()
    by_class = sorted(range(DIGITS_VAL), key=lambda index: (labels[index], index))
    spread = sorted(by_class[(2 * i + 1) * DIGITS_VAL // (2 * N_VISUALIZATION)]
                    for i in range(N_VISUALIZATION))
    files = sorted(path.name for path in out.iterdir())
    inputs = [name for name in files if name.endswith('_input.png')]
    assert inputs == [f'img{index:05d}_input.png' for index in spread]
    stages = {name for name in files if '_stage' in name}
    per_image = len(stages) // N_VISUALIZATION
    assert per_image >= 1 and stages == {f'img{index:05d}_stage{s}.png' for index in spread
                                         for s in range(1, per_image + 1)}
    overviews = [name for name in files if name.endswith('_overview.png')]
    assert len(files) == len(inputs) + len(stages) + len(overviews)
    # Rank 0 (the one that prints) wrote its half only: 3 images and one overview.
    [written] = re.findall(r'visualisation: (\d+) files written', output)
    assert int(written) == N_VISUALIZATION // 2 * (1 + per_image) + 1


# Two training steps of timm's resnet10t under wrap_distributed: different images on each rank,
# then the same images on both. Each forward starts from rank 0's BatchNorm statistics, so after
# the second step the ranks hold the same ones (each its own, without the broadcast). Then only
# rank 0 evaluates a batch (a validation set smaller than the processes): through the DDP wrapper
# its forward would wait for rank 1 in a broadcast of the buffers; so would a compiled DDP model's
# (under --compile).
BUFFERS_SCRIPT = '''
import datetime, sys
import timm, torch, torch.distributed as dist, torch.nn.functional as F
import training
dist.init_process_group('gloo', timeout=datetime.timedelta(seconds=30))
rank = dist.get_rank()
torch.manual_seed(0)
model = training.wrap_distributed(timm.create_model('resnet10t', num_classes=3), torch.device('cpu'))
for seed in (1 + rank, 0):
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    F.cross_entropy(model(images), torch.zeros(4, dtype=torch.long)).backward()
mean = next(buffer for name, buffer in model.module.named_buffers()
            if name.endswith('running_mean')).clone()
gathered = [torch.empty_like(mean) for _ in range(2)]
dist.all_gather(gathered, mean)
print('SAME' if torch.equal(*gathered) else 'DIFFERENT', float((gathered[0] - gathered[1]).abs().max()))
compiled = training.without_ddp(torch.compile(model))
print('UNWRAPPED' if compiled._orig_mod is model.module else 'STILL DDP')
with torch.no_grad():
    if rank == 0:
        for evaluated in (training.without_ddp(model), compiled):
            evaluated.eval()(images)
dist.barrier()
print('EVALUATED')
dist.destroy_process_group()
'''


def test_batch_norm_statistics_follow_rank_0_under_ddp(tmp_path):
    script = tmp_path / 'buffers.py'
    script.write_text(BUFFERS_SCRIPT)
    output = run_ok(torchrun(script=script))
    assert output.count('SAME') == 2 and output.count('EVALUATED') == 2, output[-2000:]
    assert output.count('UNWRAPPED') == 2, output[-2000:]
    assert 'is deprecated' not in output  # PyTorch 2.14's DDP renamed broadcast_buffers


class _HeldByDDP(torch.nn.parallel.DistributedDataParallel):
    """A DDP wrapper without a process group: only the held module, which is all
    ``without_ddp`` reads."""

    def __init__(self, module: torch.nn.Module):
        torch.nn.Module.__init__(self)
        self.module = module


def test_without_ddp_compiles_the_held_model_in_the_wrappers_mode(monkeypatch):
    import training
    calls = []

    def compile_recorded(model, mode=None):
        calls.append((model, mode))
        return model
    monkeypatch.setattr(training.torch, 'compile', compile_recorded)
    held = torch.nn.Linear(2, 2)
    compiled_ddp = torch.nn.Module()
    compiled_ddp._orig_mod = _HeldByDDP(held)  # as torch.compile's wrapper holds its module
    assert training.without_ddp(compiled_ddp, 'reduce-overhead') is held
    assert training.without_ddp(_HeldByDDP(held)) is held
    assert calls == [(held, 'reduce-overhead')]
