"""Reaching into sd-scripts' running ``NetworkTrainer.train()`` frame, in the two places nothing else works.

Ending a stopped run the way the end of ``train()`` does (its ``save_model`` closure lives only in that frame), and
putting the right step count into a resumed run (its ``global_step`` local).
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType, ModuleType, TracebackType
from typing import TYPE_CHECKING, Any

from .._errors import EngineError

if TYPE_CHECKING:
    from ._probe import Probe

__all__ = ["finish_after_stop", "set_frame_local"]


def _train_frame(tb: TracebackType | None, train_code: Any) -> FrameType | None:
    found = None
    while tb is not None:
        if tb.tb_frame.f_code is train_code:
            found = tb.tb_frame
        tb = tb.tb_next
    return found


def finish_after_stop(
    stop: BaseException, train_network: ModuleType, probe: Probe, written: Callable[[Path], Path | None]
) -> Path | None:
    """End the run the way the end of sd-scripts' ``train()`` does, for the step reached.

    Args:
        stop: The exception that ended the loop; its traceback holds ``train()``'s frame.
        train_network: The engine's ``train_network`` module.
        probe: The run's probe (the step and epoch reached).
        written: The path given when this run wrote that file, else None (``GuardedSave.written``).

    Returns:
        The final file, or None when no step was taken (nothing worth saving) or on another rank than 0.

    Raises:
        EngineError: This sd-scripts' ``train()`` lacks the locals the end of a run needs.
    """
    if probe.steps_done == probe.first_step:
        return None
    frame = _train_frame(stop.__traceback__, train_network.NetworkTrainer.train.__code__)
    needed = ("accelerator", "args", "network", "optimizer_eval_fn", "save_model", "global_step")
    local = frame.f_locals if frame is not None else {}
    if any(name not in local for name in needed):
        raise EngineError(
            "could not save the final LoRA after the stop: this sd-scripts' NetworkTrainer.train() does not have "
            f"the locals {needed}; the step checkpoints already written are intact"
        )
    accelerator, args = local["accelerator"], local["args"]
    network = accelerator.unwrap_model(local["network"])
    accelerator.end_training()
    local["optimizer_eval_fn"]()
    if not accelerator.is_main_process:  # a multi-process run: rank 0 alone saves, as at the end of train()
        return None
    if args.save_state:  # the state of the step reached, under the step-state name, unless that step saved one
        step = local["global_step"]
        state_name = train_network.train_util.STEP_STATE_NAME.format(args.output_name, step)
        if not os.path.isdir(os.path.join(args.output_dir, state_name)) and "current_step" in local:
            local["current_step"].value = step - 1  # what train_state.json records: this value + 1
            train_network.train_util.save_and_remove_state_stepwise(args, accelerator, step)
    name = train_network.train_util.get_last_ckpt_name(args, "." + args.save_model_as)
    local["save_model"](name, network, local["global_step"], probe.epoch, force_sync_upload=True)
    return written(Path(os.path.join(args.output_dir, name)))


def set_frame_local(frame: FrameType, name: str, value: Any) -> None:
    """Assign a local variable of a running frame: write-through ``f_locals`` on Python >= 3.13 (PEP 667); before,
    ``f_locals`` is a snapshot that ``PyFrame_LocalsToFast`` copies back (what debuggers do)."""
    local = frame.f_locals
    local[name] = value
    if sys.version_info < (3, 13):
        ctypes.pythonapi.PyFrame_LocalsToFast(ctypes.py_object(frame), ctypes.c_int(0))
