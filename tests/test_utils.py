import argparse
import builtins
import errno
import json
import math
import os
import pickle
import random
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
# Plain `pytest` (unlike `python -m pytest`) does not put the repository on sys.path.
sys.path.insert(0, str(REPO_ROOT))

import atomic_write  # noqa: E402
import checkpoints  # noqa: E402
import utils  # noqa: E402

DIST_TIMEOUT_S = 90


@pytest.fixture
def no_launcher_env(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)


# ----------------------------------------------------------------------------
# Distributed helpers
# ----------------------------------------------------------------------------

def test_rank_helpers_without_process_group():
    assert not utils.is_dist_initialized()
    assert utils.get_rank() == 0
    assert utils.get_world_size() == 1
    assert utils.is_main_process()
    utils.barrier()
    x = torch.tensor([1.5, -2.0])
    assert torch.equal(utils.all_reduce_sum(x), x)
    logger = utils.MetricLogger(device="cpu")
    logger.update(loss=2.0)
    logger.synchronize_between_processes()
    assert logger.loss.global_avg == 2.0


def test_init_distributed_single_process(no_launcher_env, capsys):
    original_print = builtins.print
    try:
        state = utils.init_distributed("cpu")
        assert state == utils.DistState(distributed=False, rank=0, world_size=1, local_rank=0,
                                        device=torch.device("cpu"), backend=None)
        assert not utils.is_dist_initialized()
        print("visible", force=True)
        print("also visible")
    finally:
        utils.cleanup()
    assert builtins.print is original_print
    out = capsys.readouterr().out
    assert "visible\n" in out and "also visible\n" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_init_distributed_falls_back_to_cpu_without_cuda(no_launcher_env):
    try:
        with pytest.warns(UserWarning, match="CUDA is not available"):
            state = utils.init_distributed("cuda")
    finally:
        utils.cleanup()
    assert state.device == torch.device("cpu")
    assert not state.distributed


WORKER = r"""
import json
import sys

import torch

import utils

local_rank_arg = int(sys.argv[1]) if len(sys.argv) > 1 else None
state = utils.init_distributed("cpu", local_rank=local_rank_arg)
rank = utils.get_rank()
logger = utils.MetricLogger(device=state.device)
for value in ([1.0, 2.0, 3.0] if rank == 0 else [10.0]):
    logger.update(loss=value)
logger.meters["acc"].update(50.0 + rank, n=4 if rank == 0 else 1)
local_window_median = logger.loss.median
logger.synchronize_between_processes()
mean = utils.all_reduce_sum(torch.tensor([float(rank), 2.0 * rank])) / utils.get_world_size()
print("line-from-rank", rank)
utils.barrier()
print("RESULT " + json.dumps({
    "rank": rank, "world_size": utils.get_world_size(), "state_rank": state.rank,
    "state_world": state.world_size, "local_rank": state.local_rank,
    "backend": state.backend, "distributed": state.distributed,
    "is_main": utils.is_main_process(),
    "loss_count": logger.loss.count, "loss_global_avg": logger.loss.global_avg,
    "loss_median": logger.loss.median, "local_window_median": local_window_median,
    "acc_count": logger.acc.count, "acc_global_avg": logger.acc.global_avg,
    "mean": mean.tolist(),
}), force=True)
utils.cleanup()
"""


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_process_gloo_group(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    base_env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
                    WORLD_SIZE="2", PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    for name in ("RANK", "LOCAL_RANK"):
        base_env.pop(name, None)
    # Rank 0 is started like torchrun (LOCAL_RANK in the environment); rank 1 like the
    # deprecated launcher without --use_env (local rank passed as an argument).
    launches = [
        ([sys.executable, str(script)], dict(base_env, RANK="0", LOCAL_RANK="0")),
        ([sys.executable, str(script), "1"], dict(base_env, RANK="1")),
    ]
    procs = [subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for cmd, env in launches]
    outputs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=DIST_TIMEOUT_S)
            assert proc.returncode == 0, err
            outputs.append(out)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()

    results = []
    for out in outputs:
        lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
        assert len(lines) == 1, out
        results.append(json.loads(lines[0][len("RESULT "):]))

    for expected_rank, res in enumerate(results):
        assert res["rank"] == res["state_rank"] == expected_rank
        assert res["world_size"] == res["state_world"] == 2
        assert res["local_rank"] == expected_rank
        assert res["backend"] == "gloo" and res["distributed"]
        assert res["is_main"] == (expected_rank == 0)
        # Global averages are exact over both processes: (1+2+3+10)/4 and (50*4+51)/5.
        assert res["loss_count"] == 4
        assert res["loss_global_avg"] == 4.0
        assert res["acc_count"] == 5
        assert res["acc_global_avg"] == pytest.approx(251.0 / 5, abs=1e-12)
        assert res["mean"] == [0.5, 1.0]
        # Window statistics stay local.
        assert res["loss_median"] == res["local_window_median"]
    assert results[0]["local_window_median"] == 2.0
    assert results[1]["local_window_median"] == 10.0

    assert "line-from-rank 0" in outputs[0]
    assert "line-from-rank 1" not in outputs[1]


# ----------------------------------------------------------------------------
# Logging
# ----------------------------------------------------------------------------

def test_smoothed_value_statistics():
    meter = utils.SmoothedValue(window_size=3)
    for value in [10.0, 1.0, 2.0, 3.0]:
        meter.update(value)
    meter.update(5.0, n=2)
    # Window holds 2, 3, 5; the global average counts 5.0 twice.
    assert meter.median == 3.0
    assert meter.avg == pytest.approx(10.0 / 3)
    assert meter.max == 5.0
    assert meter.value == 5.0
    assert meter.count == 6
    assert meter.global_avg == pytest.approx(26.0 / 6)
    assert str(meter) == f"3.0000 ({26.0 / 6:.4f})"
    assert math.isnan(utils.SmoothedValue().global_avg)


def test_metric_logger_log_every_prints_progress(capsys):
    logger = utils.MetricLogger(device=torch.device("cpu"), delimiter="  ")
    logger.add_meter("lr", utils.SmoothedValue(window_size=1, fmt="{value:.6f}"))
    seen = []
    for item in logger.log_every(list(range(5)), print_freq=2, header="Epoch: [0]"):
        logger.update(loss=torch.tensor(float(item)), lr=0.001)
        seen.append(item)
    assert seen == [0, 1, 2, 3, 4]
    lines = capsys.readouterr().out.strip().splitlines()
    progress = [line for line in lines if "eta:" in line]
    # Printed at iterations 0, 2 and the last one (4).
    assert [line.split("]")[1].split("[")[1] for line in progress] == ["0/5", "2/5", "4/5"]
    assert all("loss:" in line and "lr: 0.001000" in line and "time:" in line
               and "data:" in line and "max mem" not in line for line in progress)
    assert lines[-1].startswith("Epoch: [0] Total time:")
    assert logger.loss.global_avg == 2.0
    with pytest.raises(AttributeError):
        getattr(logger, "does_not_exist")


# ----------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------

def test_save_checkpoint_atomic_roundtrip(tmp_path):
    path = tmp_path / "checkpoint.pth"
    checkpoints.save_checkpoint_atomic({"epoch": 1, "w": torch.arange(4.0)}, path)
    checkpoints.save_checkpoint_atomic({"epoch": 2, "w": torch.arange(3.0)}, path)
    loaded = checkpoints.load_checkpoint(path)
    assert loaded["epoch"] == 2
    assert torch.equal(loaded["w"], torch.arange(3.0))
    assert os.listdir(tmp_path) == ["checkpoint.pth"]


@pytest.mark.parametrize("exception", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_crash_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch, exception):
    path = tmp_path / "checkpoint.pth"
    checkpoints.save_checkpoint_atomic({"epoch": 7, "w": torch.ones(3)}, path)

    def crashing_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 partial checkpoint bytes")
        raise exception

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(type(exception)):
        checkpoints.save_checkpoint_atomic({"epoch": 8, "w": torch.zeros(3)}, path)
    monkeypatch.undo()

    assert os.listdir(tmp_path) == ["checkpoint.pth"]
    loaded = checkpoints.load_checkpoint(path)
    assert loaded["epoch"] == 7
    assert torch.equal(loaded["w"], torch.ones(3))


def test_save_checkpoint_only_on_main_process(tmp_path, monkeypatch):
    monkeypatch.setattr(utils, "get_rank", lambda: 1)
    checkpoints.save_checkpoint_atomic({"epoch": 1}, tmp_path / "checkpoint.pth")
    assert os.listdir(tmp_path) == []


def test_load_checkpoint_with_namespace_args(tmp_path):
    path = tmp_path / "release.pth"
    args = argparse.Namespace(model="deit_small_patch16_shrink_base", lr=5e-4,
                              drop_loc="(3, 6, 9)", input_size=224, multi_scale=False)
    torch.save({"model": {"w": torch.ones(2)}, "epoch": 299, "args": args}, path)
    loaded = checkpoints.load_checkpoint(path)
    assert loaded["args"] == {"model": "deit_small_patch16_shrink_base", "lr": 5e-4,
                              "drop_loc": "(3, 6, 9)", "input_size": 224,
                              "multi_scale": False}
    assert type(loaded["args"]) is dict
    assert loaded["epoch"] == 299
    assert torch.equal(loaded["model"]["w"], torch.ones(2))


def test_load_truncated_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": {"w": torch.randn(64, 64)}}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(checkpoints.CheckpointError) as info:
        checkpoints.load_checkpoint(path)
    message = str(info.value)
    assert message.startswith(f"{path} is not a readable PyTorch checkpoint "
                              "(truncated or corrupt?): ")
    assert "\n" not in message


@pytest.mark.parametrize("content", [b"", b"this is not a checkpoint"])
def test_load_garbage_file(tmp_path, content):
    path = tmp_path / "garbage.pth"
    path.write_bytes(content)
    with pytest.raises(checkpoints.CheckpointError, match="is not a readable PyTorch checkpoint"):
        checkpoints.load_checkpoint(path)


class _CreatesMarker:
    """Unpickling this calls open(marker, 'w'), i.e. runs code from the file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("zip_format", [True, False])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, zip_format):
    probe_marker = tmp_path / "probe_marker"
    # The payload is live: plain unpickling would create the marker file.
    pickle.loads(pickle.dumps(_CreatesMarker(probe_marker))).close()
    assert probe_marker.exists()

    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.ones(1)}, "payload": _CreatesMarker(marker)}, path,
               _use_new_zipfile_serialization=zip_format)
    with pytest.raises(checkpoints.CheckpointError) as info:
        checkpoints.load_checkpoint(path)
    assert str(info.value) == (f"refusing to load {path}: it needs code outside the safe "
                               "allow-list (io.open)")
    assert not marker.exists()


def test_load_safetensors(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "deit.safetensors"
    state = {"cls_token": torch.randn(1, 1, 8), "head.weight": torch.randn(3, 8)}
    save_file(state, str(path))
    loaded = checkpoints.load_checkpoint(path)
    assert set(loaded) == {"model"}
    assert set(loaded["model"]) == set(state)
    for key, value in state.items():
        assert torch.equal(loaded["model"][key], value)


def test_load_truncated_safetensors(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "deit.safetensors"
    save_file({"w": torch.randn(32, 32)}, str(path))
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(checkpoints.CheckpointError, match="is not a readable safetensors file"):
        checkpoints.load_checkpoint(path)


def test_load_missing_file(tmp_path):
    path = tmp_path / "nowhere.pth"
    with pytest.raises(checkpoints.CheckpointError) as info:
        checkpoints.load_checkpoint(path)
    assert str(info.value) == f"checkpoint {path} does not exist"


def _draws():
    return ([random.random() for _ in range(3)] + [random.gauss(0.0, 1.0)],
            np.random.standard_normal(3).tolist() + np.random.rand(2).tolist(),
            torch.randn(4).tolist() + torch.randint(0, 1000, (3,)).tolist())


def test_rng_state_roundtrip_through_checkpoint(tmp_path):
    utils.seed_everything(123)
    # Leave cached Gaussians in python's and numpy's generators so they are saved too.
    random.gauss(0.0, 1.0)
    np.random.standard_normal()
    path = tmp_path / "checkpoint.pth"
    checkpoints.save_checkpoint_atomic({"rng_state": utils.get_rng_state()}, path)
    expected = _draws()

    utils.seed_everything(999)
    assert _draws() != expected
    utils.set_rng_state(checkpoints.load_checkpoint(path)["rng_state"])
    assert _draws() == expected


def test_seed_everything_depends_on_rank():
    assert utils.seed_everything(5, rank=2) == 7
    first = _draws()
    utils.seed_everything(7)
    assert _draws() == first
    utils.seed_everything(5, rank=3)
    assert _draws() != first


def test_check_finite():
    utils.check_finite(1.25, epoch=0, iteration=0)
    utils.check_finite(torch.tensor(0.5), epoch=0, iteration=1)
    with pytest.raises(utils.NonFiniteLossError) as info:
        utils.check_finite(float("nan"), epoch=3, iteration=17)
    assert str(info.value) == "loss is nan at epoch 3 iteration 17, stopping training"
    with pytest.raises(utils.NonFiniteLossError, match="loss is inf at epoch 1 iteration 2"):
        utils.check_finite(torch.tensor(float("inf")), epoch=1, iteration=2)



# ----------------------------------------------------------------------------
# Replacing files (atomic_write)
# ----------------------------------------------------------------------------

HEXES = '0123456789abcdef' * 2


def test_replacing_renames_on_success_and_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / 'model.onnx'
    target.write_bytes(b'old')
    stale_file = tmp_path / f'.model.onnx.999999999.{HEXES}.tmp'  # an earlier version's
    stale_file.write_bytes(b'left by a killed writer')
    stale_folder = tmp_path / f'.model.onnx.{2 ** 70}.{HEXES}.tmp'  # no system's pid
    stale_folder.mkdir()
    (stale_folder / 'model.onnx').write_bytes(b'half')
    other = tmp_path / f'.other.onnx.999999999.{HEXES}.tmp'  # another file's: not touched
    other.write_bytes(b'')
    with pytest.raises(OSError) as failure:
        with atomic_write.replacing(target) as staged:
            assert os.path.basename(staged) == 'model.onnx'
            assert os.path.dirname(os.path.dirname(staged)) == str(tmp_path)
            Path(staged).write_bytes(b'half')
            raise OSError(28, 'No space left on device', staged)
    assert (failure.value.filename, failure.value.strerror) == (
        str(target), f'No space left on device; {target} is as it was')
    assert target.read_bytes() == b'old'
    assert sorted(os.listdir(tmp_path)) == sorted([target.name, other.name])
    with atomic_write.replacing(target) as staged:
        Path(staged).write_bytes(b'new')
        Path(staged + '.data').write_bytes(b'weights')  # written beside it: renamed with it
    assert (target.read_bytes(), (tmp_path / 'model.onnx.data').read_bytes()) == (b'new', b'weights')
    assert sorted(os.listdir(tmp_path)) == sorted([target.name, 'model.onnx.data', other.name])


def test_replacing_refuses_before_any_rename(tmp_path):
    target = tmp_path / 'data.arrow'
    with pytest.raises(KeyError):  # not a file error: passed through as it is
        with atomic_write.replacing(target) as staged:
            Path(staged).write_bytes(b'x')
            raise KeyError('not a file error')
    with pytest.raises(OSError, match=f'the writer wrote no file; {target} is as it was'):
        with atomic_write.replacing(target):
            pass
    folder = tmp_path / 'model.onnx'
    folder.mkdir()
    with pytest.raises(OSError, match=f'{folder} is a folder; {folder} is as it was'):
        with atomic_write.replacing(folder) as staged:
            Path(staged).write_bytes(b'x')
            Path(staged + '.data').write_bytes(b'weights')
    assert sorted(os.listdir(tmp_path)) == ['model.onnx']  # the weights were not moved either
    missing = tmp_path / 'missing' / 'data.arrow'
    with pytest.raises(OSError) as failure:
        with atomic_write.replacing(missing):
            pass
    assert failure.value.filename == str(missing) and 'is as it was' in failure.value.strerror


def test_replacing_together_replaces_all_or_none(tmp_path):
    paths = [tmp_path / 'train.arrow', tmp_path / 'val.arrow']
    for path in paths:
        path.write_bytes(b'old')
    with pytest.raises(ValueError):
        with atomic_write.replacing_together(paths) as staged:
            Path(staged[0]).write_bytes(b'new')
            raise ValueError('the second split failed')
    assert [path.read_bytes() for path in paths] == [b'old', b'old']
    with atomic_write.replacing_together(paths) as staged:
        for name in staged:
            Path(name).write_bytes(b'new')
    assert [path.read_bytes() for path in paths] == [b'new', b'new']
    assert sorted(os.listdir(tmp_path)) == ['train.arrow', 'val.arrow']


def test_a_live_writers_folder_is_not_removed_even_with_this_pid(tmp_path):
    # Another container's writer can have this process's pid: its folder's lock protects it.
    target = tmp_path / 'checkpoint.pth'
    with atomic_write.replacing(target) as outer:
        Path(outer).write_bytes(b'outer')
        with atomic_write.replacing(target) as inner:  # its cleanup sees the outer's folder
            Path(inner).write_bytes(b'inner')
        assert target.read_bytes() == b'inner' and os.path.exists(outer)
    assert target.read_bytes() == b'outer'
    assert os.listdir(tmp_path) == ['checkpoint.pth']


def test_replacing_works_where_folders_cannot_be_locked(tmp_path, monkeypatch):
    import fcntl

    def no_locks(fd, operation):  # NFS's emulation on a folder opened for reading
        raise OSError(errno.EBADF, 'Bad file descriptor')

    monkeypatch.setattr(fcntl, 'flock', no_locks)
    target = tmp_path / 'checkpoint.pth'
    dead = tmp_path / f'.checkpoint.pth.{2 ** 70}.{HEXES}.tmp'
    dead.mkdir()
    with atomic_write.replacing(target) as outer:
        Path(outer).write_bytes(b'outer')
        with atomic_write.replacing(target) as inner:  # this process's folder is not stale
            Path(inner).write_bytes(b'inner')
    assert target.read_bytes() == b'outer' and os.listdir(tmp_path) == ['checkpoint.pth']


def test_replacing_paths_and_errors_of_other_files(tmp_path, monkeypatch):
    (tmp_path / 'real' / 'sub').mkdir(parents=True)
    (tmp_path / 'link').symlink_to(tmp_path / 'real' / 'sub')
    monkeypatch.chdir(tmp_path)
    with atomic_write.replacing(b'link/../model.onnx') as staged:  # bytes; '..' after a link
        Path(staged).write_bytes(b'x')
    assert (tmp_path / 'real' / 'model.onnx').read_bytes() == b'x'
    assert not (tmp_path / 'model.onnx').exists()
    with pytest.raises(OSError) as failure:  # about a file descriptor: passed through
        with atomic_write.replacing('model.onnx'):
            raise OSError(errno.EBADF, 'Bad file descriptor', 10 ** 6)
    assert failure.value.filename == 10 ** 6 and 'as it was' not in str(failure.value)
    paths = [tmp_path / 'train.arrow', tmp_path / 'val.arrow']
    with pytest.raises(OSError) as failure:
        with atomic_write.replacing_together(paths) as staged:
            raise OSError(errno.ENOSPC, 'No space left on device', staged[1])
    assert failure.value.filename == str(paths[1])
    assert failure.value.strerror == (f'No space left on device; {paths[0]}, {paths[1]} are as '
                                      f'they were')
