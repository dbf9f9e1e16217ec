"""PYTORCH_ENABLE_MPS_FALLBACK is in force only if libtorch saw it when it loaded: decided by whether torch was
imported first and what the process started with, never by what the variable says now."""

import os
import subprocess
import sys

import pytest

from spyke_lora._mps_fallback import (
    VARIABLE,
    fallback_enabled,
    fallback_in_force,
    initial_environment,
    parse_procargs2,
)


def _python(code: str, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k != VARIABLE} | env
    return subprocess.run([sys.executable, "-c", code], env=clean, capture_output=True, text=True, check=True).stdout


PROBE = "from spyke_lora._mps_fallback import fallback_missing; print(fallback_missing())"


def test_set_after_import_torch_but_before_spyke_lora_is_missing():
    """The issue's case: the caller sets the variable after `import torch`; doctor() and a run on MPS reported it
    as in force, but libtorch read it at its own import."""
    code = f"import os, torch; os.environ[{VARIABLE!r}] = '1'; import spyke_lora; {PROBE}"
    assert _python(code).split() == ["True"]


def test_exported_before_python_started_is_in_force_even_with_torch_first():
    assert _python(f"import torch, spyke_lora; {PROBE}", **{VARIABLE: "1"}).split() == ["False"]


def test_spyke_lora_first_sets_it_in_time():
    assert _python(f"import spyke_lora, torch; {PROBE}").split() == ["False"]
    assert _python(f"import spyke_lora, torch; {PROBE}", **{VARIABLE: "0"}).split() == ["True"]  # kept: the user's


def test_torch_first_without_the_variable_is_missing():
    assert _python(f"import torch, spyke_lora; {PROBE}").split() == ["True"]


@pytest.mark.parametrize(
    ("torch_first", "initial", "current", "in_force"),
    [
        (False, None, "1", True),
        (False, None, None, False),
        (False, None, "0", False),
        (True, {VARIABLE: "1"}, "1", True),
        (True, {VARIABLE: "1"}, "0", True),  # changed after libtorch read it: it read 1
        (True, {}, "1", False),  # set after the start: cannot have come before import torch
        (True, None, "1", False),  # the starting environment cannot be read: not shown to be in force
        (True, {VARIABLE: "2"}, None, True),  # libtorch: any non-zero integer
        (True, {VARIABLE: "yes"}, None, False),
    ],
)
def test_in_force_is_decided_by_what_libtorch_saw(torch_first, initial, current, in_force):
    assert fallback_in_force(torch_first, initial, current) is in_force


def test_values_as_libtorch_reads_them():
    assert [fallback_enabled(v) for v in ("1", " 1 ", "2", "0", "", "true", None)] == [
        True,
        True,
        True,
        False,
        False,
        False,
        False,
    ]


def test_the_macos_process_record_is_parsed():
    """KERN_PROCARGS2: argc, the executable's path, NUL padding, the arguments, then the environment."""
    record = (
        (2).to_bytes(4, sys.byteorder)
        + b"/usr/bin/python3\0\0\0\0"
        + b"python3\0-c\0"
        + f"HOME=/Users/me\0{VARIABLE}=1\0A=b=c\0".encode()
        + b"\0\0ptr_munge=\0"
    )
    assert parse_procargs2(record) == {"HOME": "/Users/me", VARIABLE: "1", "A": "b=c"}


def test_the_starting_environment_on_linux_and_elsewhere():
    if sys.platform.startswith("linux"):
        started = initial_environment()
        assert started is not None and started.get("PATH") == os.environ.get("PATH")
    assert initial_environment("win32") is None
