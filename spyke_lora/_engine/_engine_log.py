"""Where sd-scripts' output goes: its prints, log lines and tqdm bars, and nothing of the caller's.

``contextlib.redirect_stdout`` swaps ``sys.stdout`` for the whole process: in a notebook, a ``print()`` in an
``iter_events`` loop body (the notebook's thread) or in a callback would land in the engine log instead of the cell.
Here ``sys.stdout`` and ``sys.stderr`` are routed by thread: only what the run's own thread writes goes to the log,
and not even that while a callback is being called (:func:`caller_output`).
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

__all__ = ["caller_output", "engine_output", "text_progress_bars"]

_local = threading.local()  # .to_caller: this thread is running the caller's code (a callback)


class _Routed(io.TextIOBase):
    """A text stream that writes to ``log`` from ``thread`` (outside callbacks) and to ``caller`` otherwise."""

    def __init__(self, caller: TextIO, log: TextIO, thread: int) -> None:
        self.caller, self.log, self.thread = caller, log, thread

    def target(self) -> TextIO:
        if threading.get_ident() == self.thread and not getattr(_local, "to_caller", False):
            return self.log
        return self.caller

    def write(self, text: str) -> int:
        return self.target().write(text)

    def flush(self) -> None:
        self.target().flush()

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:  # tqdm and rich ask: the log is no terminal
        return self.target().isatty()

    def fileno(self) -> int:
        return self.target().fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.target(), "encoding", None) or "utf-8"

    def __getattr__(self, name: str) -> Any:
        return getattr(self.target(), name)


@contextlib.contextmanager
def engine_output(path: Path | None, *, append: bool = False) -> Iterator[Path | None]:
    """For the block, what this thread writes to ``sys.stdout``/``sys.stderr`` goes to the file ``path`` (opened
    now, so a caller takes its locks first: a refused run must not empty a live run's log); other threads' output
    and callbacks' output go where they went before. ``path`` None: nothing is redirected."""
    if path is None:
        yield None
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a" if append else "w", encoding="utf-8") as log:
        me = threading.get_ident()
        saved = sys.stdout, sys.stderr
        sys.stdout = _Routed(saved[0], log, me)  # type: ignore[assignment]
        sys.stderr = _Routed(saved[1], log, me)  # type: ignore[assignment]
        try:
            yield path
        finally:
            sys.stdout, sys.stderr = saved
            log.flush()
            os.fsync(log.fileno())


@contextlib.contextmanager
def caller_output() -> Iterator[None]:
    """For the block (a callback being called on the run's thread), this thread's output goes to the caller's
    streams, not to the engine log."""
    before = getattr(_local, "to_caller", False)
    _local.to_caller = True
    try:
        yield
    finally:
        _local.to_caller = before


@contextlib.contextmanager
def text_progress_bars() -> Iterator[None]:
    """For the block, the progress bars of sd-scripts' sampler are text bars that go where sd-scripts' output goes.

    sd-scripts draws its own bars with ``tqdm.tqdm`` (text), but its sampler runs a diffusers pipeline, whose
    ``progress_bar`` uses ``tqdm.auto``: in a Jupyter kernel with ipywidgets that is a widget, displayed in the cell
    (one per sample image) whatever the engine log says. The ``tqdm`` names diffusers bound from ``tqdm.auto`` are
    swapped for the text class for the run and put back after it; the caller's own modules are not touched."""
    import tqdm.auto
    import tqdm.std

    auto, text = tqdm.auto.tqdm, tqdm.std.tqdm
    swapped = []
    if auto is not text:
        for name, module in list(sys.modules.items()):
            if name.split(".", 1)[0] == "diffusers" and getattr(module, "tqdm", None) is auto:
                swapped.append(module)
                module.tqdm = text
    try:
        yield
    finally:
        for module in swapped:
            module.tqdm = auto
