"""Warnings to the user, attributed to the user's own line, however deep in spyke-lora they are raised."""

from __future__ import annotations

import os
import sys
import warnings

from ._errors import SpykeLoraWarning

__all__ = ["caller_stacklevel", "warn_caller"]

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def caller_stacklevel() -> int:
    """The ``stacklevel`` for ``warnings.warn`` called in the function that calls this one, that names the first
    frame outside spyke-lora (the caller's line), counted, not hard-coded."""
    frame = sys._getframe(1)  # the function that will call warnings.warn: stacklevel 1
    level = 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE):
        frame = frame.f_back
        level += 1
    return level


def warn_caller(message: str) -> None:
    """Warn with a :class:`~spyke_lora.SpykeLoraWarning` attributed to the caller's line.

    Args:
        message: What is wrong, naming the file or field, and the fix.
    """
    warnings.warn(message, SpykeLoraWarning, stacklevel=caller_stacklevel())
