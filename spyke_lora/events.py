"""Events a training run delivers to its callbacks, in this order:

1. :class:`TrainStarted` once, when the model is loaded and the step count is known;
2. :class:`StepEnded` after every optimizer step, and :class:`CheckpointSaved` after every LoRA file written
   (a checkpoint of step N follows the ``StepEnded`` of step N), then, with held-out images, one
   :class:`ValidationEnded` for that checkpoint's weights, then one :class:`SampleSaved` per sample image of
   that checkpoint (every prompt x CFG scale, in the order of ``sample_prompts`` then ``sample_cfg_scales``);
   with ``validate_every_n_steps``, the ``ValidationEnded`` of step N follows its ``StepEnded`` instead (and the
   final file is validated too);
3. :class:`TrainEnded` exactly once, last (only when ``TrainStarted`` was delivered).

Events are small frozen dataclasses of plain data (ints, floats, strings, paths): they compare by value, print
readably and pickle, so they can cross a thread or a process. A callback is any callable taking one event; it may
return :class:`Stop` to end the run cleanly after the current step.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal, Union

__all__ = [
    "CheckpointSaved",
    "Event",
    "SampleSaved",
    "StepEnded",
    "Stop",
    "TrainEnded",
    "TrainStarted",
    "ValidationEnded",
]

Status = Literal["completed", "stopped", "failed", "interrupted"]


@dataclasses.dataclass(frozen=True)
class TrainStarted:
    """The engine is ready: models loaded, dataset counted, ``total_steps`` optimizer steps planned."""

    total_steps: int
    device: str  # "cuda", "mps" or "cpu"
    mixed_precision: str  # "no", "fp16" or "bf16": what the engine actually runs with
    output_dir: Path
    resumed_from_step: int = 0  # a resumed run: the step its state was saved at (its first step is this + 1)
    device_name: str = ""  # what the device is: the GPU's name, the Mac's chip ("Apple M1 Pro"), the CPU's model
    # whether the engine runs with gradient checkpointing ("auto" resolved; plan().memory.reason says why)
    gradient_checkpointing: bool = True
    processes: int = 1  # the run's processes over every machine (train(cfg, processes=N)); events come from rank 0


@dataclasses.dataclass(frozen=True)
class StepEnded:
    """One optimizer step finished."""

    step: int  # 1-based global step
    total_steps: int
    epoch: int  # 1-based epoch this step belongs to
    loss: float  # this step's loss (mean over gradient-accumulation micro-batches)
    avg_loss: float  # sd-scripts' running average ("avr_loss" in its progress bar)
    lr: float  # U-Net learning rate used for this step
    lr_text_encoder: float | None  # text-encoder learning rate used for this step (None when it is not trained)
    elapsed_s: float  # seconds since train() was called
    # memory in use on the training device after the step: MPS's allocated memory (torch.mps), CUDA's allocated
    # memory (torch.cuda), the process's resident memory on the CPU; None when it cannot be read
    memory_bytes: int | None = None


@dataclasses.dataclass(frozen=True)
class CheckpointSaved:
    """A LoRA file was written (and closed) at ``path``."""

    step: int
    epoch: int
    path: Path
    final: bool  # True for NAME.safetensors, the run's last file


@dataclasses.dataclass(frozen=True)
class SampleSaved:
    """sd-scripts' sampler wrote one image of the weights at ``step`` (the weights saved as ``checkpoint``; None
    for a step-0 sample of the untrained base model)."""

    step: int
    prompt: str
    cfg_scale: float
    seed: int
    path: Path
    checkpoint: Path | None


@dataclasses.dataclass(frozen=True)
class ValidationEnded:
    """A validation pass over the held-out images (``validation_dir``) finished, on the weights of ``step``.

    ``loss`` is sd-scripts' validation loss of this pass: every held-out image at timesteps 200, 400, 600 and 800,
    with a fixed seed, so passes of different steps compare the weights and nothing else. ``divergence`` is
    ``loss`` minus the running training loss (``StepEnded.avg_loss``): it grows as the LoRA fits its training images
    better than unseen ones."""

    step: int
    epoch: int
    loss: float
    divergence: float


@dataclasses.dataclass(frozen=True)
class TrainEnded:
    """The run is over. ``status``: "completed"; "stopped" (a callback returned Stop); "failed" (an exception,
    which propagates after this event); "interrupted" (Ctrl-C, re-raised after this event)."""

    status: Status
    steps: int  # the step reached (a resumed run counts from the start of the run it continues)
    final_path: Path | None  # NAME.safetensors, or None when no final file was written
    # the highest memory in use on the training device during the run (loading included): resident memory on the
    # CPU, the allocator's on CUDA and MPS; None when it cannot be measured. And what plan() predicted for it.
    # Measurements, not what happened: two events that differ only in them compare equal.
    peak_memory_bytes: int | None = dataclasses.field(default=None, compare=False)
    predicted_peak_bytes: int | None = dataclasses.field(default=None, compare=False)
    # the device's memory budget the run was planned against (plan().memory.budget_bytes, memory_limit applied):
    # the loss chart's dashed line; None when it could not be read
    memory_budget_bytes: int | None = dataclasses.field(default=None, compare=False)


# the type of every event above: what a callback receives
Event = Union[TrainStarted, StepEnded, CheckpointSaved, ValidationEnded, SampleSaved, TrainEnded]


@dataclasses.dataclass(frozen=True)
class Stop:
    """Return this from a callback to end the run after the current step; the LoRA of that step is saved under the
    final name and the run ends with status "stopped"."""

    reason: str = "stopped by a callback"
