"""A stop signal (SIGTERM, or SIGUSR1 that SLURM can send before the time limit) in the middle of
an epoch: the run saves a checkpoint of that step, names it in one line, exits with 128 + the
signal's number, and ``--resume`` from it gives the weights of the run that was never stopped,
for one process and for two under torchrun.

The signal comes from inside the run, at a chosen training step, so that where it lands does not
depend on the machine's speed: the criterion counts its calls and the process signals itself.
"""
import json
import os
import signal
import textwrap

import pytest
import torch

from multiproc import (REPO_ROOT, TINY_RUN, Processes, assert_same_weights, child_env,
                       run_ok, torchrun, tree_args, write_tree)

import losses  # noqa: E402
import main  # noqa: E402

EPOCHS = ['--epochs', '2', '--model-ema', '--model-ema-decay', '0.9', '--print-freq', '2']
ITERS_PER_EPOCH = 5  # 80 training images, batches of 16


@pytest.fixture(scope='module')
def tree(tmp_path_factory):
    """80 training images, 20 validation images."""
    return write_tree(tmp_path_factory.mktemp('tree'), 8, 2)


def load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def signal_at_call(monkeypatch, call, signal_number):
    """The process signals itself during the criterion's ``call``-th call (1-based)."""
    calls = []
    forward = losses.DistillationLoss.forward

    def counting_forward(self, *args):
        calls.append(None)
        if len(calls) == call:
            os.kill(os.getpid(), signal_number)
        return forward(self, *args)

    monkeypatch.setattr(losses.DistillationLoss, 'forward', counting_forward)


@pytest.mark.parametrize('signal_number', [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
def test_stop_signal_mid_epoch_then_exact_resume(tree, tmp_path, monkeypatch, capsys,
                                                 signal_number):
    for name in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK'):
        monkeypatch.delenv(name, raising=False)
    args = [*tree_args(tree), *TINY_RUN, *EPOCHS]
    stopped, full = tmp_path / 'stopped', tmp_path / 'full'
    handler_before = signal.getsignal(signal_number)
    # The signal arrives during epoch 1's step 2 (0-based), not a loss-checking step (every 2):
    # one process stops after that very step.
    signal_at_call(monkeypatch, ITERS_PER_EPOCH + 3, signal_number)
    status = main.cli([*args, '--output_dir', str(stopped)])
    name = signal.Signals(signal_number).name
    assert status == 128 + signal_number
    checkpoint_path = stopped / 'checkpoint.pth'
    assert (f'main.py: stopped by {name} at epoch 1 iteration 3; resume with --resume '
            f'{checkpoint_path}') in capsys.readouterr().err
    checkpoint = load(checkpoint_path)
    assert (checkpoint['epoch'], checkpoint['iteration']) == (0, 3)
    assert len((stopped / 'log.txt').read_text().splitlines()) == 1  # epoch 0 only
    # The previous handler is back: outside training the signal does what it did before.
    assert signal.getsignal(signal_number) == handler_before
    if signal_number != signal.SIGTERM:
        return

    monkeypatch.undo()
    assert main.cli([*args, '--output_dir', str(stopped), '--resume', str(checkpoint_path)]) == 0
    assert 'resumed' in capsys.readouterr().out
    epochs = [json.loads(line) for line in (stopped / 'log.txt').read_text().splitlines()]
    assert [entry.get('train_resumed_at_step') for entry in epochs] == [None, 3]
    assert main.cli([*args, '--output_dir', str(full)]) == 0
    continued, reference = load(checkpoint_path), load(full / 'checkpoint.pth')
    assert continued['epoch'] == reference['epoch'] == 1
    assert continued['iteration'] == 0
    for part in ('model', 'model_ema', 'optimizer'):
        if part == 'optimizer':
            assert continued[part]['state'].keys() == reference[part]['state'].keys()
            assert all(torch.equal(continued[part]['state'][key]['exp_avg'],
                                   reference[part]['state'][key]['exp_avg'])
                       for key in reference[part]['state'])
        else:
            assert_same_weights(continued[part], reference[part])
    assert not torch.equal(reference['model']['head.weight'], reference['model_ema']['head.weight'])


def test_stop_signal_without_output_dir_says_nothing_saved(tree, monkeypatch, capsys):
    for name in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK'):
        monkeypatch.delenv(name, raising=False)
    signal_at_call(monkeypatch, 2, signal.SIGTERM)
    assert main.cli([*tree_args(tree), *TINY_RUN, *EPOCHS]) == 128 + signal.SIGTERM
    assert ('main.py: stopped by SIGTERM at epoch 0 iteration 2; nothing saved (no --output_dir)'
            in capsys.readouterr().err)


def test_ctrl_c_twice_interrupts_at_once_without_saving(tree, tmp_path, monkeypatch, capsys):
    for name in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK'):
        monkeypatch.delenv(name, raising=False)
    calls = []
    forward = losses.DistillationLoss.forward

    def interrupted_twice(self, *args):
        calls.append(None)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # the first only asks to stop after the step
            assert len(calls) == 2
            os.kill(os.getpid(), signal.SIGINT)
        return forward(self, *args)

    monkeypatch.setattr(losses.DistillationLoss, 'forward', interrupted_twice)
    status = main.cli([*tree_args(tree), *TINY_RUN, *EPOCHS, '--output_dir', str(tmp_path)])
    assert status == 128 + signal.SIGINT
    assert capsys.readouterr().err.strip().splitlines()[-1] == 'main.py: interrupted'
    assert len(calls) == 2 and not (tmp_path / 'checkpoint.pth').exists()


LAUNCHER = '''
import os, signal, sys
sys.path.insert(0, {repo!r})
import losses, main
calls = []
forward = losses.DistillationLoss.forward
def counting_forward(self, *args):
    calls.append(None)
    if os.environ['RANK'] == '1' and len(calls) == {call}:
        os.kill(os.getpid(), signal.SIGTERM)
    return forward(self, *args)
losses.DistillationLoss.forward = counting_forward
sys.exit(main.cli())
'''


def test_sigterm_to_one_of_two_torchrun_processes(tree, tmp_path):
    """Only rank 1 gets the signal (a scheduler's signals arrive at different steps): both
    processes stop at the same step, both take part in the save, and the resumed run under
    torchrun ends with the uninterrupted run's weights."""
    launcher = tmp_path / 'launch.py'
    # 40 images per process, batches of 16: 2 steps per epoch; the loss is checked every step
    # (--print-freq 1), where the processes agree to stop. Signal in epoch 1's first step.
    launcher.write_text(textwrap.dedent(LAUNCHER.format(repo=str(REPO_ROOT), call=3)))
    args = [*tree_args(tree), *TINY_RUN, '--epochs', '2', '--model-ema', '--model-ema-decay',
            '0.9']
    stopped, full = tmp_path / 'stopped', tmp_path / 'full'
    [(status, output)] = Processes([(torchrun(*args, '--output_dir', stopped, script=launcher),
                                     child_env())]).wait()
    assert status != 0, output[-3000:]
    expected = (f'main.py: stopped by SIGTERM at epoch 1 iteration 1; resume with --resume '
                f'{stopped / "checkpoint.pth"}')
    assert output.count(expected) == 2, output[-3000:]  # each process says where it stopped
    checkpoint = load(stopped / 'checkpoint.pth')
    assert (checkpoint['epoch'], checkpoint['iteration']) == (0, 1)
    assert len(checkpoint['rng_states']) == 2

    run_ok(torchrun(*args, '--output_dir', stopped, '--resume', stopped / 'checkpoint.pth'))
    run_ok(torchrun(*args, '--output_dir', full))
    continued, reference = load(stopped / 'checkpoint.pth'), load(full / 'checkpoint.pth')
    assert continued['epoch'] == reference['epoch'] == 1
    for part in ('model', 'model_ema'):
        assert_same_weights(continued[part], reference[part])


def test_mid_epoch_checkpoint_needs_the_same_batch_size(tree, tmp_path, monkeypatch, capsys):
    for name in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK'):
        monkeypatch.delenv(name, raising=False)
    args = [*tree_args(tree), *TINY_RUN, *EPOCHS, '--output_dir', str(tmp_path)]
    signal_at_call(monkeypatch, ITERS_PER_EPOCH + 3, signal.SIGTERM)
    assert main.cli(args) == 128 + signal.SIGTERM
    monkeypatch.undo()
    checkpoint = tmp_path / 'checkpoint.pth'
    before = checkpoint.read_bytes()
    capsys.readouterr()
    assert main.cli([*args, '--resume', str(checkpoint), '--batch-size', '8']) == 2
    assert (f'main.py: error: {checkpoint} stopped after 3 steps of epoch 1 with --batch-size 16: '
            f'resume it with the same (not 8)') in capsys.readouterr().err
    assert checkpoint.read_bytes() == before
