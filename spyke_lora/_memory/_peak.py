"""The highest memory in use on a training device over a stretch of time: :class:`PeakMeter`.

    with PeakMeter("cuda") as meter:
        ...  # the work to measure
    meter.peak()  # bytes, the highest since the meter started

How the peak is found depends on the device:

* ``cuda``: torch's own peak counter (``torch.cuda.reset_peak_memory_stats()`` at the start,
  ``torch.cuda.max_memory_allocated()``): exact, no thread.
* ``cpu`` on Linux: the kernel's high-water mark of the process's resident memory (``VmHWM`` in
  ``/proc/self/status``), reset at the start by writing ``5`` to ``/proc/self/clear_refs`` (Linux 4.0 and later):
  exact, no thread.
* ``mps``, and the CPU where that reset cannot be written (not Linux, no permission): a daemon thread reads the
  memory in use every 20 ms (``torch.mps.current_allocated_memory()`` on MPS, psutil's resident memory on the CPU)
  and keeps the highest, so a spike shorter than a poll can be missed.

The readers can be injected (``read``, ``clear_refs``, ``status``, ``torch``, ``interval_s``), so that each way can
be tested on any machine.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = ["PeakMeter"]

_CLEAR_REFS = "/proc/self/clear_refs"
_STATUS = "/proc/self/status"


class PeakMeter:
    """The highest bytes in use on ``device`` ("cuda", "cuda:N", "mps" or "cpu") since :meth:`start`.

    :meth:`start` begins measuring from now (again, if it was measuring); :meth:`peak` is the highest since then,
    None before the first start or when the memory cannot be read; :meth:`close` stops measuring (and the polling
    thread, where there is one) and keeps the peak reached, which :meth:`peak` goes on returning. As a context
    manager it starts on entry and closes on exit.

    Injected readers: ``read`` (a function giving the bytes in use now) replaces what the polling thread reads (on
    the CPU it is polled only where the Linux way fails); ``clear_refs`` and ``status`` replace the ``/proc/self``
    files of the Linux CPU way; ``torch`` replaces the torch module of the CUDA and MPS ways; ``interval_s`` is the
    polling interval. A meter that polls holds a thread until it is closed: close it, or use it in a ``with``."""

    def __init__(
        self,
        device: str,
        *,
        read: Callable[[], int] | None = None,
        clear_refs: str | os.PathLike[str] = _CLEAR_REFS,
        status: str | os.PathLike[str] = _STATUS,
        torch: Any = None,
        interval_s: float = 0.02,
    ) -> None:
        kind = device.split(":")[0]
        if kind not in ("cuda", "mps", "cpu"):
            raise ValueError(f"PeakMeter measures 'cuda', 'mps' or 'cpu', not {device!r}")
        if interval_s <= 0:
            raise ValueError(f"`interval_s` must be positive, got {interval_s}")
        self.device = device
        self._kind = kind
        self._read = read
        self._clear_refs = Path(clear_refs)
        self._status = Path(status)
        self._torch = torch
        self.interval_s = interval_s
        # the way in use once started: "cuda", "hwm" (Linux VmHWM) or "poll"; None before start
        self.method: str | None = None
        self._closed_peak: int | None = None
        self._closed = False
        # the polling way
        self._lock = threading.Lock()
        self._reader: Callable[[], int] | None = None  # what the polling reads: `read`, or the device's own
        self._max: int | None = None
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None

    # --- the public side ------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Begin measuring from now: the peak so far is forgotten."""
        self._closed, self._closed_peak = False, None
        if self._kind == "cuda":
            self._torch_module().cuda.reset_peak_memory_stats(self.device)
            self.method = "cuda"
        elif self._kind == "cpu" and self._reset_hwm():
            self.method = "hwm"
        else:
            self.method = "poll"
            self._start_polling()

    def peak(self) -> int | None:
        """The highest bytes in use on the device since :meth:`start` (until :meth:`close`, once closed)."""
        if self._closed:
            return self._closed_peak
        if self.method == "cuda":
            return int(self._torch_module().cuda.max_memory_allocated(self.device))
        if self.method == "hwm":
            return self._read_hwm()
        if self.method == "poll":
            self._sample()  # at least what is in use now
            with self._lock:
                return self._max
        return None  # not started

    def close(self) -> None:
        """Stop measuring; :meth:`peak` keeps returning the peak reached. Closing twice does nothing."""
        if self._closed or self.method is None:
            self._stop_polling()
            return
        peak = self.peak()
        self._stop_polling()
        self._closed, self._closed_peak = True, peak

    def __enter__(self) -> PeakMeter:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # --- each way -------------------------------------------------------------------------------------------------

    def _torch_module(self) -> Any:
        if self._torch is None:
            import torch

            self._torch = torch
        return self._torch

    def _reset_hwm(self) -> bool:
        """Reset the process's resident-memory high-water mark; False where that cannot be done."""
        try:
            with self._clear_refs.open("w", encoding="ascii") as f:
                f.write("5")
        except OSError:
            return False
        return self._read_hwm() is not None  # a kernel that takes the write but shows no VmHWM: poll instead

    def _read_hwm(self) -> int | None:
        try:
            text = self._status.read_text(encoding="ascii", errors="replace")
        except OSError:
            return None
        for line in text.splitlines():
            if line.startswith("VmHWM:"):
                value, _, unit = line.split(":", 1)[1].strip().partition(" ")
                return int(value) * 1024 if unit.strip() == "kB" else int(value)
        return None

    def _poll_reader(self) -> Callable[[], int]:
        if self._read is not None:
            return self._read
        if self._kind == "mps":
            torch = self._torch_module()
            return lambda: int(torch.mps.current_allocated_memory())
        import psutil

        process = psutil.Process()
        return lambda: int(process.memory_info().rss)

    def _start_polling(self) -> None:
        self._stop_polling()
        self._reader = self._poll_reader()
        with self._lock:
            self._max = None
        self._sample()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._poll, args=(self._stop,), daemon=True, name="spyke-lora-peak-meter"
        )
        self._thread.start()

    def _poll(self, stop: threading.Event) -> None:
        while not stop.wait(self.interval_s):
            if not self._sample():
                return  # the memory cannot be read: the peak stays what was seen

    def _sample(self) -> bool:
        assert self._reader is not None
        try:
            value = int(self._reader())
        except Exception:  # noqa: BLE001 - a reader that fails (a device gone) ends the measurement, not the run
            return False
        with self._lock:
            self._max = value if self._max is None else max(self._max, value)
        return True

    def _stop_polling(self) -> None:
        if self._thread is not None:
            assert self._stop is not None
            self._stop.set()
            self._thread.join()
            self._thread = self._stop = None
