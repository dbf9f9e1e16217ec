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
import sys

from ._errors import DeviceError

__all__ = ["DevicePlan", "SpykeLoraWarning", "available_devices", "plan_device", "resolve_device"]


class SpykeLoraWarning(UserWarning):
    """A setting was corrected to one that works (for example fp16 on MPS became no mixed precision)."""


@dataclasses.dataclass(frozen=True)
class DevicePlan:
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


def plan_device(device: str, *, mixed_precision: str, optimizer_type: str, xformers: bool = False) -> DevicePlan:
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
        return DevicePlan("cuda", precision, False, "xformers" if xformers else "sdpa", None, ())
    if mixed_precision in ("fp16", "bf16"):
        why = "fp16 mixed precision requires a GPU" if device == "mps" else "mixed precision gains nothing on CPU"
        corrections.append(f"mixed_precision {mixed_precision!r} changed to 'no' on {device}: {why}")
    return DevicePlan(device, "no", device == "mps", "sdpa", 0, tuple(corrections))


def available_devices() -> tuple[bool, bool]:
    """(cuda_available, mps_available) as torch sees them. Imports torch."""
    import torch

    cuda = bool(torch.cuda.is_available())
    mps_backend = getattr(torch.backends, "mps", None)
    mps = bool(mps_backend is not None and sys.platform == "darwin" and mps_backend.is_available())
    return cuda, mps
