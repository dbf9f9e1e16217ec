"""Device policy: which device a run uses and what that device can do. Pure functions, testable anywhere.

The rules (from running sd-scripts on Apple Silicon, CUDA and CPU):

* ``mps``: no mixed precision (fp16 autocast raises "fp16 mixed precision requires a GPU"), the VAE in fp32
  (a half VAE gives NaN losses), no 8-bit optimizers (bitsandbytes is CUDA-only), no xformers (CUDA-only): sdpa,
  and data-loader workers 0 (macOS starts workers with ``spawn``, which breaks in notebooks).
* ``cuda``: the requested precision is honoured; ``auto`` means fp16.
* ``cpu``: no mixed precision; sdpa; workers 0 (the step, not the loading, is the bottleneck).
"""

from __future__ import annotations

import dataclasses
import platform
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from ._errors import DeviceError

__all__ = [
    "DeviceFacts",
    "DeviceChoice",
    "available_devices",
    "device_facts",
    "device_name",
    "memory_reader",
    "choose_device",
    "resolve_device",
]


@dataclasses.dataclass(frozen=True)
class DeviceChoice:
    """What a run does on its device. ``corrections`` says what was changed from the request, and why."""

    device: str  # "cuda", "mps" or "cpu"
    mixed_precision: str  # "no", "fp16" or "bf16"
    full_precision_vae: bool  # keep the VAE in fp32
    attention: str  # "sdpa" or "xformers"
    data_loader_workers: int | None  # None: sd-scripts' own default
    corrections: tuple[str, ...] = ()


def resolve_device(requested: str, *, cuda_available: bool, mps_available: bool) -> str:
    """``auto`` -> cuda, else mps, else cpu. An explicit device that is not available is an error."""
    if requested == "auto":
        return "cuda" if cuda_available else "mps" if mps_available else "cpu"
    if requested == "cuda" and not cuda_available:
        raise DeviceError("`device` is 'cuda' but torch sees no CUDA GPU; use device = 'auto' or 'cpu'")
    if requested == "mps" and not mps_available:
        raise DeviceError(
            "`device` is 'mps' but torch reports MPS unavailable (it needs Apple Silicon, macOS 12.3+ and a torch "
            "build with MPS); use device = 'auto' or 'cpu'"
        )
    if requested not in ("cuda", "mps", "cpu"):
        raise DeviceError(f"`device` must be 'auto', 'cuda', 'mps' or 'cpu', got {requested!r}")
    return requested


def _is_8bit_optimizer(optimizer_type: str) -> bool:
    name = optimizer_type.lower().replace("_", "")
    return "8bit" in name or "bitsandbytes" in name


def choose_device(device: str, *, mixed_precision: str, optimizer_type: str, xformers: bool = False) -> DeviceChoice:
    """The policy for one resolved device. Raises :class:`DeviceError` for what the device cannot run."""
    corrections: list[str] = []
    if device != "cuda":
        if _is_8bit_optimizer(optimizer_type):
            raise DeviceError(
                f"`optimizer_type` {optimizer_type!r} needs bitsandbytes, which runs on CUDA only, and this run is "
                f"on {device!r}; use optimizer_type = 'AdamW'"
            )
        if xformers:
            raise DeviceError(
                f"`extra_args.xformers` needs CUDA and this run is on {device!r}; remove it (sdpa attention is used)"
            )
    if device == "cuda":
        precision = "fp16" if mixed_precision == "auto" else mixed_precision
        return DeviceChoice("cuda", precision, False, "xformers" if xformers else "sdpa", None, ())
    if mixed_precision in ("fp16", "bf16"):
        why = "fp16 mixed precision requires a GPU" if device == "mps" else "mixed precision gains nothing on CPU"
        corrections.append(f"mixed_precision {mixed_precision!r} changed to 'no' on {device}: {why}")
    return DeviceChoice(device, "no", device == "mps", "sdpa", 0, tuple(corrections))


@dataclasses.dataclass(frozen=True)
class DeviceFacts:
    """What torch reports about this machine's devices. Read in one place (:func:`device_facts`), so every decision
    that depends on the machine can be given another machine's facts in a test."""

    torch_version: str | None  # None: torch is not installed
    mps_built: bool
    mps_available: bool
    cuda_available: bool
    cuda_device: str | None  # the first GPU's name
    cuda_devices: int | None = None  # how many CUDA GPUs torch sees (CUDA_VISIBLE_DEVICES); None: 1 if available


def device_facts() -> DeviceFacts:
    """This machine's :class:`DeviceFacts`. Imports torch."""
    try:
        import torch
    except ImportError:
        return DeviceFacts(None, False, False, False, None)
    mps_backend = getattr(torch.backends, "mps", None)
    cuda = bool(torch.cuda.is_available())
    return DeviceFacts(
        torch_version=torch.__version__,
        mps_built=bool(mps_backend is not None and mps_backend.is_built()),
        mps_available=bool(mps_backend is not None and sys.platform == "darwin" and mps_backend.is_available()),
        cuda_available=cuda,
        cuda_device=torch.cuda.get_device_name(0) if cuda else None,
        cuda_devices=int(torch.cuda.device_count()) if cuda else 0,
    )


def visible_gpus(facts: DeviceFacts) -> int:
    """How many CUDA GPUs a run's processes can be given, one each.

    Args:
        facts: The machine's facts.

    Returns:
        ``cuda_devices``; 1 when it was not counted and CUDA is available; 0 without CUDA.
    """
    if not facts.cuda_available:
        return 0
    return facts.cuda_devices if facts.cuda_devices is not None else 1


def available_devices() -> tuple[bool, bool]:
    """(cuda_available, mps_available) as torch sees them. Imports torch."""
    facts = device_facts()
    return facts.cuda_available, facts.mps_available


def _sysctl(key: str) -> str:
    """``sysctl -n KEY`` (macOS); empty when it cannot be read."""
    try:
        out = subprocess.run(["sysctl", "-n", key], capture_output=True, text=True, timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip()


def _cpuinfo_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux); empty elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.lower().startswith(("model name", "hardware")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _cuda_name() -> str:
    import torch

    return str(torch.cuda.get_device_name(torch.cuda.current_device()))


def device_name(
    device: str,
    *,
    platform_name: str = sys.platform,
    sysctl: Callable[[str], str] = _sysctl,
    cuda_name: Callable[[], str] = _cuda_name,
    cpuinfo: Callable[[], str] = _cpuinfo_model,
) -> str:
    """What the training device is, in words (LORA-04's proof that a Mac trains on its GPU): the GPU's name on
    CUDA; on MPS the Mac's chip as ``sysctl machdep.cpu.brand_string`` reads it ("Apple M1 Pro", whose GPU MPS is);
    the processor's model on the CPU. The readers are parameters so the logic is tested on any machine."""
    if device == "cuda":
        return cuda_name()
    if platform_name == "darwin":
        return sysctl("machdep.cpu.brand_string") or platform.machine()
    return cpuinfo() or platform.processor() or platform.machine()


def memory_reader(device: str) -> Callable[[], int | None]:
    """A function giving the bytes in use on ``device`` now: ``torch.mps.current_allocated_memory()`` on MPS,
    ``torch.cuda.memory_allocated()`` on CUDA, the process's resident memory on the CPU (unified memory on a Mac is
    shared, so the MPS figure is what the GPU allocator holds, not the whole process)."""
    if device == "mps":
        import torch

        return lambda: int(torch.mps.current_allocated_memory())
    if device == "cuda":
        import torch

        return lambda: int(torch.cuda.memory_allocated())
    import psutil

    process = psutil.Process()
    return lambda: int(process.memory_info().rss)
