"""One run per output: an operating-system lock on a hidden file next to the LoRA files.

Two runs (two processes, two notebooks, two threads of one process) never write the same
``output_dir``/``output_name`` at once.

The lock is ``flock(2)`` on ``OUTPUT_DIR/.NAME.lock``, taken through ``filelock``, not a PID file: the kernel drops
it when its process ends, however it ends (SIGKILL, an out-of-memory kill, a crash), so a dead run's lock is free at
once and nothing has to guess whether a process id or a host name still stands for a live run. Guessing is what
went wrong before: an empty file caught between its creation and its contents looked dead and was deleted, two runs
taking over the same stale file deleted each other's new one, and a Mac renamed by its network saw its own old lock
as a live run on another machine forever. Here nothing ever decides liveness from the file's contents, and nothing
deletes a lock file.

* Each :func:`output_lock` is its own lock object with its own open file (``is_singleton=False``), and ``flock``
  locks conflict between open files even within one process: a second ``output_lock`` of the same output, from
  another thread or the same one, is refused like another process's, not entered again. No waiting: one try.
* The holder writes its pid, host and start time into the file after taking the lock, through the locked
  descriptor, only to name the owner in :class:`OutputInUse`; it clears them before letting go. A contender that
  finds them missing (the owner has just taken the lock) says so rather than inventing an owner.
* The file stays on release (``preserve_lock_file``, as ``filelock`` does on Unix anyway): removing it would race
  with a contender that opened it just before the removal and then locks an inode no longer at the path, while a
  third run creates and locks a new file: two owners. A leftover ``.NAME.lock`` therefore means nothing; only
  :func:`output_in_use` tells whether an output is held.
* A filesystem without ``flock`` is refused (``fallback_to_soft=False``) rather than falling back to ``filelock``'s
  existence-based soft lock, which is a PID file again.
* ``filelock`` closes a held descriptor in forked children (data loader workers), so a child never keeps the lock
  after its parent ends.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout, lock_descriptor, unlock_descriptor

from ._config import TrainConfig
from ._errors import ConfigError, OutputInUse

__all__ = ["lock_path", "output_in_use", "output_lock"]

# flock(2) unsupported by the filesystem (some FUSE and network mounts)
_NO_FLOCK = {getattr(errno, name) for name in ("ENOSYS", "ENOLCK", "EOPNOTSUPP", "ENOTSUP") if hasattr(errno, name)}


def lock_path(cfg: TrainConfig) -> Path:
    """The lock file of ``cfg``'s output: ``OUTPUT_DIR/.NAME.lock``."""
    return _path(cfg.output_dir, cfg.output_name)


def _path(folder: str | os.PathLike[str], name: str) -> Path:
    return Path(folder) / f".{name}.lock"


@contextlib.contextmanager
def output_lock(cfg: TrainConfig) -> Iterator[Path]:
    """Hold the lock of ``cfg``'s output for the block, yielding the lock file's path. Refused at once with
    :class:`OutputInUse`, naming the owner when it has written itself in, while anyone else holds it."""
    path = lock_path(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    held: list[int] = []

    def write_owner(fd: int) -> None:  # runs with the lock held, on the locked descriptor
        held.append(fd)
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        with contextlib.suppress(OSError):  # the owner is information only: a full disk must not cost the lock
            _rewrite(fd, json.dumps(owner).encode())

    lock = FileLock(
        path,
        timeout=0,
        blocking=False,
        thread_local=False,
        is_singleton=False,
        fallback_to_soft=False,
        preserve_lock_file=True,
        on_acquired=write_owner,
    )
    try:
        lock.acquire()
    except Timeout:
        raise OutputInUse(
            f"another run is writing `{cfg.output_name}` in {cfg.output_dir}: {_owner(path)} (lock {path}); wait for "
            f"it to end, stop it, or choose another output_name or output_dir"
        ) from None
    except OSError as e:
        if e.errno not in _NO_FLOCK:
            raise
        raise ConfigError(
            f"`output_dir` {cfg.output_dir} is on a filesystem without file locks ({e.strerror}); spyke-lora locks "
            f"each output so two runs never write it at once: choose an output_dir on a local disk"
        ) from e
    try:
        yield path
    finally:
        try:
            if held:
                with contextlib.suppress(OSError):
                    _rewrite(held[0], b"")  # a leftover file names no one
        finally:
            lock.release()


def output_in_use(where: TrainConfig | str | os.PathLike[str], name: str | None = None) -> bool:
    """Whether a live process (this one included) holds the lock of an output: ``output_in_use(cfg)`` or
    ``output_in_use(output_dir, output_name)``. A non-blocking try of the same lock, released at once; a missing
    lock file is free (a holder's file exists while it holds), and none is created. The try holds the lock for an
    instant: a run starting at that very moment is refused as if the output were in use. :class:`OSError` when the
    lock file cannot be opened."""
    if isinstance(where, TrainConfig):
        path = lock_path(where)
    elif name is None:
        raise TypeError("output_in_use(output_dir, output_name): the output_name is missing")
    else:
        path = _path(where, name)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        return False
    try:
        if not lock_descriptor(fd, blocking=False):
            return True
        unlock_descriptor(fd)
        return False
    finally:
        os.close(fd)


def _rewrite(fd: int, data: bytes) -> None:
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, data)


def _owner(path: Path) -> str:
    """Who holds the lock, as its holder wrote it; said plainly when it has not written it (yet)."""
    try:
        owner = json.loads(path.read_text(encoding="utf-8"))
        return f"process {int(owner['pid'])} on {owner['host']}, started {owner['started']}"
    except (OSError, ValueError, TypeError, KeyError):
        return "its owner has just taken the lock and not written its process, host and start time yet"
