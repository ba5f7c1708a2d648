"""Utilities shared by the MTViT training scripts.

Distributed helpers (usable with or without a process group), progress logging, the
non-finite loss check, and random-number-generator state that survives a ``weights_only``
round trip. Checkpoint files are in ``checkpoints.py``.
"""
import argparse
import builtins
import datetime
import errno
import math
import os
import random
import re
import shutil
import tempfile
import time
import warnings
from collections import defaultdict, deque
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Iterator, List, Optional, Union

import numpy as np
import torch
import torch.distributed as dist

from launch_env import LaunchError, detect_launch, launch_device

BYTES_PER_MB = 1024.0 * 1024.0
# numpy's legacy seeding only accepts values in [0, 2**32).
NUMPY_SEED_MODULUS = 2 ** 32

DeviceLike = Union[str, torch.device]


# ----------------------------------------------------------------------------
# Distributed
# ----------------------------------------------------------------------------

def is_dist_initialized() -> bool:
    """Return True when torch.distributed is available and a process group exists."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Return the global rank of this process (0 without a process group)."""
    return dist.get_rank() if is_dist_initialized() else 0


def get_world_size() -> int:
    """Return the number of processes in the group (1 without a process group)."""
    return dist.get_world_size() if is_dist_initialized() else 1


def is_main_process() -> bool:
    """Return True on the process that owns logging and checkpoint writing (rank 0)."""
    return get_rank() == 0


@dataclass
class DistState:
    """How this process takes part in training.

    Attributes:
        distributed: whether a process group was created.
        rank: global rank (0 when not distributed).
        world_size: number of processes (1 when not distributed).
        local_rank: rank inside this node; selects the CUDA device.
        device: the device this process computes on.
        backend: 'gloo' or 'nccl' when distributed, otherwise None.
    """

    distributed: bool
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: Optional[str]


_builtin_print = None


def _install_print_filter(is_main: bool) -> None:
    """Replace the builtin print so that only the main process prints unless force=True.

    The wrapper is installed on every process (main included) so that callers can pass
    ``force=True`` anywhere without a TypeError.
    """
    global _builtin_print
    if _builtin_print is None:
        _builtin_print = builtins.print
    original = _builtin_print

    def filtered_print(*args, **kwargs):
        force = kwargs.pop("force", False)
        if is_main or force:
            original(*args, **kwargs)

    builtins.print = filtered_print


def _restore_print() -> None:
    """Undo ``_install_print_filter``."""
    global _builtin_print
    if _builtin_print is not None:
        builtins.print = _builtin_print
        _builtin_print = None


def resolve_device(device: DeviceLike) -> torch.device:
    """Turn a device name into a torch.device, falling back to the CPU when CUDA is absent.

    The release's default is ``--device cuda`` and its README commands never pass
    ``--device``; falling back keeps those commands usable on a CPU-only machine.
    """
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        warnings.warn(f"CUDA is not available: using the CPU instead of {device}",
                      stacklevel=2)
        return torch.device("cpu")
    return resolved


def amp_autocast(device: torch.device, amp_dtype: Optional[torch.dtype]):
    """``torch.autocast`` to ``amp_dtype`` on ``device``'s type; off when ``amp_dtype`` is None."""
    return torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=amp_dtype is not None)


def synchronize(device: torch.device) -> None:
    """Waits for ``device``'s queued work (none on the CPU), so that a clock reads finished work."""
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


def init_distributed(device: DeviceLike, dist_url: str = "env://",
                     local_rank: Optional[int] = None) -> DistState:
    """Create the process group if this process was started by a distributed launcher.

    torchrun and ``torch.distributed.launch`` (with or without ``--use_env``, whose
    ``--local_rank`` argument is ``local_rank``) are recognised by RANK and WORLD_SIZE, a plain
    ``srun`` of several tasks by SLURM_PROCID and SLURM_STEP_NUM_TASKS (see ``launch_env``). Without
    either the process runs alone, no process group is created, and a CUDA ``device`` falls back
    to the CPU where there is no GPU; a launched process whose device cannot be used stops with
    a MachineError naming it instead.

    Args:
        device: requested device ('cpu', 'cuda', 'cuda:1', ...). With CUDA the process
            uses ``cuda:<local_rank>`` when distributed.
        dist_url: init method of the process group (srun: ``env://`` means MASTER_ADDR and
            MASTER_PORT, or the job's first host and a port derived from its id).
        local_rank: local rank passed on the command line by the deprecated launcher.

    Returns:
        The DistState of this process. On every process ``print`` is wrapped so that only
        rank 0 prints unless ``force=True`` is given; ``cleanup()`` restores it.
    """
    try:
        launch = detect_launch(dist_url=dist_url, local_rank=local_rank)
        if launch is not None:
            target, local_rank = launch_device(device=str(device), launch=launch)
    except LaunchError as error:
        raise MachineError(str(error), exit_status=error.exit_status) from None
    if launch is None:
        _install_print_filter(is_main=True)
        return DistState(distributed=False, rank=0, world_size=1,
                         local_rank=0 if local_rank is None else local_rank,
                         device=resolve_device(device), backend=None)

    backend = "nccl" if target.type == "cuda" else "gloo"
    rank, world_size = launch.rank, launch.world_size
    if not is_dist_initialized():
        print(f"| distributed init (rank {rank}/{world_size}, {backend}): {launch.init_method} "
              f"({launch.launcher})", flush=True)
        # Binding the device up front lets NCCL collectives (barrier included) know
        # which GPU this rank owns.
        dist.init_process_group(backend=backend, init_method=launch.init_method,
                                world_size=world_size, rank=rank,
                                device_id=target if backend == "nccl" else None)
    _install_print_filter(is_main=rank == 0)
    return DistState(distributed=True, rank=rank, world_size=world_size,
                     local_rank=local_rank, device=target, backend=backend)


def barrier() -> None:
    """Wait for every process of the group; does nothing without a process group."""
    if is_dist_initialized():
        dist.barrier()


def cleanup() -> None:
    """Destroy the process group (if any) and restore the builtin print."""
    if is_dist_initialized():
        dist.destroy_process_group()
    _restore_print()


def _all_reduce(tensor: torch.Tensor, op: "dist.ReduceOp") -> torch.Tensor:
    result = tensor.detach().clone()
    if is_dist_initialized():
        dist.all_reduce(result, op=op)
    return result


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all processes.

    Args:
        tensor: any shape, on the device the backend expects (CPU for gloo, CUDA for nccl).

    Returns:
        A new tensor of the same shape holding the sum (a copy of the input without a
        process group). The input is left unchanged.
    """
    return _all_reduce(tensor, dist.ReduceOp.SUM)


def all_reduce_min(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise minimum over all processes; otherwise as ``all_reduce_sum``."""
    return _all_reduce(tensor, dist.ReduceOp.MIN)


def all_gather_object(obj: Any) -> list:
    """Every process's ``obj`` (picklable), in rank order; ``[obj]`` without a process group."""
    if not is_dist_initialized():
        return [obj]
    gathered = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def seed_everything(seed: int, rank: int = 0) -> int:
    """Seed python ``random``, numpy and torch (CPU and every CUDA device).

    Each rank gets ``seed + rank`` so that processes draw different augmentations, as in
    DeiT. Returns the seed actually used.
    """
    effective = seed + rank
    random.seed(effective)
    np.random.seed(effective % NUMPY_SEED_MODULUS)
    torch.manual_seed(effective)
    return effective


# ----------------------------------------------------------------------------
# Logging
# ----------------------------------------------------------------------------

class SmoothedValue:
    """Track a series of values: median/average over a recent window and a global average.

    ``global_avg`` is exact across processes after ``synchronize_between_processes``;
    the window statistics stay local to each process.
    """

    def __init__(self, window_size: int = 20, fmt: Optional[str] = None):
        self.deque = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0
        self.fmt = fmt if fmt is not None else "{median:.4f} ({global_avg:.4f})"

    def update(self, value: float, n: int = 1) -> None:
        """Record ``value`` as the mean of ``n`` samples."""
        self.deque.append(value)
        self.count += n
        self.total += value * n

    def synchronize_between_processes(self, device: DeviceLike) -> None:
        """Sum count and total over all processes (no-op without a process group).

        Args:
            device: where the reduction buffer lives (CPU for gloo, the rank's GPU for nccl).
        """
        if not is_dist_initialized():
            return
        # float64 keeps the totals exact for any realistic number of samples.
        stats = torch.tensor([self.count, self.total], dtype=torch.float64, device=device)
        stats = all_reduce_sum(stats).tolist()
        self.count = int(stats[0])
        self.total = stats[1]

    @property
    def median(self) -> float:
        """Median of the window (NaN when empty)."""
        if not self.deque:
            return math.nan
        return torch.tensor(list(self.deque)).median().item()

    @property
    def avg(self) -> float:
        """Mean of the window (NaN when empty)."""
        if not self.deque:
            return math.nan
        return torch.tensor(list(self.deque), dtype=torch.float64).mean().item()

    @property
    def global_avg(self) -> float:
        """Mean of every recorded sample (NaN when empty)."""
        return self.total / self.count if self.count else math.nan

    @property
    def max(self) -> float:
        """Largest value in the window (NaN when empty)."""
        return max(self.deque) if self.deque else math.nan

    @property
    def value(self) -> float:
        """Most recent value (NaN when empty)."""
        return self.deque[-1] if self.deque else math.nan

    def __str__(self) -> str:
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg,
                               max=self.max, value=self.value)


class MetricLogger:
    """A named collection of SmoothedValue meters with a progress printer.

    Args:
        device: device used for the cross-process reduction in
            ``synchronize_between_processes`` and for the memory report on CUDA.
        delimiter: separator between meters in printed lines.
    """

    def __init__(self, device: DeviceLike, delimiter: str = "  "):
        self.meters = defaultdict(SmoothedValue)
        self.device = torch.device(device)
        self.delimiter = delimiter

    def update(self, **kwargs: Union[float, int, torch.Tensor]) -> None:
        """Add one value per named meter; 0-d tensors are converted to Python numbers."""
        for name, value in kwargs.items():
            if value is None:
                continue
            if isinstance(value, torch.Tensor):
                value = value.item()
            if not isinstance(value, (float, int)):
                raise TypeError(f"meter {name} expects a number, got {type(value).__name__}")
            self.meters[name].update(value)

    def __getattr__(self, attr: str) -> SmoothedValue:
        # Only reached when normal lookup fails: expose meters as attributes.
        meters = self.__dict__.get("meters", {})
        if attr in meters:
            return meters[attr]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{attr}'")

    def __str__(self) -> str:
        return self.delimiter.join(f"{name}: {meter}" for name, meter in self.meters.items())

    def synchronize_between_processes(self) -> None:
        """Make every meter's global average exact over all processes."""
        for meter in self.meters.values():
            meter.synchronize_between_processes(self.device)

    def add_meter(self, name: str, meter: SmoothedValue) -> None:
        """Register a meter with a custom window or format."""
        self.meters[name] = meter

    def log_every(self, iterable: Iterable, print_freq: int,
                  header: Optional[str] = None) -> Iterator:
        """Yield the items of ``iterable`` and print progress every ``print_freq`` items.

        Each progress line shows ``[i/total]``, the ETA, every meter, the time per
        iteration, the time spent waiting for data, and on CUDA the peak memory.
        The iterable must define ``len``.
        """
        header = header or ""
        total = len(iterable)
        iter_time = SmoothedValue(fmt="{avg:.4f}")
        data_time = SmoothedValue(fmt="{avg:.4f}")
        count_fmt = f":{len(str(total))}d"
        parts = [header, "[{0" + count_fmt + "}/{1}]", "eta: {eta}", "{meters}",
                 "time: {time}", "data: {data}"]
        on_cuda = self.device.type == "cuda"
        if on_cuda:
            parts.append("max mem: {memory:.0f}")
        line_fmt = self.delimiter.join(parts)

        start = time.time()
        end = time.time()
        for i, item in enumerate(iterable):
            data_time.update(time.time() - end)
            yield item
            iter_time.update(time.time() - end)
            if i % print_freq == 0 or i == total - 1:
                eta_seconds = iter_time.global_avg * (total - i - 1)
                fields = dict(eta=str(datetime.timedelta(seconds=int(eta_seconds))),
                              meters=str(self), time=str(iter_time), data=str(data_time))
                if on_cuda:
                    fields["memory"] = torch.cuda.max_memory_allocated(self.device) / BYTES_PER_MB
                print(line_fmt.format(i, total, **fields), flush=True)
            end = time.time()
        elapsed = time.time() - start
        per_item = elapsed / max(total, 1)
        print(f"{header} Total time: {datetime.timedelta(seconds=int(elapsed))} "
              f"({per_item:.4f} s / it)", flush=True)


class NonFiniteLossError(RuntimeError):
    """Raised when the training loss becomes NaN or infinite."""


def check_finite(loss_value: Union[float, torch.Tensor], epoch: int, iteration: int) -> None:
    """Raise NonFiniteLossError if ``loss_value`` (a number or 0-d tensor) is NaN or inf."""
    value = loss_value.item() if isinstance(loss_value, torch.Tensor) else float(loss_value)
    if not math.isfinite(value):
        raise NonFiniteLossError(
            f"loss is {value} at epoch {epoch} iteration {iteration}, stopping training")


_NON_FINITE_KINDS = (math.nan, math.inf, -math.inf)


def check_finite_losses(losses: torch.Tensor, epoch: int, first_iteration: int) -> List[float]:
    """Check a run of per-step losses at once, on every process alike.

    The losses of several steps stay on the device until this call, so that training does not
    wait for the device at every step. The earliest non-finite loss over all processes stops
    every process with the same NonFiniteLossError.

    Args:
        losses: (S,) losses of iterations ``first_iteration .. first_iteration + S - 1``.
    Returns:
        The losses as Python floats (when all are finite).
    """
    values = losses.double().tolist()
    # One integer per process: the first bad value's position in ``losses`` times the number
    # of kinds plus its kind, or a sentinel past every such code.
    code = len(values) * len(_NON_FINITE_KINDS)
    for offset, value in enumerate(values):
        if not math.isfinite(value):
            kind = 0 if math.isnan(value) else (1 if value > 0 else 2)
            code = offset * len(_NON_FINITE_KINDS) + kind
            break
    if is_dist_initialized():
        code = int(all_reduce_min(torch.tensor([code], device=losses.device)).item())
    if code < len(values) * len(_NON_FINITE_KINDS):
        offset, kind = divmod(code, len(_NON_FINITE_KINDS))
        check_finite(_NON_FINITE_KINDS[kind], epoch, first_iteration + offset)
    return values


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse whose errors are one line, ``<command>: error: ...`` (no usage block), with
    argparse's exit status 2."""

    def __init__(self, *args, command: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.command = command

    def error(self, message):
        """One line naming the command and the problem, exit status 2 (argparse's)."""
        self.exit(2, f'{self.command}: error: {message} (see --help)\n')


def number_in(kind: type, low: float, high: float = math.inf, *, open_low: bool = False,
              open_high: bool = False, what: str = ''):
    """An argparse ``type``: the text as ``kind`` (int or float) within [low, high] (an end
    excluded where ``open_*``), else argparse's one-line error naming the flag and ``what``."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'{text!r} is not {what}') from None
        above = low < value if open_low else low <= value
        below = value < high if open_high else value <= high
        if not (above and below):  # NaN fails both
            raise argparse.ArgumentTypeError(f'{text} is not {what}')
        return value
    parse.__name__ = what  # argparse names the type by it
    return parse


def parse_drop_loc(text: str) -> tuple:
    """An argparse ``type``: '(3, 6, 9)', '3,6,9' or '[3 6 9]' -> (3, 6, 9); never evaluated as
    code."""
    if not re.fullmatch(r'[\s()\[\],0-9]*', text) or not re.search(r'\d', text):
        raise argparse.ArgumentTypeError(
            f'{text!r} is not a list of block indices such as "(3, 6, 9)"')
    indices = tuple(int(index) for index in re.findall(r'\d+', text))
    if len(set(indices)) != len(indices):
        raise argparse.ArgumentTypeError(f'{text!r} names a block more than once')
    return indices


POSITIVE_INT = number_in(int, 1, what='a positive integer')
NON_NEGATIVE_INT = number_in(int, 0, what='an integer >= 0')
POSITIVE = number_in(float, 0, open_low=True, what='a number > 0')
NON_NEGATIVE = number_in(float, 0, what='a number >= 0')
PROBABILITY = number_in(float, 0, 1, what='a probability in [0, 1]')
FRACTION = number_in(float, 0, 1, open_high=True, what='a fraction in [0, 1)')


class MachineError(Exception):
    """The machine failed, not the input (a full disk, an unwritable folder, a killed worker).
    ``exit_status`` is what the command line exits with."""

    def __init__(self, message: str, exit_status: int = 1):
        super().__init__(message)
        self.exit_status = exit_status


def _error_chain(error: BaseException) -> Iterator[BaseException]:
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` (or what caused it: torch.save wraps the OSError) is a full disk."""
    return any(isinstance(link, OSError) and link.errno in (errno.ENOSPC, errno.EDQUOT)
               for link in _error_chain(error))


_WORKER_DIED = re.compile(r'DataLoader worker \(pids?\(?s?\)? ?([\d, ]+)\) ?([^\n]*)')


def machine_error_message(error: BaseException) -> Optional[str]:
    """One line for an OSError or RuntimeError that a fault of the machine caused, naming what
    failed and where; None for anything else (a bug: let its traceback show)."""
    if isinstance(error, OSError) and error.filename is not None:
        return f'{error.strerror or error} ({error.filename})'
    match = _WORKER_DIED.search(str(error)) if isinstance(error, RuntimeError) else None
    if match:
        pids, reason = match.group(1).strip(), match.group(2).strip().rstrip('.') or 'exited'
        out_of_memory = ('if the system killed it (out of memory?), use fewer --num_workers '
                         'or a smaller --batch-size')
        own_error = '--num_workers 0 shows an error of its own in the main process'
        hints = {'Killed': [out_of_memory], 'unexpectedly': [out_of_memory, own_error]}
        hint = next((h for word, h in hints.items() if reason.endswith(word)), [own_error])
        return f'data-loader worker (pid {pids}) {reason}; {"; ".join(hint)}'
    return None


def check_output_dir(path: str) -> None:
    """Creates ``path`` if needed and proves it writable (MachineError, exit status 2, if not)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise MachineError(f'--output_dir {path} is a file, not a folder', exit_status=2)
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise MachineError(f'--output_dir {path} is not writable: '
                           f'{error.strerror or error}', exit_status=2) from None


def warn_if_low_space(path: str, checkpoint_bytes: int) -> None:
    """Warns when the folder ``path`` has room for fewer than two checkpoints of
    ``checkpoint_bytes`` (a save writes the new one beside the last)."""
    free = shutil.disk_usage(path).free
    if free < 2 * checkpoint_bytes:
        print(f'warning: --output_dir {path} has {free / BYTES_PER_MB:.0f} MB free, less than '
              f'two checkpoints ({checkpoint_bytes / BYTES_PER_MB:.0f} MB each)', flush=True)


def get_rng_state() -> Dict[str, Any]:
    """Capture the state of python ``random``, numpy, torch CPU and every CUDA device.

    The result contains only tensors, ints, floats, strings, None, lists and dicts, so it
    survives ``torch.save`` followed by ``torch.load(weights_only=True)``.
    """
    version, mt_state, gauss_next = random.getstate()
    bit_generator, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    return {
        "python": {"version": version,
                   "state": torch.tensor(mt_state, dtype=torch.int64),
                   "gauss_next": gauss_next},
        "numpy": {"bit_generator": bit_generator,
                  "keys": torch.from_numpy(keys.astype(np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore a state produced by ``get_rng_state``.

    CUDA states are restored for the devices present in both the saved state and this
    machine; a state saved on a CUDA machine can therefore be restored on a CPU one.
    """
    python_state = state["python"]
    random.setstate((python_state["version"],
                     tuple(int(v) for v in python_state["state"].tolist()),
                     python_state["gauss_next"]))
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["bit_generator"],
                         numpy_state["keys"].cpu().numpy().astype(np.uint32),
                         numpy_state["pos"], numpy_state["has_gauss"],
                         numpy_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    if torch.cuda.is_available():
        for index, cuda_state in enumerate(state.get("cuda", [])[:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state.cpu(), device=index)
