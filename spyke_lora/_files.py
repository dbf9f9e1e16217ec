"""Writing files whole: every file spyke-lora writes goes through here; and where spyke-lora keeps its cache.

A file is written under a hidden temporary name in its own folder, flushed and fsynced, then renamed over its final
name (atomic on one filesystem), and the folder is fsynced so the rename survives a power cut. A kill at any moment
leaves the old file or the new one under the final name, never half of one; a failed write removes its temporary.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path", "cache_dir", "fsync_dir", "fsync_file", "sha256", "temporary_name", "write_atomically"]


_SERIAL = itertools.count(1)  # two writers of one file in one process (two threads) never share a temporary


def temporary_name(final: Path, *, keep_suffix: bool = False) -> Path:
    """``.NAME.PID.N.partial`` next to ``final``: hidden, in the same folder (so the rename is atomic), unique to
    this process and call, and not listed by tools that look for ``final``'s extension (ComfyUI, a LoRA loader).
    ``keep_suffix``: end with ``final``'s suffix anyway, for writers that choose the format from the extension
    (sd-scripts, Pillow)."""
    unique = f"{os.getpid()}.{next(_SERIAL)}"
    if keep_suffix:
        return final.with_name(f".{final.stem}.{unique}.partial{final.suffix}")
    return final.with_name(f".{final.name}.{unique}.partial")


def cache_dir() -> Path:
    """Where spyke-lora keeps what it builds or measures once (the tiny model, the memory calibrations).

    Returns:
        ``$SPYKE_LORA_CACHE``, else ``~/.cache/spyke-lora``.
    """
    return Path(os.environ.get("SPYKE_LORA_CACHE") or Path.home() / ".cache" / "spyke-lora").expanduser()


def fsync_file(path: Path) -> None:
    """Flush ``path``'s data to the disk."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX; Windows cannot open a folder, and its rename is durable enough)."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(final: Path, *, keep_suffix: bool = False) -> Iterator[Path]:
    """A temporary path for a writer that takes a path (safetensors, Pillow, sd-scripts' savers). When the block
    ends normally the file is fsynced and renamed to ``final``; when it raises, the temporary is removed."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    temp = temporary_name(final, keep_suffix=keep_suffix)
    try:
        yield temp
        fsync_file(temp)
        os.replace(temp, final)
        fsync_dir(final.parent)
    finally:
        temp.unlink(missing_ok=True)


def write_atomically(final: Path, data: str | bytes) -> Path:
    """Write ``data`` (text as UTF-8) to ``final`` whole."""
    with atomic_path(final) as temp:
        if isinstance(data, str):
            temp.write_text(data, encoding="utf-8")
        else:
            temp.write_bytes(data)
    return Path(final)


def sha256(path: Path) -> str:
    """The file's SHA-256, hex, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
