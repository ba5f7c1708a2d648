"""How this process was started: by torchrun (or ``torch.distributed.launch``), by a plain SLURM
``srun``, or alone; its rank, world size, local rank and process-group rendezvous, and the device
a launched process computes on.

A process started by a launcher never falls back to another device: one rank on the CPU beside
ranks on GPUs (or every rank silently on gloo) is worse than stopping with the reason.
"""
import os
import re
import socket
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

ENV_RENDEZVOUS = 'env://'
# Ports derived from a SLURM job id lie in [base, base + span): below Linux's ephemeral range
# (32768 and up), where the kernel picks ports for outgoing connections.
SLURM_PORT_BASE = 15000
SLURM_PORT_SPAN = 15000


class LaunchError(Exception):
    """The launcher's environment or the requested device cannot work; ``exit_status`` is
    what the command line exits with (2: a setting to correct, 1: a fault of the machine)."""

    def __init__(self, message: str, exit_status: int):
        super().__init__(message)
        self.exit_status = exit_status


@dataclass(frozen=True)
class Launch:
    """A process started by a launcher.

    Attributes:
        launcher: 'torchrun' (also torch.distributed.launch) or 'srun'.
        rank, world_size: global rank and number of processes.
        local_rank: rank inside this node; None when the launcher gives none.
        init_method: the process group's rendezvous (``env://`` or ``tcp://host:port``).
    """

    launcher: str
    rank: int
    world_size: int
    local_rank: Optional[int]
    init_method: str


def env_int(name: str) -> Optional[int]:
    """The integer in environment variable ``name``; None when unset or empty."""
    value = os.environ.get(name)
    if value in (None, ''):
        return None
    try:
        return int(value)
    except ValueError:
        raise LaunchError(f'environment variable {name}={value!r} is not an integer',
                          exit_status=2) from None


def _split_top_level(text: str) -> List[str]:
    """'a[1,2],b' -> ['a[1,2]', 'b']: commas inside brackets do not separate hosts."""
    parts, depth, start = [], 0, 0
    for position, char in enumerate(text):
        depth += {'[': 1, ']': -1}.get(char, 0)
        if depth < 0 or depth > 1:
            raise ValueError(f'unbalanced brackets in {text!r}')
        if char == ',' and depth == 0:
            parts.append(text[start:position])
            start = position + 1
    if depth:
        raise ValueError(f'unbalanced brackets in {text!r}')
    parts.append(text[start:])
    return [part for part in parts if part]


def _expand_ranges(ranges: str, text: str) -> List[str]:
    """'01-03,7' -> ['01', '02', '03', '7']: zero padding kept, as SLURM writes host numbers."""
    values = []
    for item in ranges.split(','):
        match = re.fullmatch(r'(\d+)(?:-(\d+))?', item)
        if match is None:
            raise ValueError(f'{item!r} in {text!r} is not a number or a range a-b')
        first, last = match.group(1), match.group(2) or match.group(1)
        if int(last) < int(first):
            raise ValueError(f'range {item!r} in {text!r} runs backwards')
        values.extend(str(number).zfill(len(first)) for number in range(int(first), int(last) + 1))
    return values


def _expand_host(pattern: str, text: str) -> List[str]:
    """One host pattern, any number of bracket groups: 'r[1-2]-n[1,3]' -> r1-n1, r1-n3, ..."""
    opening = pattern.find('[')
    if opening < 0:
        return [pattern]
    closing = pattern.index(']', opening)
    rest = _expand_host(pattern[closing + 1:], text)
    return [pattern[:opening] + value + tail
            for value in _expand_ranges(pattern[opening + 1:closing], text) for tail in rest]


def expand_nodelist(nodelist: str) -> List[str]:
    """SLURM's compressed host list (``SLURM_JOB_NODELIST``) as host names, in SLURM's order.

    ``'node[01-03,07],gpu5'`` -> ``['node01', 'node02', 'node03', 'node07', 'gpu5']``. Raises
    ValueError for a list that is not in that form.
    """
    text = nodelist.strip()
    hosts = [host for pattern in _split_top_level(text) for host in _expand_host(pattern, text)]
    if not hosts:
        raise ValueError('the host list is empty')
    return hosts


def slurm_master_port(job_id: str) -> int:
    """The rendezvous port of a SLURM job: the same on every node of the job, and different for
    jobs sharing a node (unless their ids differ by a multiple of ``SLURM_PORT_SPAN``)."""
    if not str(job_id).isdigit():
        raise ValueError(f'job id {job_id!r} is not a number')
    return SLURM_PORT_BASE + int(job_id) % SLURM_PORT_SPAN


def _slurm_rendezvous(dist_url: str) -> str:
    """The init method of an srun launch: ``dist_url`` when it is not ``env://``; otherwise
    MASTER_ADDR / MASTER_PORT where set, else the job's first host and a port from its id."""
    if dist_url != ENV_RENDEZVOUS:
        return dist_url
    address = os.environ.get('MASTER_ADDR')
    if not address:
        name = next((name for name in ('SLURM_JOB_NODELIST', 'SLURM_NODELIST')
                     if os.environ.get(name)), None)
        if name is None:
            raise LaunchError('srun launch without MASTER_ADDR or SLURM_JOB_NODELIST: no host '
                              'to meet at (set MASTER_ADDR or --dist_url)', exit_status=2)
        try:
            address = expand_nodelist(os.environ[name])[0]
        except ValueError as error:
            raise LaunchError(f'{name}={os.environ[name]!r}: {error}', exit_status=2) from None
    port = env_int('MASTER_PORT')
    if port is None:
        job_id = os.environ.get('SLURM_JOB_ID', '')
        try:
            port = slurm_master_port(job_id)
        except ValueError:
            raise LaunchError(f'srun launch without MASTER_PORT: SLURM_JOB_ID={job_id!r} gives no '
                              f'port (set MASTER_PORT or --dist_url)', exit_status=2) from None
    host = f'[{address}]' if ':' in address else address  # an IPv6 address
    return f'tcp://{host}:{port}'


def detect_launch(dist_url: str = ENV_RENDEZVOUS,
                  local_rank: Optional[int] = None) -> Optional[Launch]:
    """The launcher that started this process, or None for a process on its own.

    torchrun and ``torch.distributed.launch`` set RANK and WORLD_SIZE (LOCAL_RANK, or
    ``local_rank`` from the deprecated launcher's ``--local_rank``); the rendezvous is
    ``dist_url``. Otherwise a SLURM step of several tasks (``srun``) gives SLURM_PROCID,
    SLURM_STEP_NUM_TASKS and SLURM_LOCALID. The batch script of a job has SLURM_PROCID=0 and
    the allocation's SLURM_NTASKS but no step variables: it runs alone, as does ``srun -n 1``.
    """
    rank, world_size = env_int('RANK'), env_int('WORLD_SIZE')
    if rank is not None and world_size is not None:
        env_local_rank = env_int('LOCAL_RANK')
        return Launch(launcher='torchrun', rank=rank, world_size=world_size,
                      local_rank=local_rank if env_local_rank is None else env_local_rank,
                      init_method=dist_url)
    rank, world_size = env_int('SLURM_PROCID'), env_int('SLURM_STEP_NUM_TASKS')
    if rank is None or world_size is None or world_size < 2:
        return None
    if not 0 <= rank < world_size:
        raise LaunchError(f'SLURM_PROCID={rank} is outside 0..{world_size - 1} '
                          f'(SLURM_STEP_NUM_TASKS={world_size})', exit_status=2)
    return Launch(launcher='srun', rank=rank, world_size=world_size,
                  local_rank=env_int('SLURM_LOCALID'), init_method=_slurm_rendezvous(dist_url))


def parse_device(name: str) -> torch.device:
    """``--device``'s value (cuda, cuda:N, cpu, ...) as a torch.device; a ValueError naming the
    flag for anything else."""
    try:
        return torch.device(name)
    except RuntimeError:
        raise ValueError(f'--device {name!r} is not a device name (cuda, cuda:N, cpu)') from None


def launch_device(device: str, launch: Launch) -> Tuple[torch.device, int]:
    """The device and local rank of a launched process: ``cuda:<local rank>`` for a CUDA
    ``device``, else ``device`` itself. A device this process cannot use is a LaunchError
    naming it (exit status 1), never a fallback to the CPU.
    """
    try:
        requested = parse_device(device)
    except ValueError as error:
        raise LaunchError(str(error), exit_status=2) from None
    local_rank = launch.local_rank
    if requested.type != 'cuda':
        return requested, 0 if local_rank is None else local_rank
    where = (f'on {socket.gethostname()} (rank {launch.rank} of {launch.world_size}, '
             f'started by {launch.launcher})')
    if not torch.cuda.is_available():
        raise LaunchError(f'--device {device}: CUDA is not available {where}; use --device cpu '
                          f'for a CPU run', exit_status=1)
    count = torch.cuda.device_count()
    if local_rank is None:
        local_rank = launch.rank % count
    if not 0 <= local_rank < count:
        raise LaunchError(f'--device {device}: local rank {local_rank} needs cuda:{local_rank}, '
                          f'but there are {count} GPU(s) {where}', exit_status=1)
    target = torch.device('cuda', local_rank)
    try:
        torch.cuda.set_device(target)
    except RuntimeError as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise LaunchError(f'--device {device}: cannot use {target} {where}: {reason}',
                          exit_status=1) from None
    return target, local_rank
