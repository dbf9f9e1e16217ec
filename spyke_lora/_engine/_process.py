"""Process-wide state a run touches, saved before and put back after, so a run leaves nothing behind.

sd-scripts and accelerate keep singletons (the four strategy classes' ``_strategy``, accelerate's
``PartialState``/``AcceleratorState``/``GradientState``), seed every random generator, and may set environment
variables. A second run in the same process needs all of those fresh; the caller needs them as they were.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import os
import random
from collections.abc import Iterable, Iterator
from types import ModuleType
from typing import Any

_STRATEGY_CLASSES = (
    "TokenizeStrategy",
    "TextEncodingStrategy",
    "TextEncoderOutputsCachingStrategy",
    "LatentsCachingStrategy",
)


@contextlib.contextmanager
def isolated_run(train_network: ModuleType, env: dict[str, str]) -> Iterator[None]:
    """Fresh engine singletons inside, the caller's random generators, environment and singletons outside."""
    import numpy as np
    import torch
    from accelerate.state import AcceleratorState, GradientState, PartialState

    strategy_base = train_network.strategy_base
    singletons = [PartialState, AcceleratorState, GradientState]
    saved_singletons = [dict(cls._shared_state) for cls in singletons]
    saved_strategies = {name: getattr(strategy_base, name)._strategy for name in _STRATEGY_CLASSES}
    saved_rng: tuple[Any, ...] = (
        random.getstate(),
        np.random.get_state(),
        torch.get_rng_state(),
        torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    )
    saved_env = dict(os.environ)

    def fresh() -> None:
        for cls in singletons:
            cls._shared_state.clear()
        for name in _STRATEGY_CLASSES:
            getattr(strategy_base, name)._strategy = None

    fresh()
    os.environ.update(env)
    try:
        yield
    finally:
        fresh()
        for cls, state in zip(singletons, saved_singletons):
            cls._shared_state.update(state)
        for name, strategy in saved_strategies.items():
            getattr(strategy_base, name)._strategy = strategy
        for key in set(os.environ) - set(saved_env):
            del os.environ[key]
        for key, value in saved_env.items():
            if os.environ.get(key) != value:
                os.environ[key] = value
        random.setstate(saved_rng[0])
        np.random.set_state(saved_rng[1])
        torch.set_rng_state(saved_rng[2])
        if saved_rng[3] is not None:
            torch.cuda.set_rng_state_all(saved_rng[3])


@contextlib.contextmanager
def class_attributes_restored(modules: Iterable[ModuleType]) -> Iterator[None]:
    """The list, dict and set attributes of every class defined in ``modules`` as they were before the block.

    sd-scripts changes such class attributes in place: ``LoRANetwork.__init__`` does ``target_modules =
    LoRANetwork.UNET_TARGET_REPLACE_MODULE; target_modules += UNET_TARGET_REPLACE_MODULE_CONV2D_3X3`` whenever a
    network is made from weights (sampling files on disk) or with ``conv_dim``. The class list keeps the 3x3 targets
    for the rest of the process, so the next run's LoRA also wraps the Linear and 1x1 layers inside every ResNet
    block: other modules, other random draws, another LoRA (found when a training run after ``sample()`` gave other
    losses than the same run before it). The contents are put back into the same objects, so every reference sees
    them; an attribute rebound to a new object is set back too.
    """
    saved = []
    for module in modules:
        for cls in [v for v in vars(module).values() if isinstance(v, type) and v.__module__ == module.__name__]:
            for name, value in list(vars(cls).items()):
                if isinstance(value, (list, dict, set)) and not name.startswith("__"):
                    saved.append((cls, name, value, copy.copy(value)))
    try:
        yield
    finally:
        for cls, name, value, contents in saved:
            if vars(cls).get(name) is not value:
                setattr(cls, name, value)
            if value != contents:
                value.clear()
                if isinstance(value, list):
                    value.extend(contents)
                else:
                    value.update(contents)


@contextlib.contextmanager
def preserved_random_state() -> Iterator[None]:
    """Python's, NumPy's and torch's random generators as they were before the block (a run seeds them all, and
    log handlers such as rich draw from Python's)."""
    import numpy as np
    import torch

    saved = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])


def free_memory() -> None:
    """Collect the models a run left unreferenced, return cached device memory, and hand the freed heap back to the
    operating system.

    The last step matters for runs in one process (a notebook sweep): after a run every tensor is freed, but glibc
    keeps the freed pages in its heap, fragmented (measured on the tiny model: 1.5 GB more resident memory after
    each run, 983 -> 1541 -> 3134 -> 4596 MB over three runs, with no tensor alive); ``malloc_trim(0)`` returns them
    (back to 1090 MB). macOS's allocator gets the same request through ``malloc_zone_pressure_relief``.
    """
    import torch

    gc.collect()
    _release_heap()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    mps = getattr(torch, "mps", None)
    if mps is not None and torch.backends.mps.is_available():
        mps.empty_cache()


def _release_heap() -> None:
    import ctypes
    import ctypes.util
    import sys

    try:
        if sys.platform.startswith("linux"):
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            if hasattr(libc, "malloc_trim"):  # glibc (not musl)
                libc.malloc_trim(0)
        elif sys.platform == "darwin":
            libc = ctypes.CDLL("/usr/lib/libSystem.B.dylib")
            libc.malloc_zone_pressure_relief.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
            libc.malloc_zone_pressure_relief(None, 0)  # every zone, as much as it can
    except (OSError, AttributeError):  # another C library: nothing to ask
        pass
