"""Process-wide state a run touches, saved before and put back after, so a run leaves nothing behind.

sd-scripts and accelerate keep singletons (the four strategy classes' ``_strategy``, accelerate's
``PartialState``/``AcceleratorState``/``GradientState``), seed every random generator, and may set environment
variables. A second run in the same process needs all of those fresh; the caller needs them as they were.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import os
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from types import ModuleType
from typing import Any

_STRATEGY_CLASSES = (
    "TokenizeStrategy",
    "TextEncodingStrategy",
    "TextEncoderOutputsCachingStrategy",
    "LatentsCachingStrategy",
)


@dataclasses.dataclass(frozen=True)
class DeviceGenerator:
    """The random generator of an accelerator as two functions, so the code that saves and restores it can be given
    a stand-in and tested on any machine.

    Why it matters on a Mac: ``torch.manual_seed`` seeds the CPU, CUDA *and* MPS generators, and training noise is
    drawn on the device (``torch.randn_like(latents)``). sd-scripts' sampler seeds with it and puts back only the CPU
    and CUDA generators (``library/train_util.py``, ``sample_images_common``), and accelerate's ``save_state`` stores
    no MPS generator, so on MPS every stretch after a sample would replay the same noise and a resumed run would draw
    other noise than an uninterrupted one."""

    device: str  # "mps" or "cuda"
    get_state: Callable[[], Any]
    set_state: Callable[[Any], None]


def device_generator(device: str) -> DeviceGenerator | None:
    """The generator of ``device`` ("mps", "cuda"; None for "cpu", or when torch lacks that device here)."""
    import torch

    if device == "mps" and getattr(torch, "mps", None) is not None and torch.backends.mps.is_available():
        return DeviceGenerator("mps", torch.mps.get_rng_state, torch.mps.set_rng_state)
    if device == "cuda" and torch.cuda.is_available():
        return DeviceGenerator("cuda", torch.cuda.get_rng_state_all, torch.cuda.set_rng_state_all)
    return None


def available_generators() -> list[DeviceGenerator]:
    """Every accelerator generator on this machine: what a run's seeding touches besides the CPU's."""
    return [g for g in (device_generator("cuda"), device_generator("mps")) if g is not None]


@contextlib.contextmanager
def generators_preserved(generators: Sequence[DeviceGenerator]) -> Iterator[None]:
    """The states of ``generators`` as they were before the block."""
    saved = [(g, g.get_state()) for g in generators]
    try:
        yield
    finally:
        for generator, state in saved:
            generator.set_state(state)


@contextlib.contextmanager
def cuda_rng_calls_reach(generator: DeviceGenerator | None) -> Iterator[None]:
    """For the block, ``torch.cuda.get_rng_state()`` / ``set_rng_state()`` read and write ``generator`` when it is
    the MPS generator and this machine has no CUDA.

    sd-scripts v0.10.1's validation (``train_network.py`` l.1372-1399, ``switch_rng_state`` / ``restore_rng_state``,
    closures inside ``train()``) calls exactly those two functions when the device is ``mps``: without CUDA they
    raise, so validation crashes on a Mac. What the code means is the device's generator, which is what it gets
    here; the two attributes of ``torch.cuda`` are put back afterwards. A machine with CUDA is left alone (the calls
    work there, on the CUDA generator, as sd-scripts wrote them)."""
    import torch

    if generator is None or generator.device != "mps" or torch.cuda.is_available():
        yield
        return
    cuda = torch.cuda
    saved = (cuda.get_rng_state, cuda.set_rng_state)

    def get_rng_state(device: Any = "cuda") -> Any:
        return generator.get_state()

    def set_rng_state(new_state: Any, device: Any = "cuda") -> None:
        generator.set_state(new_state)

    cuda.get_rng_state, cuda.set_rng_state = get_rng_state, set_rng_state
    try:
        yield
    finally:
        cuda.get_rng_state, cuda.set_rng_state = saved


@contextlib.contextmanager
def isolated_run(
    train_network: ModuleType, env: dict[str, str], generators: Sequence[DeviceGenerator] | None = None
) -> Iterator[None]:
    """Fresh engine singletons inside, the caller's random generators (CPU, and ``generators``: by default every
    accelerator generator here, MPS included), environment and singletons outside."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    strategy_base = train_network.strategy_base
    singletons = [PartialState, AcceleratorState, GradientState]
    saved_singletons = [dict(cls._shared_state) for cls in singletons]
    saved_strategies = {name: getattr(strategy_base, name)._strategy for name in _STRATEGY_CLASSES}
    saved_env = dict(os.environ)

    def fresh() -> None:
        for cls in singletons:
            cls._shared_state.clear()
        for name in _STRATEGY_CLASSES:
            getattr(strategy_base, name)._strategy = None

    fresh()
    os.environ.update(env)
    try:
        with preserved_random_state(generators):
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


@contextlib.contextmanager
def module_values_restored(modules: Iterable[ModuleType]) -> Iterator[None]:
    """The plain values (bool, int, float, str, None) at the top of ``modules`` as they were before the block.

    sd-scripts sets some with ``global``: ``library.train_util.HIGH_VRAM`` becomes True for the rest of the process
    after one run with ``--highvram``, which changes how every later run caches latents."""
    plain = (bool, int, float, str, type(None))
    saved = [
        (module, name, value)
        for module in modules
        for name, value in list(vars(module).items())
        if not name.startswith("__") and isinstance(value, plain)
    ]
    try:
        yield
    finally:
        for module, name, value in saved:
            if vars(module).get(name, _MISSING) is not value:
                setattr(module, name, value)


_MISSING = object()


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
def preserved_random_state(generators: Sequence[DeviceGenerator] | None = None) -> Iterator[None]:
    """Python's, NumPy's and torch's CPU generators, and ``generators`` (by default every accelerator generator on
    this machine, MPS included), as they were before the block (a run seeds them all, and log handlers such as rich
    draw from Python's)."""
    import numpy as np
    import torch

    saved = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    try:
        with generators_preserved(available_generators() if generators is None else generators):
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
    """Ask the C allocator to give freed heap pages back to the operating system (see :func:`free_memory`)."""
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
