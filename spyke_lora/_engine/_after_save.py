"""The work after each saved LoRA file: sample it, validate it, and write what that made into the run's manifests.

:class:`AfterSave` is what the guarded save (``_hooks.GuardedSave``) calls once a file is on disk. It runs, in order:

1. :class:`HeldOutPass`: a held-out validation pass over the weights just saved (at every saved file, or only at the
   final one when ``validate_every_n_steps`` sets its own rhythm), a line in ``NAME.validation.jsonl`` and
   :class:`~spyke_lora.events.ValidationEnded`;
2. :class:`CheckpointSampler`: every prompt x CFG scale through sd-scripts' own sampler, a line per image in
   ``NAME.samples.jsonl`` and one :class:`~spyke_lora.events.SampleSaved` per image (not after a first Ctrl-C: the
   run is ending).

Both run on rank 0 alone in a multi-process run, and each runs at most once per step.

Every manifest line names its file and what identifies the file's content (``ss_steps``, ``sshs_model_hash``:
:mod:`._file_identity`), so that a reader drops a line whose file was written over since (a resumed run's final
``NAME.safetensors``). sd-scripts calls a step's end (``sample_images``, where the held-out pass of
``validate_every_n_steps`` runs) before it saves that step's file (``train_network.py`` l.1480-1501): the save then
links the pass's figure to its file with a second line, and no second pass. With ``tensorboard = true`` each pass's
figure is also logged as ``loss/validation`` (and ``loss/validation_divergence``) in the run's TensorBoard log, at
its step, beside sd-scripts' ``loss/current``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..events import SampleSaved, ValidationEnded
from ._file_identity import checkpoint_identity
from ._held_out import BatchContext, HeldOut, append_validation
from ._process import DeviceGenerator, generators_preserved
from ._ranks import alone_on_this_rank

if TYPE_CHECKING:
    from ._probe import Probe

__all__ = ["AfterSave", "CheckpointSampler", "HeldOutPass", "SampleSpec", "log_held_out"]


@dataclasses.dataclass(frozen=True)
class SampleSpec:
    """What sd-scripts' prompt file asks for, line by line, and where the images and their manifest go."""

    lines: tuple[tuple[str, float], ...]  # (prompt, CFG scale) of each line of the prompt file
    seed: int
    output_name: str
    folder: Path  # sd-scripts writes OUTPUT_DIR/sample/NAME_STEP_LINE_TIMESTAMP_SEED.png
    manifest: Path  # OUTPUT_DIR/NAME.samples.jsonl: one JSON line per image


class CheckpointSampler:
    """Samples the current weights with every prompt x CFG scale of a :class:`SampleSpec`, through sd-scripts' own
    sampler, once per step; one :class:`SampleSaved` per image and a line in the samples manifest.

    ``sampler`` is set by the trainer (``NetworkTrainer.sample_images`` with the run's models) or by
    ``_sample_files`` (files on disk); until then nothing is sampled.
    """

    def __init__(
        self, spec: SampleSpec, emit: Callable[[SampleSaved], None], generator: DeviceGenerator | None = None
    ) -> None:
        self.spec = spec
        self.sampler: Callable[[int], None] | None = None  # runs sd-scripts' sampler on the current weights
        self._emit = emit
        self._generator = generator  # the training device's (MPS, CUDA): kept as it was across sampling
        self._sampled: set[int] = set()

    def sampled(self, step: int) -> bool:
        """Whether ``step`` was sampled already."""
        return step in self._sampled

    def sample(self, step: int, checkpoint: Path | None) -> None:
        """Sample the current weights (those saved as ``checkpoint``; None: the base model)."""
        if self.sampler is None:
            return
        self._sampled.add(step)
        folder = self.spec.folder
        before = set(os.listdir(folder)) if folder.is_dir() else set()
        # sd-scripts' sampler seeds with torch.manual_seed (every generator) and puts back the CPU and CUDA ones
        # only: the training device's is kept here, so training after a sample draws the noise it would have drawn
        with generators_preserved([self._generator] if self._generator is not None else []), alone_on_this_rank():
            self.sampler(step)
        prefix = f"{self.spec.output_name}_{step:06d}_"
        made = sorted(p for p in folder.iterdir() if p.name not in before and p.name.startswith(prefix))
        for path in made:
            self._record(step, path, checkpoint)

    def _record(self, step: int, path: Path, checkpoint: Path | None) -> None:
        """One image: its manifest line, then its event."""
        line = int(path.name[len(f"{self.spec.output_name}_{step:06d}_") :].split("_", 1)[0])
        prompt, scale = self.spec.lines[line]
        manifest = self.spec.manifest
        record = {
            "step": step,
            "prompt": prompt,
            "cfg_scale": scale,
            "seed": self.spec.seed,
            "path": os.path.relpath(path, manifest.parent),
            "checkpoint": _relative(checkpoint, manifest.parent),
            **checkpoint_identity(checkpoint),
        }
        with manifest.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        self._emit(SampleSaved(step, prompt, scale, self.spec.seed, path, checkpoint))


class HeldOutPass:
    """One held-out validation pass per step over the current weights: a line in the validation manifest, the figure
    in the run's TensorBoard log, and :class:`ValidationEnded` with the divergence from the running training loss."""

    def __init__(self, held_out: HeldOut, probe: Probe) -> None:
        self.held_out = held_out
        self.batch_context: BatchContext | None = None  # the last training batch's models and strategies
        self._probe = probe
        self._losses: dict[int, float] = {}  # step -> its pass's figure
        self._files: set[tuple[int, Path | None]] = set()  # (step, file) already in the manifest

    @property
    def every_n_steps(self) -> int | None:
        """The pass's own rhythm in steps, or None: at every saved file."""
        return self.held_out.spec.every_n_steps

    def validate(self, step: int, checkpoint: Path | None = None) -> None:
        """Validate the current weights (those saved as ``checkpoint`` when given), at most once for ``step``; a
        step validated already gets a line linking its figure to ``checkpoint``."""
        if self.batch_context is None:
            return
        if step in self._losses:
            if checkpoint is not None:
                self._record(step, checkpoint, self._losses[step])
            return
        with alone_on_this_rank():  # rank 0's own pass (a multi-process run); nothing changes with one process
            loss = self.held_out.loss(self.batch_context)
        self._losses[step] = loss
        self._record(step, checkpoint, loss)
        divergence = loss - self._probe.losses.average()
        log_held_out(self.batch_context.accelerator, step, loss, divergence)
        self._probe.emit(ValidationEnded(step=step, epoch=self._probe.epoch, loss=loss, divergence=divergence))

    def _record(self, step: int, checkpoint: Path | None, loss: float) -> None:
        spec = self.held_out.spec
        if spec.manifest is None or (step, checkpoint) in self._files:
            return
        self._files.add((step, checkpoint))
        append_validation(spec.manifest, step, checkpoint, spec.folder, loss, self.held_out.images, True)


def log_held_out(accelerator: Any, step: int, loss: float, divergence: float) -> None:
    """A pass's figure in the run's TensorBoard log (``tensorboard = true``), at ``step``, as sd-scripts logs its
    own scalars there (``NetworkTrainer.accelerator_logging``, ``train_network.py`` l.139-168: the tensorboard
    tracker, ``step=global_step``). sd-scripts saves its final file after ``accelerator.end_training()`` closed the
    log (l.1719-1727): a writer reopened for the final pass's figure (torch's ``SummaryWriter`` reopens itself on a
    write) is closed again. Only rank 0 has trackers; files validated on disk have none."""
    for tracker in getattr(accelerator, "trackers", None) or ():
        if getattr(tracker, "name", None) != "tensorboard":
            continue
        closed = getattr(getattr(tracker, "writer", None), "file_writer", True) is None
        tracker.log({"loss/validation": loss, "loss/validation_divergence": divergence}, step=step)
        if closed:
            tracker.finish()


class AfterSave:
    """What follows every saved file: validation, then sampling (see the module's docstring)."""

    def __init__(self, probe: Probe, sampler: CheckpointSampler | None, held_out: HeldOutPass | None) -> None:
        self.sampler = sampler
        self.held_out = held_out
        self._probe = probe

    def at_step(self, step: int) -> None:
        """After every step: a held-out pass when ``validate_every_n_steps`` divides ``step``."""
        every = self.held_out.every_n_steps if self.held_out is not None else None
        if every and step % every == 0:
            assert self.held_out is not None
            self.held_out.validate(step)

    def __call__(self, path: Path, final: bool) -> None:
        """``path`` was just written at the probe's current step (``final``: under the run's final name)."""
        step = self._probe.steps_done
        every = self.held_out.every_n_steps if self.held_out is not None else None
        if self.held_out is not None and (final or every is None or step % every == 0):
            self.held_out.validate(step, path)  # at a step of its rhythm: links the pass at the step's end to the file
        # a Stop asked for by these events takes effect at the next safe point, after sd-scripts' bookkeeping
        if self.sampler is not None and not self.sampler.sampled(step) and not self._probe.interrupt_requested:
            self.sampler.sample(step, path)


def _relative(path: Path | None, folder: Path) -> str | None:
    """A file name when ``path`` is in ``folder`` (a run's own checkpoint), else the absolute path."""
    if path is None:
        return None
    return path.name if path.parent == folder else str(path)
