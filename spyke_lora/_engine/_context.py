"""What the engine is given for one run (:class:`RunContext`) and what it gives back (:class:`Outcome`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from .._config import TrainConfig
from .._device import DeviceChoice
from ..events import Event
from ._ranks import RankSync
from ._state import SavedState

__all__ = ["Outcome", "RunContext"]


@dataclasses.dataclass(frozen=True)
class RunContext:
    """One training run as the engine receives it.

    Attributes:
        cfg: The run's config, ``gradient_checkpointing`` already resolved by ``plan()``.
        device: The device choice the run trains with.
        emit: Called with every event, in order; a callback's exception comes back through it unchanged.
        stop_requested: Polled at every safe point (and before anything is loaded): True ends the run after the
            current step, with that step's LoRA saved under the final name.
        started_at: ``time.perf_counter()`` when the caller started the run (``StepEnded.elapsed_s`` counts from it).
        resume: The saved training state the run continues, or None for a fresh run.
        log: The file sd-scripts' own output goes to, or None for the console.
        ranks: This process is one rank of a multi-process run (``_worker``): the caller holds the output's lock
            and wrote the run's files; rank 0 alone samples and validates. None: one process.
    """

    cfg: TrainConfig
    device: DeviceChoice
    emit: Callable[[Event], None]
    stop_requested: Callable[[], bool]
    started_at: float
    resume: SavedState | None = None
    log: Path | None = None
    ranks: RankSync | None = None

    @property
    def first_step(self) -> int:
        """The step the run starts from: the resumed state's, else 0."""
        return self.resume.step if self.resume is not None else 0

    @property
    def reports(self) -> bool:
        """Whether this process samples, validates and writes the run's manifests (one process, or rank 0)."""
        return self.ranks is None or self.ranks.rank == 0

    @property
    def processes(self) -> int:
        """How many processes train this run."""
        return self.ranks.world_size if self.ranks is not None else 1


@dataclasses.dataclass(frozen=True)
class Outcome:
    """How a run ended.

    Attributes:
        steps: The step reached (a resumed run counts from the start of the run it continues).
        final_path: The run's final LoRA file, or None when none was written (a stop before the first step, or a
            NaN/Inf loss at the last one).
        stopped: True when a stop ended the run early.
        peak_memory_bytes: The peak measured where the run trained, when that is another process (rank 0 of a
            multi-process run); None: the caller measures it itself.
    """

    steps: int
    final_path: Path | None
    stopped: bool
    peak_memory_bytes: int | None = None
