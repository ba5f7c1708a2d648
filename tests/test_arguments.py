"""The command line's own checks, in-process: numbers out of range and unknown names are refused
in one ``main.py: error:`` line naming the flag (exit 2) before any data is read; a training run
never overwrites another run's checkpoint; ``--eval`` needs weights; a resumed run with nothing
left to train says so; a checkpoint file that holds no weights is refused by name."""
import argparse
import math

import pytest
import torch

from multiproc import TINY_RUN, tree_args, write_tree

import main  # noqa: E402
from utils import FRACTION, NON_NEGATIVE_INT, POSITIVE, PROBABILITY, number_in  # noqa: E402

ONE_EPOCH = ['--epochs', '1', '--no-model-ema']


@pytest.fixture(scope='module')
def tree(tmp_path_factory):
    """40 training images, 10 validation images."""
    return write_tree(tmp_path_factory.mktemp('tree'), 4, 1)


def cli_status(argv) -> int:
    """main.cli's exit status, argparse's own exits included."""
    try:
        return main.cli(argv)
    except SystemExit as stop:
        return stop.code


def the_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('main.py: error: '), lines
    return lines[0]


@pytest.mark.parametrize('flags, named', [
    (['--lr', '0'], '--lr'), (['--lr', 'nan'], '--lr'), (['--batch-size', '0'], '--batch-size'),
    (['--lr-noise-pct', '-0.1'], '--lr-noise-pct'),
    (['--batch-size', '15'], '--batch-size 15: Mixup and CutMix pair the images'),
    (['--epochs', '-1'], '--epochs'), (['--clip-grad', '-1'], '--clip-grad'),
    (['--clip-grad', '0'], '--clip-grad'), (['--smoothing', '1'], '--smoothing'),
    (['--hflip', '1.5'], '--hflip'), (['--drop-path', '1'], '--drop-path'),
    (['--opt-betas', '0.9'], '--opt-betas'), (['--num_workers', '-1'], '--num_workers'),
    (['--speed-iterations', '0'], '--speed-iterations'), (['--start_epoch', '-3'], '--start_epoch'),
    (['--sched', 'foo'], '--sched'), (['--sched', 'plateau'], '--sched'), (['--train-interpolation', 'foo'], '--train-interpolation'),
    (['--remode', 'foo'], '--remode'), (['--opt', 'foo'], '--opt foo'),
    (['--aa', 'foo'], '--aa foo'), (['--device', 'foo'], "--device 'foo'"),
    (['--scale', '1', '0.5'], '--scale 1.0 0.5'), (['--ratio', '2', '1'], '--ratio 2.0 1.0'),
    (['--auto-resume'], 'give --output_dir'),
    (['--drop_loc', '3,3'], 'names a block more than once'),
    (['--train-interpolation', 'lanczos'], '--train-interpolation'),
    (['--sched', 'rsqrt', '--epochs', '2'], '--sched rsqrt decays over --decay-epochs 30'),
    (['--compile-mode', 'reduce-overhead'], '--compile-mode reduce-overhead needs --compile'),
    (['--compile', '--compile-mode', 'fast'], '--compile-mode'),
])
def test_a_bad_flag_is_one_line_naming_it(tmp_path, capsys, flags, named):
    status = cli_status([*tree_args(tmp_path / 'no-data'), *TINY_RUN, *flags])
    assert status == 2
    assert named in the_error_line(capsys)


@pytest.mark.parametrize('flags', [
    ['--opt', 'sgd'], ['--opt', 'lookahead_adamw'], ['--sched', 'step'], ['--aa', 'none'],
    ['--aa', 'original'], ['--train-interpolation', 'random'], ['--clip-grad', '1'],
    ['--sched', 'wsd', '--epochs', '4', '--warmup-epochs', '0', '--decay-epochs', '2'],
    ['--batch-size', '1', '--only_test_speed'], ['--batch-size', '3', '--mixup', '0', '--cutmix', '0'],
    ['--compile', '--compile-mode', 'reduce-overhead'],
])
def test_valid_names_and_numbers_pass_the_checks(flags):
    args = main.get_args_parser().parse_args([*TINY_RUN, *flags])
    main.check_args(args)  # raises UsageError otherwise


def test_compile_mode_reaches_torch_compile(tree, monkeypatch):
    modes = []

    def recorded(model, mode=None):
        modes.append(mode)
        return model
    monkeypatch.setattr(main.torch, 'compile', recorded)
    assert cli_status([*tree_args(tree), *TINY_RUN, *ONE_EPOCH, '--compile']) == 0
    assert cli_status([*tree_args(tree), *TINY_RUN, *ONE_EPOCH, '--compile',
                       '--compile-mode', 'reduce-overhead']) == 0
    assert modes == [None, 'reduce-overhead']


def test_number_in_bounds_and_their_open_ends():
    closed, open_both = PROBABILITY, number_in(float, 0, 1, open_low=True, open_high=True, what='x')
    assert (closed('0'), closed('1'), FRACTION('0'), POSITIVE('1e-9')) == (0., 1., 0., 1e-9)
    for parse, text in ((open_both, '0'), (open_both, '1'), (FRACTION, '1'), (POSITIVE, '0'),
                        (closed, 'nan'), (closed, '-inf'), (NON_NEGATIVE_INT, '1.0')):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)
    assert math.isinf(number_in(float, 0, what='x')('inf'))


def test_training_refuses_another_runs_checkpoint_and_auto_resume_continues(tree, tmp_path,
                                                                             capsys):
    run = [*tree_args(tree), *TINY_RUN, *ONE_EPOCH, '--output_dir', str(tmp_path)]
    assert cli_status(run) == 0
    checkpoint = tmp_path / 'checkpoint.pth'
    saved = checkpoint.read_bytes()
    capsys.readouterr()
    for again in (run, [*run, '--finetune', str(checkpoint)], [*run, '--seed', '5']):
        assert cli_status(again) == 2
        line = the_error_line(capsys)
        assert str(checkpoint) in line and '--auto-resume' in line
        assert checkpoint.read_bytes() == saved
    assert cli_status([*run, '--auto-resume']) == 0
    assert 'nothing to train: the run is at epoch 1, --epochs is 1' in capsys.readouterr().out
    assert checkpoint.read_bytes() == saved
    assert cli_status([*run, '--epochs', '2', '--auto-resume']) == 0
    assert 'resumed' in capsys.readouterr().out
    assert torch.load(checkpoint, weights_only=True)['epoch'] == 1  # the second epoch's


def test_an_output_dir_that_is_a_file_is_named_as_such(tree, tmp_path, capsys):
    path = tmp_path / 'a_file'
    path.write_text('kept')
    assert cli_status([*tree_args(tree), *TINY_RUN, *ONE_EPOCH, '--output_dir', str(path)]) == 2
    assert the_error_line(capsys) == f'main.py: error: --output_dir {path} is a file, not a folder'
    assert path.read_text() == 'kept'


def test_eval_needs_weights(tree, capsys):
    assert cli_status([*tree_args(tree), *TINY_RUN, '--eval']) == 2
    assert '--eval needs the weights to evaluate: give --resume' in the_error_line(capsys)


@pytest.mark.parametrize('content, named', [
    ({}, 'holds no model weights'), (None, 'holds a NoneType, not a checkpoint'),
    ([1], 'holds a list, not a checkpoint'), (torch.zeros(2), 'holds a Tensor, not a checkpoint'),
])
def test_a_checkpoint_without_weights_is_refused(tree, tmp_path, capsys, content, named):
    path = tmp_path / 'odd.pth'
    torch.save(content, path)
    assert cli_status([*tree_args(tree), *TINY_RUN, '--eval', '--resume', str(path)]) == 2
    assert f'{path} {named}' in the_error_line(capsys)
