"""The device: what the policy changed from the request (a warning each), and what the device cannot run."""

from __future__ import annotations

from ._context import CheckContext, Findings

__all__ = ["check_corrections", "check_processes_on_mps"]


def check_processes_on_mps(ctx: CheckContext, found: Findings) -> None:
    """torch.distributed has no MPS backend: a run on MPS is one process."""
    if ctx.device.device == "mps" and ctx.launch.multi_process:
        found.problem(
            f"`processes` {ctx.launch.world_size} on MPS: a Mac has one GPU, and torch.distributed has no MPS "
            f"backend, so a run on MPS is one process; train with processes=1 (the default), or on CUDA machines "
            f"for several"
        )


def check_corrections(ctx: CheckContext, found: Findings) -> None:
    """Each change the device policy made to the request (fp16 on MPS, ...) is a warning, with its reason."""
    for correction in ctx.device.corrections:
        found.warning(correction)
