"""What ``plan()`` returns: :class:`Plan`, its dataset folders (:class:`SubsetPlan`) and its held-out validation
(:class:`ValidationPlan`). Data only; how a plan reads (``str(plan)``) is ``_text``'s :class:`PlanText`."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .._launch import AloneOnRankZero, Launch
from .._memory import MemoryPlan
from ._text import PlanText

__all__ = ["Plan", "SubsetPlan", "ValidationPlan"]


@dataclasses.dataclass(frozen=True)
class SubsetPlan:
    """One dataset folder as the run reads it: its images, the captions sd-scripts reads as text and repeats;
    ``is_reg`` for regularisation images; ``caption`` what its first caption trains as (a line of the plan)."""

    folder: Path
    images: int
    captions: int
    repeats: int
    is_reg: bool
    caption: str = ""  # e.g. "caption  img000.txt trains as 'spyke_plasma_v1, white cloak'" ("": not shown)

    def lines(self) -> list[str]:
        """The folder's lines in ``str(plan)``: its counts, then what one caption trains as."""
        kind = "reg  " if self.is_reg else "train"
        head = f"  {kind} {self.folder}: {self.images} images, {self.captions} captions, x{self.repeats}"
        return [head, f"    {self.caption}"] if self.caption else [head]


@dataclasses.dataclass(frozen=True)
class ValidationPlan:
    """The held-out images a run validates on, and the validation passes it will make."""

    folder: Path
    images: int
    steps: tuple[int, ...]  # the steps whose weights are validated (one pass each)
    seed: int
    paths: tuple[Path, ...] = ()  # the held-out images (with validation_split: those sd-scripts' split holds out)
    split: float = 1.0  # the fraction of ``folder`` held out: 1 for validation_dir, validation_split of train_dir


@dataclasses.dataclass(frozen=True)
class Plan(PlanText):
    """What ``train(cfg)`` will do. ``str(plan)`` is a readable summary (``PlanText``)."""

    device: str
    mixed_precision: str
    corrections: tuple[str, ...]  # device-policy changes to the request, each with its reason
    base_model: Path
    model_family: str  # "sd1" or "sd2"
    argv: tuple[str, ...]  # the exact train_network.py arguments
    subsets: tuple[SubsetPlan, ...]
    batches_per_epoch: int
    steps_per_epoch: int
    epochs: int
    total_steps: int
    checkpoints: tuple[tuple[int, Path], ...]  # (step, file) of each step checkpoint
    final_path: Path
    estimated_disk_bytes: int
    warnings: tuple[str, ...]  # everything worth knowing that does not stop the run (corrections included)
    samples_per_checkpoint: int = 0  # sample images made after every saved file (prompts x CFG scales)
    sample_summary: str = ""  # e.g. "3 prompts x CFG 5, 7, 9 (20 steps, euler_a, 512 px, seed 1234)"
    resume_from: Path | None = None  # the training state this run continues
    resume_step: int = 0  # the step it continues after (0: a fresh run)
    validation: ValidationPlan | None = None  # held-out validation (None: no validation_dir)
    memory: MemoryPlan | None = None  # the predicted peak memory against the device's budget (docs/memory.md)
    launch: Launch = Launch()  # the run's processes and machines (train(cfg, processes=N)); one process by default
    train_batch_size: int = 1  # the batch of one process (per device)
    gradient_accumulation_steps: int = 1
    alone: AloneOnRankZero | None = None  # a multi-process run: rank 0's sampling/validation alone, the ranks' timeout

    @property
    def processes(self) -> int:
        """The run's processes over every machine (its world size)."""
        return self.launch.world_size

    @property
    def effective_batch(self) -> int:
        """Images per optimizer step: the per-process batch x processes x gradient accumulation."""
        return self.train_batch_size * self.processes * self.gradient_accumulation_steps

    @property
    def gradient_checkpointing(self) -> bool:
        """Whether the run uses gradient checkpointing (``"auto"`` resolved: see ``memory.reason``)."""
        return self.memory.gradient_checkpointing if self.memory is not None else True
