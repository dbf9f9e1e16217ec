"""A resume (``plan(cfg, resume=...)``): the state exists and comes from the same training, and steps are left."""

from __future__ import annotations

from ._context import CheckContext, Findings

__all__ = ["check_resume", "check_steps_left"]


def check_resume(ctx: CheckContext, found: Findings) -> None:
    """The state ``resume`` names exists and was saved by this config, dataset and number of processes."""
    found.problems += ctx.resumed.problems


def check_steps_left(ctx: CheckContext, found: Findings) -> None:
    """A state at or past the run's last step leaves nothing to train."""
    state, count = ctx.resumed.value, ctx.count
    if state is not None and state.step >= count.total_steps:
        found.problem(
            f"cannot resume from {state.path}: it is at step {state.step} and this run ends at step "
            f"{count.total_steps}, so there is nothing left to train (the run's LoRA is {count.final_name})"
        )
