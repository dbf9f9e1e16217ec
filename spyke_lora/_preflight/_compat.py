"""The run's checks of its sd-scripts: what the config uses that the checkout found lacks (an older commit, such as
kohya_ss's submodule), found from the engine's own code, before a model loads."""

from __future__ import annotations

from .. import _engine
from ._context import CheckContext, Findings

__all__ = ["check_engine"]


def check_engine(ctx: CheckContext, found: Findings) -> None:
    """Each feature of the run (validation, sampling, resuming, ...) that this sd-scripts cannot do is a problem
    naming the commit it needs (``_engine._compat.NEEDS``): ``train()`` would refuse it at the same point."""
    for problem in _engine.engine_problems(ctx.cfg, resumed=ctx.resume is not None):
        found.problem(problem)
