"""How a rule runs: what it raises becomes a finding, so only :class:`~spyke_lora.SpykeLoraError` leaves ``plan()``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .._errors import ConfigError, SpykeLoraError
from ._context import Findings

__all__ = ["run_rule"]


def run_rule(rule: Callable[[Any, Findings], None], ctx: Any, found: Findings) -> None:
    """Run one rule; what it raises becomes a problem, so no exception but a :class:`~spyke_lora.SpykeLoraError`
    leaves ``plan()``.

    A rule reports through ``found``; one that raises :class:`~spyke_lora.ConfigError` adds its problems. Any other
    exception (a file that vanished, a permission, a bug in a rule or in sd-scripts' code it calls) becomes a
    problem naming the check and what it raised, so the user sees which check could not run and why, never a
    traceback. A :class:`~spyke_lora.SpykeLoraError` of another kind (a ``DeviceError``, an ``EngineError``) is
    raised as it is.

    Args:
        rule: The check, ``check_x(ctx, found)``.
        ctx: What it reads (a :class:`CheckContext`, or a :class:`FolderContext` for a folder's rule).
        found: The findings so far, added to in place.
    """
    try:
        rule(ctx, found)
    except ConfigError as e:
        found.problems += e.problems
    except SpykeLoraError:
        raise
    except Exception as e:  # noqa: BLE001 -- the contract: only SpykeLoraErrors leave plan()
        what = (rule.__doc__ or rule.__name__).strip().split("\n")[0].rstrip(".")
        found.problem(
            f"the check {rule.__name__!r} ({what}) could not run: {type(e).__name__}: {e}; fix what it names, or "
            f"report it with this message if it names nothing you gave"
        )
