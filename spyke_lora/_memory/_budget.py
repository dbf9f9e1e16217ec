"""How much memory a run may use on its device: read in one place, with the readers as parameters so every decision
that depends on it can be given another machine's figures in a test."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

__all__ = ["MemoryBudget", "device_budget", "resident_now"]


@dataclasses.dataclass(frozen=True)
class MemoryBudget:
    """What a run may use on its device (``bytes``; None when it cannot be read), where the figure comes from, and
    the machine's RAM (on a Mac the GPU's memory is the RAM: unified memory)."""

    bytes: int | None
    source: str
    ram_bytes: int | None = None

    def limited(self, limit: int | None) -> MemoryBudget:
        """This budget capped by ``memory_limit``."""
        if limit is None or (self.bytes is not None and self.bytes <= limit):
            return self
        return dataclasses.replace(self, bytes=limit, source=f"memory_limit (the device offers {_gb(self.bytes)})")


def _gb(value: int | None) -> str:
    return "an unknown amount" if value is None else f"{value / 1e9:.1f} GB"


def _available_ram() -> int | None:
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil is a dependency
        return None
    return int(psutil.virtual_memory().available)


def _total_ram() -> int | None:
    try:
        import psutil
    except ImportError:  # pragma: no cover
        return None
    return int(psutil.virtual_memory().total)


def resident_now() -> int | None:
    """This process's resident memory now (psutil)."""
    try:
        import psutil
    except ImportError:  # pragma: no cover
        return None
    return int(psutil.Process().memory_info().rss)


def _mps_recommended() -> int | None:
    import torch

    reader = getattr(torch.mps, "recommended_max_memory", None)
    return int(reader()) if reader is not None else None


def _cuda_free() -> int | None:
    import torch

    return int(torch.cuda.mem_get_info()[0])


def device_budget(
    device: str,
    *,
    available_ram: Callable[[], int | None] = _available_ram,
    total_ram: Callable[[], int | None] = _total_ram,
    mps_recommended: Callable[[], int | None] = _mps_recommended,
    cuda_free: Callable[[], int | None] = _cuda_free,
    resident: Callable[[], int | None] = resident_now,
) -> MemoryBudget:
    """The budget of ``device`` on this machine: on MPS, ``torch.mps.recommended_max_memory()`` (Metal's working-set
    limit, about two thirds of a 16 GB Mac's RAM), with the RAM; on CUDA, the card's free memory
    (``torch.cuda.mem_get_info``); on the CPU, the RAM available now (``psutil``: free plus reclaimable) plus what this
    process holds already (the run's figures count the whole process: a notebook's kernel trains in itself)."""
    ram = total_ram()
    if device == "mps":
        return MemoryBudget(mps_recommended(), "torch.mps.recommended_max_memory(), Metal's limit", ram)
    if device == "cuda":
        return MemoryBudget(cuda_free(), "free memory on the GPU (torch.cuda.mem_get_info)", ram)
    available, held = available_ram(), resident()
    if available is None:
        return MemoryBudget(None, "available RAM (psutil)", ram)
    return MemoryBudget(available + (held or 0), "available RAM plus this process's own (psutil)", ram)
