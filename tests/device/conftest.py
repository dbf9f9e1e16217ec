"""Tests that need an accelerator skip, with a reason, on a machine without it, unless the device is required.

A plain `pytest` collects tests/device everywhere: a test marked `mps` is skipped where torch has no MPS backend,
a test marked `gpu` where torch sees no CUDA device, so every machine passes or skips with a reason.

`make test-mps` and `make test-gpu` set SPYKE_LORA_REQUIRE_DEVICE=mps / gpu: then a missing device is an error
before any test runs, so those targets cannot go green by skipping everything on the wrong machine.
"""

import os

import pytest

import spyke_lora  # noqa: F401  (first: it sets PYTORCH_ENABLE_MPS_FALLBACK=1, which torch reads when imported)

REQUIRE_DEVICE_ENV = "SPYKE_LORA_REQUIRE_DEVICE"


def _mps_available() -> bool:
    import torch

    return bool(torch.backends.mps.is_available())


def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


# marker -> (is the device here?, the check as the user would run it, what a test with the marker needs)
DEVICES = {
    "mps": (
        _mps_available,
        "torch.backends.mps.is_available() is False",
        "an Apple Silicon Mac with an MPS build of torch",
    ),
    "gpu": (_cuda_available, "torch.cuda.is_available() is False", "a CUDA GPU with a CUDA build of torch"),
}


def skip_reason(marker: str) -> str:
    return f"needs {DEVICES[marker][2]}: run `make test-{marker}` there"


def required_device() -> str | None:
    """The marker named by SPYKE_LORA_REQUIRE_DEVICE, or None when it is unset or empty."""
    value = os.environ.get(REQUIRE_DEVICE_ENV, "").strip()
    if not value:
        return None
    if value not in DEVICES:
        raise pytest.UsageError(
            f"{REQUIRE_DEVICE_ENV}={value!r} is not a device marker: use one of {', '.join(DEVICES)}"
        )
    return value


def pytest_collection_modifyitems(config, items):
    required = required_device()
    if required is not None and not DEVICES[required][0]():
        _, check, needs = DEVICES[required]
        raise pytest.UsageError(
            f"{REQUIRE_DEVICE_ENV}={required} (set by `make test-{required}`) requires the {required} device, "
            f"but {check} on this machine. The `{required}` tests need {needs}: run `make test-{required}` there. "
            f"(A plain `pytest` without {REQUIRE_DEVICE_ENV} skips them instead.)"
        )
    available: dict[str, bool] = {}
    for item in items:
        for marker, (is_available, _, _) in DEVICES.items():
            if item.get_closest_marker(marker) is None:
                continue
            if marker not in available:
                available[marker] = is_available()
            if not available[marker]:
                item.add_marker(pytest.mark.skip(reason=skip_reason(marker)))
