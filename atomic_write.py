"""Replacing files that a later run reads (checkpoints, exported models, packed datasets) so that
a crash, a full disk or an interruption never leaves a half-written file under the final name.

A writer writes into a private staging folder beside each target, under the target's own name
(so that files it adds next to it, such as an ONNX model's ``<name>.data`` weights, keep the
names the model refers to). Only when every staged file is complete and fsynced are they renamed
into place, one after the other, each rename atomic on POSIX, and the folder fsynced so that the
renames survive a power loss. Staging folders left by killed writers are removed before the
next write of the same target.
"""
import contextlib
import errno
import os
import re
import shutil
import uuid
from typing import Iterator, List, Optional, Sequence, Union

PathLike = Union[str, bytes, os.PathLike]

_LIVE_STAGINGS = set()
"""Names of this process's staging folders in use: never stale, even where folders cannot be
locked."""


@contextlib.contextmanager
def replacing(path: PathLike) -> Iterator[str]:
    """Yields where to write a new version of the file ``path`` (``replacing_together`` of one).

    When the block ends normally the new file (and any file written beside it) replaces the old
    one; when it raises, ``path`` is as it was. An OSError of the staged files or of the renames
    is re-raised naming ``path`` and saying what was kept.
    """
    with replacing_together([path]) as (staged,):
        yield staged


@contextlib.contextmanager
def replacing_together(paths: Sequence[PathLike]) -> Iterator[List[str]]:
    """Yields where to write new versions of the files ``paths``, replaced together: nothing is
    renamed until the block has ended and every staged file is fsynced, and the renames then
    follow one another (the only window in which some are new and some old). Each path's own
    file must have been written (OSError otherwise); files written beside it are renamed
    before it."""
    # Joined to the working folder, not normalised: '..' after a symlinked folder is the
    # kernel's to resolve, as every other open of the path does.
    targets = [os.path.join(os.getcwd(), os.fsdecode(path)) for path in paths]
    stagings = []
    replaced = []
    try:
        with contextlib.ExitStack() as locks:
            for target in targets:
                directory, name = os.path.split(target)
                _remove_stale_temporaries(directory, name)
                staging = os.path.join(directory, f'.{name}.{os.getpid()}.{uuid.uuid4().hex}.tmp')
                stagings.append(staging)
                _LIVE_STAGINGS.add(os.path.basename(staging))
                os.mkdir(staging)
                locks.enter_context(_held_lock(staging))
            yield [os.path.join(staging, os.path.basename(target))
                   for staging, target in zip(stagings, targets)]
            moves = [move for staging, target in zip(stagings, targets)
                     for move in _staged_moves(staging, target)]
            for source, _ in moves:
                _fsync_file(source)
            for source, destination in moves:
                os.replace(source, destination)
                replaced.append(destination)
    except OSError as error:
        target = _target_of(error, stagings, targets)
        if target is None:
            raise  # not about the staged files: it names its own file, or none
        kept = (f'{", ".join(replaced)} replaced, the rest as they were' if replaced
                else f'{targets[0]} is as it was' if len(targets) == 1
                else f'{", ".join(targets)} are as they were')
        raise OSError(error.errno, f'{error.strerror or error}; {kept}', target) from error
    finally:
        for staging in stagings:
            shutil.rmtree(staging, ignore_errors=True)
            _LIVE_STAGINGS.discard(os.path.basename(staging))
    for directory in dict.fromkeys(os.path.dirname(target) for target in targets):
        _fsync_directory(directory)


def _target_of(error: OSError, stagings: Sequence[str], targets: Sequence[str]) -> Optional[str]:
    """The target an OSError of ``replacing_together`` is about: the one whose staged file it
    names, or the first for a file error that names no file (a full disk); else None."""
    named = error.filename
    if named is None:
        return targets[0] if error.errno is not None else None
    if not isinstance(named, (str, bytes, os.PathLike)):  # a file descriptor
        return None
    named = os.fsdecode(named)
    return next((target for staging, target in zip(stagings, targets)
                 if named.startswith(staging)), None)


def _staged_moves(staging: str, target: str) -> List[tuple]:
    """(staged file, destination) pairs of one target, the target itself last; refused before
    any rename when the target's file is missing or a destination is a folder."""
    directory, name = os.path.split(target)
    entries = sorted(os.listdir(staging), key=lambda entry: entry == name)
    if name not in entries:
        raise OSError(errno.ENOENT, 'the writer wrote no file', os.path.join(staging, name))
    moves = [(os.path.join(staging, entry), os.path.join(directory, entry)) for entry in entries]
    for source, destination in moves:
        if os.path.isdir(destination) and not os.path.islink(destination):
            raise IsADirectoryError(errno.EISDIR, f'{destination} is a folder', source)
    return moves


@contextlib.contextmanager
def _held_lock(staging: str) -> Iterator[None]:
    """Holds an exclusive lock on ``staging`` while it is in use: the cleanup of another writer
    (another container whose process has this one's pid, say) leaves a locked folder alone. The
    lock goes when the process dies, so a killed writer's folder is free to remove."""
    try:
        import fcntl
    except ImportError:  # Windows: the cleanup is skipped there
        yield
        return
    with _descriptor(staging) as fd:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            # Another writer's _is_locked probing this folder for an instant: wait for it.
            # Some file systems lock no folders (NFS emulates flock with locks that need a file
            # open for writing; Lustre without -o flock): there the pid rule alone decides.
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                fcntl.flock(fd, fcntl.LOCK_EX)
        yield


def _is_locked(folder: str) -> bool:
    """Whether a live writer holds ``folder``'s lock (``_held_lock``); a folder that cannot be
    opened, or locked for another reason (a file system without locks), is not."""
    import fcntl
    try:
        with _descriptor(folder) as fd:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        return error.errno in (errno.EWOULDBLOCK, errno.EAGAIN)
    return False


@contextlib.contextmanager
def _descriptor(path: str) -> Iterator[int]:
    """A read-only descriptor of the file or folder ``path``, closed when the block ends."""
    fd = os.open(path, os.O_RDONLY)
    try:
        yield fd
    finally:
        os.close(fd)


def _fsync_file(path: str) -> None:
    """Make a written file's data durable before it is renamed into place."""
    with _descriptor(path) as fd:
        os.fsync(fd)


def _fsync_directory(directory: str) -> None:
    """Persist a rename; some platforms (Windows) cannot open directories, which is fine."""
    with contextlib.suppress(OSError), _descriptor(directory) as fd:
        os.fsync(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: alive, owned by someone else
        return True
    except OverflowError:  # not a pid this system can have: no writer of ours
        return False
    return True


def _remove_stale_temporaries(directory: str, name: str) -> None:
    """Delete the temporaries of ``name`` left by writers killed mid-write.

    A SIGKILL or power cut during a write leaves the file intact but its half-written staging
    folder behind (a plain file, in earlier versions), a checkpoint's worth of disk each time.
    Those whose writer (the pid in their name) is no longer running on this host are removed,
    and so are this pid's own (a pid reused after a restart) but those in use in this process,
    unless a live writer holds the folder's lock. Skipped on Windows, where probing a pid with
    os.kill would terminate it.
    """
    if os.name == 'nt':
        return
    pattern = re.compile(rf'\.{re.escape(name)}\.(\d+)\.[0-9a-f]{{32}}\.tmp')
    try:
        entries = os.listdir(directory)
    except OSError:
        return
    for entry in entries:
        match = pattern.fullmatch(entry)
        if match is None:
            continue
        pid = int(match.group(1))
        stale = os.path.join(directory, entry)
        if (pid != os.getpid() and _pid_alive(pid)) or entry in _LIVE_STAGINGS:
            continue
        if os.path.isdir(stale) and not os.path.islink(stale):
            if not _is_locked(stale):
                shutil.rmtree(stale, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.remove(stale)
