"""Faults of the machine, not of the input: a full disk during a save, an unwritable output
folder, a data-loader worker killed by the system. Each ends in one ``main.py: error:`` line and
a non-zero exit status, without a traceback unless --debug asks for one, and the last complete
checkpoint stays loadable."""
import errno
import os
import signal
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import checkpoints  # noqa: E402
import main  # noqa: E402
import utils  # noqa: E402

TINY_RUN = ['--data-set', 'DIGITS', '--model', 'deit_tiny_patch16_shrink_base',
            '--input-size', '32', '--batch-size', '64', '--epochs', '2', '--num_workers', '0',
            '--device', 'cpu', '--no-model-ema', '--print-freq', '100']


@pytest.fixture(autouse=True)
def _no_process_group(monkeypatch):
    for name in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK'):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv(main.DEBUG_ENV, raising=False)


def _one_error_line(err: str) -> str:
    assert 'Traceback' not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith('main.py: error: '), err
    return lines[0]


def _full_disk_at_second_save(monkeypatch):
    """torch.save fails as it does on a full disk (its RuntimeError caused by ENOSPC), from the
    second checkpoint on."""
    real_save = torch.save
    calls = []

    def save(obj, handle, *args, **kwargs):
        calls.append(1)
        if len(calls) < 2:
            return real_save(obj, handle, *args, **kwargs)
        handle.write(b'partial')
        try:
            raise OSError(errno.ENOSPC, 'No space left on device')
        except OSError as cause:
            raise RuntimeError('[enforce fail at inline_container.cc:672] . unexpected pos '
                               '64 vs 0') from cause
    monkeypatch.setattr(checkpoints.torch, 'save', save)


def test_full_disk_during_a_save_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    _full_disk_at_second_save(monkeypatch)
    out = tmp_path / 'out'
    status = main.cli([*TINY_RUN, '--output_dir', str(out)])
    line = _one_error_line(capsys.readouterr().err)
    assert status == 1
    path = str(out / main.CHECKPOINT_NAME)
    assert path in line and 'no space left' in line and 'MB free' in line, line
    assert 'previous checkpoint there is intact' in line
    assert checkpoints.load_checkpoint(path)['epoch'] == 0
    assert sorted(os.listdir(out)) == ['checkpoint.pth', 'log.txt', 'runs']  # no temporary left


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    _full_disk_at_second_save(monkeypatch)
    with pytest.raises(utils.MachineError, match='no space left'):
        main.cli([*TINY_RUN, '--output_dir', str(tmp_path / 'out'), '--debug'])


def test_unwritable_output_folder_stops_before_anything(tmp_path, capsys):
    blocker = tmp_path / 'a_file'
    blocker.write_text('not a folder')
    status = main.cli([*TINY_RUN, '--output_dir', str(blocker / 'out')])
    line = _one_error_line(capsys.readouterr().err)
    assert status == 2
    assert f'--output_dir {blocker / "out"} is not writable' in line, line


def test_read_only_output_folder(tmp_path, monkeypatch, capsys):
    # Root may write anywhere, so the refusal of a read-only folder is played by the file system.
    def refuse(*args, **kwargs):
        raise PermissionError(errno.EROFS, 'Read-only file system')
    monkeypatch.setattr(utils.tempfile, 'TemporaryFile', refuse)
    status = main.cli([*TINY_RUN, '--output_dir', str(tmp_path)])
    line = _one_error_line(capsys.readouterr().err)
    assert status == 2
    assert line == f'main.py: error: --output_dir {tmp_path} is not writable: Read-only file system'


def test_low_free_space_warns(tmp_path, capsys):
    utils.warn_if_low_space(str(tmp_path), checkpoint_bytes=10 ** 15)
    out = capsys.readouterr().out
    assert f'warning: --output_dir {tmp_path} has ' in out
    assert 'less than two checkpoints (953674316 MB each)' in out, out
    utils.warn_if_low_space(str(tmp_path), checkpoint_bytes=1)
    assert capsys.readouterr().out == ''


class _KillsItsWorker(torch.utils.data.Dataset):
    """What the kernel's out-of-memory killer does to a loader worker."""

    def __len__(self):
        return 64

    def __getitem__(self, index):
        os.kill(os.getpid(), signal.SIGKILL)


def test_killed_data_loader_worker(tmp_path, monkeypatch, capsys):
    loader = torch.utils.data.DataLoader(_KillsItsWorker(), batch_size=8, num_workers=1)
    monkeypatch.setattr(main, 'build_loaders', lambda args, dist_state, train: (loader, loader, 10))
    status = main.cli([*TINY_RUN, '--output_dir', str(tmp_path / 'out')])
    line = _one_error_line(capsys.readouterr().err)
    assert status == 1
    assert line.startswith('main.py: error: data-loader worker (pid '), line
    # PyTorch reports a SIGKILLed worker as 'exited unexpectedly' or 'is killed by signal: Killed'
    assert 'if the system killed it (out of memory?), use fewer --num_workers' in line, line


def test_other_worker_deaths_are_not_called_out_of_memory():
    message = utils.machine_error_message(RuntimeError(
        'DataLoader worker (pid 4242) is killed by signal: Segmentation fault. '))
    assert message == ('data-loader worker (pid 4242) is killed by signal: Segmentation fault; '
                       '--num_workers 0 shows an error of its own in the main process')
    killed = utils.machine_error_message(RuntimeError(
        'DataLoader worker (pid 7) is killed by signal: Killed. '))
    assert killed == ('data-loader worker (pid 7) is killed by signal: Killed; if the system '
                      'killed it (out of memory?), use fewer --num_workers or a smaller '
                      '--batch-size')


def test_bugs_still_show_their_traceback():
    assert utils.machine_error_message(RuntimeError('shape mismatch in my code')) is None
    assert utils.machine_error_message(OSError('no file name')) is None
    assert utils.machine_error_message(
        PermissionError(errno.EACCES, 'Permission denied', '/data/x.jpg')
    ) == 'Permission denied (/data/x.jpg)'
