"""Utilities shared by the MTViT training scripts.

Distributed helpers (usable with or without a process group), progress logging,
crash-safe checkpoint files, loading checkpoints without executing code, and
random-number-generator state that survives a ``weights_only`` round trip.
"""
import argparse
import builtins
import datetime
import math
import os
import pickle
import random
import re
import time
import uuid
import warnings
from collections import defaultdict, deque
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Iterator, Optional, Union

import numpy as np
import torch
import torch.distributed as dist

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


def _env_int(name: str) -> Optional[int]:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None


def init_distributed(device: DeviceLike, dist_url: str = "env://",
                     local_rank: Optional[int] = None) -> DistState:
    """Create the process group if this process was started by a distributed launcher.

    RANK and WORLD_SIZE come from the environment (torchrun, and
    ``torch.distributed.launch`` with or without ``--use_env``). LOCAL_RANK comes from the
    environment, or from ``local_rank`` (the ``--local_rank`` argument of the deprecated
    launcher without ``--use_env``). Without RANK/WORLD_SIZE the process runs alone and no
    process group is created.

    Args:
        device: requested device ('cpu', 'cuda', 'cuda:1', ...). With CUDA the process
            uses ``cuda:<local_rank>`` when distributed.
        dist_url: init method of the process group.
        local_rank: local rank passed on the command line by the deprecated launcher.

    Returns:
        The DistState of this process. On every process ``print`` is wrapped so that only
        rank 0 prints unless ``force=True`` is given; ``cleanup()`` restores it.
    """
    target = resolve_device(device)
    rank = _env_int("RANK")
    world_size = _env_int("WORLD_SIZE")

    if rank is None or world_size is None:
        _install_print_filter(is_main=True)
        return DistState(distributed=False, rank=0, world_size=1,
                         local_rank=0 if local_rank is None else local_rank,
                         device=target, backend=None)

    env_local_rank = _env_int("LOCAL_RANK")
    if env_local_rank is not None:
        local_rank = env_local_rank
    elif local_rank is None:
        local_rank = rank % torch.cuda.device_count() if target.type == "cuda" else 0

    if target.type == "cuda":
        backend = "nccl"
        target = torch.device("cuda", local_rank)
        torch.cuda.set_device(target)
    else:
        backend = "gloo"

    if not is_dist_initialized():
        print(f"| distributed init (rank {rank}/{world_size}, {backend}): {dist_url}",
              flush=True)
        # Binding the device up front lets NCCL collectives (barrier included) know
        # which GPU this rank owns.
        dist.init_process_group(backend=backend, init_method=dist_url,
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


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all processes.

    Args:
        tensor: any shape, on the device the backend expects (CPU for gloo, CUDA for nccl).

    Returns:
        A new tensor of the same shape holding the sum (a copy of the input without a
        process group). The input is left unchanged.
    """
    result = tensor.detach().clone()
    if is_dist_initialized():
        dist.all_reduce(result, op=dist.ReduceOp.SUM)
    return result


def all_gather_object(obj: Any) -> list:
    """Every process's ``obj`` (picklable), in rank order; ``[obj]`` without a process group."""
    if not is_dist_initialized():
        return [obj]
    gathered = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Average a tensor over all processes (a copy of the input without a process group).

    Args:
        tensor: floating-point tensor of any shape on the backend's device.

    Returns:
        A new tensor of the same shape holding the mean over processes.
    """
    return all_reduce_sum(tensor) / get_world_size()


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


# ----------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------

class CheckpointError(Exception):
    """A checkpoint file is missing, unreadable, or unsafe to load."""


def _fsync_directory(directory: str) -> None:
    """Persist a rename; some platforms (Windows) cannot open directories, which is fine."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint_atomic(obj: Any, path: Union[str, os.PathLike]) -> None:
    """Write ``obj`` with torch.save so that ``path`` is never left half-written.

    Only the main process writes. The data goes to a temporary file in the same
    directory, is flushed and fsynced, then renamed over ``path`` (atomic on POSIX and
    Windows), and the directory is fsynced so the rename survives a power loss. Until the
    rename, any previous file at ``path`` stays intact; on any exception the temporary
    file is removed and the exception re-raised.
    """
    if not is_main_process():
        return
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    tmp_path = os.path.join(directory,
                            f".{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    # os.open with 0o666 lets the umask decide permissions, like a plain open() would.
    fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0),
                 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        try:
            os.remove(tmp_path)
        except FileNotFoundError:
            pass
        raise
    _fsync_directory(directory)
    _remove_stale_temporaries(directory, os.path.basename(path))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: alive, owned by someone else
        return True
    return True


def _remove_stale_temporaries(directory: str, name: str) -> None:
    """Delete temporary files of ``name`` left by writers killed mid-save.

    A SIGKILL or power cut during ``save_checkpoint_atomic`` leaves the checkpoint intact but
    its half-written temporary behind, a checkpoint's worth of disk each time. After a
    successful save, temporaries whose writer (the pid in their name) is no longer running on
    this host are removed, and so are this pid's own (a pid reused after a restart: this
    process saves synchronously, so none of its own is in progress). Skipped on Windows,
    where probing a pid with os.kill would terminate it.
    """
    if os.name == "nt":
        return
    pattern = re.compile(rf"\.{re.escape(name)}\.(\d+)\.[0-9a-f]{{32}}\.tmp")
    try:
        entries = os.listdir(directory)
    except OSError:
        return
    for entry in entries:
        match = pattern.fullmatch(entry)
        if match is None:
            continue
        pid = int(match.group(1))
        if pid != os.getpid() and _pid_alive(pid):
            continue
        try:
            os.remove(os.path.join(directory, entry))
        except OSError:
            pass


def namespace_to_dict(namespace: argparse.Namespace) -> Dict[str, Any]:
    """Convert an argparse.Namespace (nested ones included) to a plain dict."""
    return {key: namespace_to_dict(value) if isinstance(value, argparse.Namespace) else value
            for key, value in vars(namespace).items()}


_GLOBAL_IN_ERROR = re.compile(r"GLOBAL (\S+) (?:was|whose)")


def _unsafe_global(path: str, error: Exception) -> Optional[str]:
    """Name the global that made the weights-only unpickler refuse ``path``, if any."""
    match = _GLOBAL_IN_ERROR.search(str(error))
    if match:
        return match.group(1)
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a zip checkpoint: a plain pickle or torch's legacy format
        names = _unsafe_pickle_globals(path)
    names = [name for name in names if name != "argparse.Namespace"]
    return ", ".join(names) if names else None


_PICKLE_STRING_OPS = ("STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE",
                      "SHORT_BINUNICODE", "BINUNICODE8")
_PICKLE_PUT_OPS = ("PUT", "BINPUT", "LONG_BINPUT")
_PICKLE_GET_OPS = ("GET", "BINGET", "LONG_BINGET")
_MAX_SCANNED_PICKLES = 5  # torch's legacy format: magic, protocol, sys info, object, keys


def _unsafe_pickle_globals(path: str) -> list:
    """Globals outside torch's weights-only allow-list that a plain (or legacy-format) pickle
    file names, found by reading its opcodes with pickletools, which never executes them.

    Only used to word the refusal: torch's weights-only unpickler has already refused the file
    (for protocol 4 and 5 pickles, at the FRAME opcode, before it reaches any global).
    """
    import pickletools
    try:
        from torch._weights_only_unpickler import _get_allowed_globals
        allowed = set(_get_allowed_globals())
    except Exception:  # a private helper: without it, report every global
        allowed = set()
    names = []
    try:
        with open(path, "rb") as handle:
            for _ in range(_MAX_SCANNED_PICKLES):
                strings, memo, last_string = [], {}, None
                for opcode, arg, _ in pickletools.genops(handle):
                    if opcode.name in ("GLOBAL", "INST"):
                        names.append(arg.replace(" ", "."))
                    elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                        names.append(f"{strings[-2]}.{strings[-1]}")
                    if opcode.name in _PICKLE_STRING_OPS:
                        strings.append(arg)
                    elif opcode.name == "MEMOIZE":
                        memo[len(memo)] = last_string
                    elif opcode.name in _PICKLE_PUT_OPS:
                        memo[arg] = last_string
                    elif opcode.name in _PICKLE_GET_OPS and memo.get(arg) is not None:
                        strings.append(memo[arg])
                    last_string = arg if opcode.name in _PICKLE_STRING_OPS else None
    except Exception:  # the end of the pickles, raw tensor data, or a damaged file
        pass
    return list(dict.fromkeys(name for name in names if name not in allowed))


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _safetensors_device(map_location: Any) -> str:
    if isinstance(map_location, (str, torch.device)):
        return str(map_location)
    # Callables and remapping dicts have no safetensors equivalent.
    return "cpu"


def load_checkpoint(path: Union[str, os.PathLike], map_location: Any = "cpu") -> Any:
    """Load a checkpoint without executing code from the file.

    ``.pth``-style files are read with ``torch.load(weights_only=True)``; the only extra
    type allowed is argparse.Namespace (the original release stored ``args`` that way),
    and such an ``args`` entry is returned as a plain dict. ``.safetensors`` files are
    returned as ``{'model': state_dict}``.

    Args:
        path: checkpoint file.
        map_location: as for torch.load.

    Raises:
        CheckpointError: the file is missing, truncated or corrupt, or needs a global
            outside the allow-list (the pickle is never executed).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a directory, not a checkpoint file")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist")

    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        try:
            return {"model": load_file(path, device=_safetensors_device(map_location))}
        except Exception as error:  # any failure means an unusable file
            raise CheckpointError(f"{path} is not a readable safetensors file "
                                  f"(truncated or corrupt?): {_first_line(error)}") from None

    try:
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            # torch warns (on stderr) about protocol-4 pickles, which it then refuses anyway.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        name = _unsafe_global(path, error)
        if name is not None:
            raise CheckpointError(f"refusing to load {path}: it needs code outside the safe "
                                  f"allow-list ({name})") from None
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint "
                              f"(truncated or corrupt?): {_first_line(error)}") from None
    except Exception as error:  # torch raises many types for bad files
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint "
                              f"(truncated or corrupt?): {_first_line(error)}") from None

    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("args"), argparse.Namespace):
        checkpoint["args"] = namespace_to_dict(checkpoint["args"])
    return checkpoint


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
