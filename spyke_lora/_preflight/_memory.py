"""Memory: the run's predicted peak against ``memory_limit`` (a refusal) and the device's budget (a warning)."""

from __future__ import annotations

from .._memory import gib
from ._context import CheckContext, Findings

__all__ = ["check_memory_budget", "check_memory_limit"]


def _fixes(ctx: CheckContext) -> str:
    return "; ".join(f"fix: {fix}" for fix in ctx.memory.fixes)


def check_memory_limit(ctx: CheckContext, found: Findings) -> None:
    """A predicted peak above ``memory_limit`` is refused, with each change that brings it under."""
    memory = ctx.memory
    if memory.limit_bytes is not None and memory.peak_bytes > memory.limit_bytes:
        found.problem(
            f"the run's predicted peak memory {gib(memory.peak_bytes)} is above `memory_limit` "
            f"{gib(memory.limit_bytes)}; {_fixes(ctx)}"
        )


def check_memory_budget(ctx: CheckContext, found: Findings) -> None:
    """A predicted peak above the device's budget is a warning: the run may swap or fail part-way."""
    memory = ctx.memory
    if not memory.fits:
        found.warning(
            f"the run's predicted peak memory {gib(memory.peak_bytes)} is above the {ctx.device.device} budget "
            f"{gib(memory.budget_bytes)} ({memory.budget_source}): it may swap (hours instead of minutes) or fail "
            f"part-way; {_fixes(ctx)}"
        )
