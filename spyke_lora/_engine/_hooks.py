"""The sd-scripts calls spyke-lora wraps, each as one small class, installed once the network exists.

* :class:`GuardedSave` wraps ``network.save_weights``: no file from NaN/Inf weights, every file written whole under
  a temporary name, a full disk turned into a clear error, then :class:`~spyke_lora.events.CheckpointSaved` and the
  work after the save (:class:`~._after_save.AfterSave`).
* :class:`AtomicState` wraps accelerate's ``save_state`` and ``load_state``: a state folder written whole (a kill
  leaves the previous state or the new one), the MPS generator accelerate does not save, and the run's record to
  check a later resume against.
* :class:`EpochWatch` wraps ``network.on_epoch_start``: a stop point, the epoch number, the loss window's length,
  and the resumed step count sd-scripts gets wrong.

:func:`install_hooks` puts all three in place (from ``post_process_network``).
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from .._errors import EngineError, TrainingError
from .._files import atomic_path
from ..events import CheckpointSaved
from ._frames import set_frame_local
from ._probe import Probe
from ._process import DeviceGenerator
from ._state import DEVICE_RNG_NAME, RECORD_NAME, partial_state_dir, replace_state_dir

__all__ = ["AtomicState", "EpochWatch", "GuardedSave", "install_hooks"]


class GuardedSave:
    """``network.save_weights``, guarded (see the module's docstring).

    Args:
        save_weights: The network's own ``save_weights``.
        probe: The run's probe: the step reached, the NaN/Inf streak, the events.
        final_name: The file name of the run's final LoRA (``NAME.safetensors``).
        after_save: Called with ``(path, final)`` once the file is on disk and announced.
    """

    def __init__(
        self, save_weights: Callable[..., None], probe: Probe, final_name: str, after_save: Callable[[Path, bool], None]
    ) -> None:
        self.saved: list[Path] = []  # every file this run wrote, in order
        self._save_weights = save_weights
        self._probe = probe
        self._final_name = final_name
        self._after_save = after_save

    def __call__(self, file: str, dtype: Any, metadata: Any) -> None:
        path = Path(file)
        if self._probe.losses.nonfinite_streak:
            return  # the weights after a NaN/Inf loss are not worth a file
        try:  # written whole under a temporary name, then renamed: never a truncated file under `path`
            with atomic_path(path, keep_suffix=True) as partial:  # sd-scripts picks the format by extension
                self._save_weights(str(partial), dtype, metadata)
        except OSError as e:  # a full disk, a vanished folder: stop with the files written so far intact
            raise self._write_error(path, e) from e
        self.saved.append(path)
        final = path.name == self._final_name
        self._probe.emit(CheckpointSaved(self._probe.steps_done, self._probe.epoch, path, final))
        self._after_save(path, final)

    def written(self, path: Path) -> Path | None:
        """``path`` when this run wrote it (from finite weights), else None: a save is skipped during a NaN/Inf
        streak, and an older file of that name (``overwrite = true``) is not this run's."""
        return path if path in self.saved else None

    def _write_error(self, path: Path, error: OSError) -> TrainingError:
        kept = ", ".join(p.name for p in self.saved) or "none"
        size = self.saved[-1].stat().st_size / 1e6 if self.saved and self.saved[-1].exists() else 75
        return TrainingError(
            f"could not write {path} at step {self._probe.steps_done}: {error}; the run was stopped. Files written "
            f"before are intact: {kept}. Free some space (each file is about {size:.0f} MB) and run again"
        )


class AtomicState:
    """accelerate's ``save_state`` and ``load_state`` around a state folder (see the module's docstring).

    Args:
        save_state: The accelerator's own ``save_state``.
        load_state: The accelerator's own ``load_state``.
        probe: The run's probe (the step and epoch each state records).
        generator: The training device's generator; on MPS it is saved and read back here.
        record: Written into every state folder (with the step and epoch), to check a later resume against; None:
            no record.
    """

    def __init__(
        self,
        save_state: Callable[..., Any],
        load_state: Callable[..., Any],
        probe: Probe,
        generator: DeviceGenerator | None = None,
        record: dict[str, Any] | None = None,
    ) -> None:
        self.states: list[Path] = []  # state folders written by this run
        self._save_state = save_state
        self._load_state = load_state
        self._probe = probe
        self._mps = generator if generator is not None and generator.device == "mps" else None
        self._record = record

    def save(self, output_dir: str, *a: Any, **kw: Any) -> Any:
        """Write the state under a temporary name, then rename it into place."""
        final = Path(output_dir)
        partial = partial_state_dir(final)
        try:
            result = self._save_state(str(partial), *a, **kw)
            self._add_to(partial)
            replace_state_dir(partial, final)
        except OSError as e:
            raise TrainingError(
                f"could not write the training state {final} at step {self._probe.steps_done}: {e}; the run was "
                f"stopped. Files written before are intact. Free some space and run again"
            ) from e
        finally:
            if partial.exists():
                shutil.rmtree(partial, ignore_errors=True)
        self.states.append(final)
        return result

    def load(self, input_dir: str, *a: Any, **kw: Any) -> Any:
        """accelerate's own loading (the CPU and CUDA generators among the rest), then the MPS generator."""
        result = self._load_state(input_dir, *a, **kw)
        saved = Path(input_dir) / DEVICE_RNG_NAME
        if self._mps is not None and saved.is_file():
            import torch

            self._mps.set_state(torch.load(saved, weights_only=True))
        return result

    def _add_to(self, folder: Path) -> None:
        """What accelerate does not save: the MPS generator, and the run's record."""
        if self._mps is not None:
            import torch

            torch.save(self._mps.get_state(), folder / DEVICE_RNG_NAME)
        if self._record is not None:
            record = dict(self._record, step=self._probe.steps_done, epoch=self._probe.epoch)
            (folder / RECORD_NAME).write_text(json.dumps(record, indent=1), encoding="utf-8")


class EpochWatch:
    """``network.on_epoch_start``, watched (see the module's docstring).

    Args:
        on_epoch_start: The network's own ``on_epoch_start``.
        probe: The run's probe (the stop point, the epoch, the loss window, the resumed step).
        train_code: ``NetworkTrainer.train.__code__``: the frame this must be called from.
        resumed: Whether the run continues a saved state, so its step count is corrected at the first epoch.
    """

    def __init__(self, on_epoch_start: Callable[..., Any], probe: Probe, train_code: Any, resumed: bool) -> None:
        self._on_epoch_start = on_epoch_start
        self._probe = probe
        self._train_code = train_code
        self._resumed = resumed

    def __call__(self, *a: Any, **kw: Any) -> Any:
        self._probe.raise_if_stopping()
        frame = sys._getframe(1)  # train(), in its epoch loop: `for epoch in range(epoch_to_start, ...)`
        if frame.f_code is not self._train_code or "epoch" not in frame.f_locals:
            raise EngineError("the network's on_epoch_start was not called from NetworkTrainer.train()")
        if self._probe.epoch == 0:
            self._probe.losses.size_to(len(frame.f_locals["train_dataloader"]))
            if self._resumed:
                self._correct_resumed_step(frame)
        self._probe.epoch = int(frame.f_locals["epoch"]) + 1
        return self._on_epoch_start(*a, **kw)

    def _correct_resumed_step(self, frame: FrameType) -> None:
        """sd-scripts v0.10.1 resumes with ``global_step`` set to the steps done *within* the resumed epoch, not in
        the run (``global_step = initial_step`` after subtracting the skipped epochs, l.1344; kohya-ss/sd-scripts
        #1999, #1406), so step numbers, checkpoint names and the end of the run would be wrong after an epoch
        boundary. The first ``on_epoch_start`` of a resumed run runs after that line and before the first step:
        the right value is put into train()'s local there."""
        first = self._probe.first_step
        set_frame_local(frame, "global_step", first)
        if int(frame.f_locals["global_step"]) != first:
            raise EngineError(
                f"could not continue the step count at {first} on Python {sys.version.split()[0]}; "
                "resuming is not possible on this Python"
            )


def install_hooks(
    network: Any,
    accelerator: Any,
    probe: Probe,
    *,
    final_name: str,
    train_code: Any,
    after_save: Callable[[Path, bool], None],
    resumed: bool = False,
    generator: DeviceGenerator | None = None,
    state_record: dict[str, Any] | None = None,
) -> tuple[GuardedSave, AtomicState]:
    """Wrap the network's ``save_weights`` and ``on_epoch_start`` and the accelerator's ``save_state`` and
    ``load_state`` (on these objects only, which live as long as the run).

    Returns:
        The guarded save (the files written) and the atomic state (the state folders written).
    """
    save = GuardedSave(network.save_weights, probe, final_name, after_save)
    state = AtomicState(accelerator.save_state, accelerator.load_state, probe, generator, state_record)
    network.save_weights = save
    network.on_epoch_start = EpochWatch(network.on_epoch_start, probe, train_code, resumed)
    accelerator.save_state = state.save
    accelerator.load_state = state.load
    return save, state
