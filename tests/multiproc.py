"""Helpers of the multi-process tests (test_slurm.py, test_multiprocess.py): child environments
without any launcher's variables, free ports, torchrun and per-process command lines, and a
tiny ImageFolder tree of digits so that a 2-process run takes seconds.

Every child runs with one thread: two processes with two threads each on two cores are many
times slower.
"""
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
TESTS_DIR = Path(__file__).resolve().parent
for _path in (str(REPO_ROOT), str(TESTS_DIR)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from test_failures import tree_args, write_tree  # noqa: E402,F401  (re-exported)

RUN_TIMEOUT_S = 300
LAUNCHER_VARIABLES = ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'LOCAL_WORLD_SIZE', 'MASTER_ADDR',
                      'MASTER_PORT', 'GROUP_RANK', 'TORCHELASTIC_RUN_ID')
# deit_tiny at 32x32 (a 2x2 patch grid), two steps of 16 per process on a 70-image tree.
TINY_RUN = ['--model', 'deit_tiny_patch16_shrink_base', '--input-size', '32', '--batch-size', '16',
            '--num_workers', '0', '--device', 'cpu', '--print-freq', '1']


def child_env(**extra):
    """This environment without launcher or SLURM variables, one thread, the repository
    importable, unbuffered output; ``extra`` added."""
    env = {name: value for name, value in os.environ.items()
           if name not in LAUNCHER_VARIABLES and not name.startswith(('SLURM_', 'SUBMITIT_'))}
    env.update(OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', PYTHONUNBUFFERED='1',
               PYTHONPATH=os.pathsep.join([str(REPO_ROOT), env.get('PYTHONPATH', '')]))
    env.update({name: str(value) for name, value in extra.items()})
    return env


def free_port():
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def port_is_free(port):
    with socket.socket() as sock:
        try:
            sock.bind(('127.0.0.1', port))
        except OSError:
            return False
    return True


def torchrun(*args, nproc=2, script='main.py'):
    """``python -m torch.distributed.run --nproc_per_node=N --master_port P script args``."""
    return [sys.executable, '-m', 'torch.distributed.run', f'--nproc_per_node={nproc}',
            '--master_port', str(free_port()), str(script), *[str(arg) for arg in args]]


class Processes:
    """Several commands started at once, each with its own environment; ``wait`` collects
    (exit status, stdout + stderr) per command and fails the test on a timeout."""

    def __init__(self, launches, cwd=REPO_ROOT):
        self.started = time.time()
        self.procs = [subprocess.Popen([str(part) for part in cmd], env=env, cwd=cwd,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                      for cmd, env in launches]

    def wait(self, timeout=RUN_TIMEOUT_S):
        results = []
        try:
            for proc in self.procs:
                remaining = max(1.0, self.started + timeout - time.time())
                output, _ = proc.communicate(timeout=remaining)
                results.append((proc.returncode, output))
        finally:
            for proc in self.procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        return results


def run_ok(cmd, env=None, timeout=RUN_TIMEOUT_S):
    """Runs one command to the end; fails the test with its output unless it exits 0."""
    [(status, output)] = Processes([(cmd, env or child_env())]).wait(timeout)
    assert status == 0, f'exit {status}: {cmd}\n{output[-4000:]}'
    return output


def checkpoint_weights(path):
    return torch.load(path, map_location='cpu', weights_only=True)['model']


def assert_same_weights(first, second):
    """Two state dicts hold identical tensors (bit for bit)."""
    assert first.keys() == second.keys()
    different = [key for key in first if not torch.equal(first[key], second[key])]
    assert not different, f'weights differ: {different[:5]}'
