"""The device: what the policy changed from the request (a warning each), and what the device cannot run."""

from __future__ import annotations

import os

from .. import _device
from ._context import CheckContext, Findings

__all__ = ["check_corrections", "check_processes_on_mps", "check_processes_per_gpu"]


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


def check_processes_per_gpu(ctx: CheckContext, found: Findings) -> None:
    """On CUDA each process of a run trains on a GPU of its own (accelerate gives local rank R ``cuda:R``): more
    processes on this machine than GPUs torch sees would fail at the first step on an invalid device ordinal."""
    if ctx.device.device != "cuda" or not ctx.launch.multi_process:
        return
    gpus = _device.visible_gpus(_device.device_facts())
    local = ctx.launch.local_processes
    if local > gpus:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        where = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
        found.problem(
            f"`processes` puts {local} processes on this machine but torch sees {gpus} CUDA GPU(s){where}: each "
            f"process trains on a GPU of its own; set processes = {gpus}"
            + (" (or train on the CPU with device = 'cpu')" if gpus < 2 else "")
        )
