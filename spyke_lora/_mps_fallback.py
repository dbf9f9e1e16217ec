"""``PYTORCH_ENABLE_MPS_FALLBACK``: set before torch is first imported, and whether it is in force.

MPS runs need the variable before torch is first imported: libtorch reads it once, when it loads (it registers the
MPS fallback kernel then), so an op MPS lacks runs on the CPU instead of failing. The package face imports this
module first, because nothing in the package imports torch before it; an explicit value is kept.

When torch was imported before this module, what the variable says now proves nothing: a caller may have set it
after ``import torch`` and before ``import spyke_lora``, too late for libtorch. Whether it was in force is then
decided by the environment the process started with (``/proc/self/environ`` on Linux, the kernel's copy of the
process's arguments and environment, ``sysctl KERN_PROCARGS2``, on macOS): a variable exported before Python started
was there when torch loaded; one that was not is reported as missing, whatever ``os.environ`` says now. A run on
MPS (and ``doctor()``) warns about it.
"""

import os
import sys
from collections.abc import Mapping

__all__ = [
    "TOO_LATE",
    "VARIABLE",
    "fallback_enabled",
    "fallback_in_force",
    "fallback_missing",
    "initial_environment",
    "parse_procargs2",
]

VARIABLE = "PYTORCH_ENABLE_MPS_FALLBACK"


def fallback_enabled(value: str | None) -> bool:
    """Whether libtorch reads ``value`` as "fallback on" (it parses an integer; anything but 0 turns it on).

    Args:
        value: The variable's value, or None when it is not set.

    Returns:
        True for a non-zero integer.
    """
    try:
        return value is not None and int(value.strip()) != 0
    except ValueError:
        return False


def parse_procargs2(data: bytes) -> dict[str, str]:
    """The environment in macOS's ``KERN_PROCARGS2`` record of a process: ``argc`` (a 32-bit int), the executable's
    path, NUL padding, ``argc`` arguments, then the environment's ``KEY=VALUE`` strings, each NUL-terminated.

    Args:
        data: The record, as ``sysctl`` returns it.

    Returns:
        The environment the process was started with.
    """
    argc = int.from_bytes(data[:4], sys.byteorder)
    parts = data[4:].split(b"\0")
    at = 1  # after the executable's path
    while at < len(parts) and parts[at] == b"":
        at += 1  # the padding after the path
    environment = {}
    for item in parts[at + argc :]:
        if not item:
            break
        key, equals, value = item.partition(b"=")
        if equals:
            environment[key.decode(errors="replace")] = value.decode(errors="replace")
    return environment


def _macos_environment() -> dict[str, str] | None:
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    mib = (ctypes.c_int * 3)(1, 49, os.getpid())  # CTL_KERN, KERN_PROCARGS2, this process
    size = ctypes.c_size_t(0)
    if libc.sysctl(mib, 3, None, ctypes.byref(size), None, 0) != 0 or not size.value:
        return None
    buffer = ctypes.create_string_buffer(size.value)
    if libc.sysctl(mib, 3, buffer, ctypes.byref(size), None, 0) != 0:
        return None
    return parse_procargs2(buffer.raw[: size.value])


def initial_environment(platform: str = sys.platform) -> dict[str, str] | None:
    """The environment this process was started with, before any ``os.environ`` change.

    Args:
        platform: ``sys.platform`` (tests pass another).

    Returns:
        The variables, or None where the platform's record cannot be read (then nothing is known).
    """
    try:
        if platform.startswith("linux"):
            with open("/proc/self/environ", "rb") as f:
                items = f.read().split(b"\0")
            return {
                k.decode(errors="replace"): v.decode(errors="replace")
                for k, eq, v in (item.partition(b"=") for item in items)
                if eq
            }
        if platform == "darwin":
            return _macos_environment()
    except (OSError, AttributeError, ValueError):
        return None
    return None


def fallback_in_force(torch_first: bool, initial: Mapping[str, str] | None, current: str | None) -> bool:
    """Whether libtorch loaded with the fallback on.

    Args:
        torch_first: torch was imported before this module.
        initial: The environment the process started with (None: unknown).
        current: The variable's value now (None: not set).

    Returns:
        With torch imported after this module, what the variable says now (this module set it first); with torch
        imported first, whether the process started with it on: a value set since cannot be shown to have come
        before ``import torch``, so it does not count.
    """
    if not torch_first:
        return fallback_enabled(current)
    return initial is not None and fallback_enabled(initial.get(VARIABLE))


_TORCH_FIRST = "torch" in sys.modules
TOO_LATE = _TORCH_FIRST and not fallback_in_force(True, initial_environment(), None)
os.environ.setdefault(VARIABLE, "1")


def fallback_missing() -> bool:
    """True when an op MPS lacks would fail instead of running on the CPU: torch was imported first without the
    variable in the process's starting environment (whatever it says now), or it is not on now."""
    return TOO_LATE or (not _TORCH_FIRST and not fallback_enabled(os.environ.get(VARIABLE)))
