"""One run per output: a lock file next to the LoRA files, so two runs (two processes, or two notebooks) never write
the same ``output_dir``/``output_name`` at once. A lock left by a process that no longer exists is taken over."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from ._config import TrainConfig
from ._errors import OutputInUse

__all__ = ["output_lock"]


def lock_path(cfg: TrainConfig) -> Path:
    return cfg.output_dir / f".{cfg.output_name}.lock"


@contextlib.contextmanager
def output_lock(cfg: TrainConfig) -> Iterator[Path]:
    """Hold the lock of ``cfg``'s output for the block; :class:`OutputInUse` names the live owner."""
    path = lock_path(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _read(path)
            if owner is not None and _alive(owner):
                raise OutputInUse(
                    f"another run is writing `{cfg.output_name}` in {cfg.output_dir}: process {owner.get('pid')} on "
                    f"{owner.get('host')}, started {owner.get('started')} (lock {path}); wait for it to end, stop it, "
                    f"or choose another output_name or output_dir"
                ) from None
            path.unlink(missing_ok=True)  # its process is gone: a crash or a kill left it
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    else:  # pragma: no cover - only when other processes keep recreating the lock
        raise OutputInUse(f"could not take the lock {path}; another run keeps taking it")
    try:
        yield path
    finally:
        if _read(path) == me:
            path.unlink(missing_ok=True)


def _read(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _alive(owner: dict) -> bool:
    """Whether the lock's process still runs. On another host that cannot be told: assume it does."""
    if owner.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(owner.get("pid", -1)), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    except (ValueError, OSError):
        return False
    return True
