"""``PYTORCH_ENABLE_MPS_FALLBACK``: set before torch is first imported, and whether that came too late.

MPS runs need the variable before torch is first imported (torch reads it when it loads: an op MPS lacks then runs on
the CPU instead of failing). The package face imports this module first, because nothing in the package imports
torch before it; an explicit value is kept. Whether torch came first is remembered, so a run on MPS (and
``doctor()``) can warn that it was too late.
"""

import os
import sys

__all__ = ["TOO_LATE", "fallback_missing"]

TOO_LATE = "torch" in sys.modules and "PYTORCH_ENABLE_MPS_FALLBACK" not in os.environ
os.environ.setdefault("PYTORCH_ENABLE_MPS_FALLBACK", "1")


def fallback_missing() -> bool:
    """True when an op MPS lacks would fail instead of running on the CPU: the fallback variable came after torch,
    or it is not 1."""
    return TOO_LATE or os.environ.get("PYTORCH_ENABLE_MPS_FALLBACK") != "1"
