"""One run, read top to bottom (:func:`run`), and sampling files on disk (:func:`sample`), which shares its prelude.

A run takes this process's run slot and the output's lock, hosts sd-scripts in a process state that is put back
afterwards, drives ``NetworkTrainer.train()`` through :class:`~._trainer.Probe`, and turns how it ends (completed,
stopped, Ctrl-C, NaN, sd-scripts' own failure) into an :class:`Outcome` or one of our errors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

from .._config import TrainConfig
from .._device import DeviceChoice, device_name, memory_reader
from .._errors import NonFiniteLoss, SpykeLoraError, TrainingError
from .._lock import output_lock
from ..events import Event
from ._argv import build_argv, parse_argv, run_environment
from ._engine_log import caller_output, engine_output, text_progress_bars
from ._frames import finish_after_stop
from ._held_out import HeldOut, validate_files, validation_spec
from ._host import EngineHost, RootLoggerSnapshot, host_for, random_untouched_by_logging
from ._outputs import prepare_samples, remove_partial_files, write_dataset_toml
from ._process import (
    DeviceGenerator,
    class_attributes_restored,
    cuda_rng_calls_reach,
    device_generator,
    free_memory,
    isolated_run,
    module_values_restored,
)
from ._ranks import RankSync
from ._state import SavedState, remove_partial_states, state_record
from ._trainer import NonFiniteStop, Probe, SampleSpec, StopRun, trainer_class

__all__ = ["Outcome", "launched_run", "run", "sample", "validate"]


@dataclasses.dataclass(frozen=True)
class Outcome:
    """How a run ended: the step reached, its final LoRA file (None when none was written), whether it was stopped."""

    steps: int
    final_path: Path | None
    stopped: bool


class _RunSlot:
    """One run (or sampling) at a time per process: sd-scripts and accelerate keep process-wide singletons.

    A second run is refused at once, from any thread, with a clear error; it never waits behind a run that goes on.
    It waits only for a run that is already ending (a stop was asked for, e.g. its ``iter_events`` stream was let
    go), so the next ``train()`` after an abandoned stream works."""

    WAIT_FOR_ENDING_S = 600.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owner: int | None = None
        self._ending: Callable[[], bool] = lambda: False

    @contextlib.contextmanager
    def taken(self, ending: Callable[[], bool]) -> Iterator[None]:
        """Hold the slot for the block; ``ending`` tells a second caller whether this run is already stopping."""
        if not self._lock.acquire(blocking=False):
            owner, owner_ending = self._owner, self._ending
            waits = owner is not None and owner != threading.get_ident() and owner_ending()
            if not self._lock.acquire(timeout=self.WAIT_FOR_ENDING_S if waits else 0.0):
                raise SpykeLoraError(
                    "another spyke-lora run is active in this process; sd-scripts keeps process-wide state, so runs "
                    "in one process go one at a time: wait for it to end (or stop it) first"
                )
        self._owner, self._ending = threading.get_ident(), ending
        try:
            yield
        finally:
            self._owner, self._ending = None, lambda: False
            self._lock.release()


_SLOT = _RunSlot()


@contextlib.contextmanager
def _engine_session(
    cfg: TrainConfig,
    plan: DeviceChoice,
    generator: DeviceGenerator | None,
    ending: Callable[[], bool],
    log: Path | None,
    append_log: bool,
    locked: bool = True,
) -> Iterator[tuple[EngineHost, Any, RootLoggerSnapshot]]:
    """What a training run and a sampling call share: this process's run slot, then the output's lock (not in a
    worker of a multi-process run: the caller holds it, ``locked=False``), then the engine log (opened only now: a
    refused run must not empty a live run's log), then sd-scripts hosted in a process state that is put back
    afterwards. Yields the host, ``train_network`` and the caller's logging."""
    host = host_for(cfg.sd_scripts_dir)
    lock = output_lock(cfg) if locked else contextlib.nullcontext()
    try:
        with _SLOT.taken(ending), lock, engine_output(log, append=append_log), host.active() as logging:
            train_network = host.train_network()
            modules = host.engine_modules(cfg.network_module)
            with isolated_run(train_network, run_environment(plan)), random_untouched_by_logging(
                host.logger_names()
            ), class_attributes_restored(modules), module_values_restored(modules), cuda_rng_calls_reach(
                generator
            ), text_progress_bars():
                yield host, train_network, logging
    finally:
        free_memory()


def _to_caller(emit: Callable[[Event], None]) -> Callable[[Event], None]:
    """``emit`` with the callbacks' own prints going to the caller's streams, not to the engine log (flushed first,
    so a callback reading the log sees everything sd-scripts wrote up to the event)."""

    def deliver(event: Event) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        with caller_output():
            emit(event)

    return deliver


def run(
    cfg: TrainConfig,
    plan: DeviceChoice,
    emit: Callable[[Event], None],
    stop_requested: Callable[[], bool],
    started_at: float,
    resume: SavedState | None = None,
    log: Path | None = None,
    ranks: RankSync | None = None,
) -> Outcome:
    """Train ``cfg`` in this process with sd-scripts (continuing the state ``resume`` when given). Events go to
    ``emit``; ``stop_requested`` is polled at safe points (and before anything is loaded); sd-scripts' output goes
    to the file ``log`` when given. sd-scripts' own exceptions come out as :class:`TrainingError`; others (a
    callback's, Ctrl-C) unchanged. ``ranks``: this process is one rank of a multi-process run (``_worker``): the
    caller holds the output's lock and wrote the run's files (:func:`launched_run`); rank 0 alone samples and
    validates."""
    argv = build_argv(cfg, plan, resume.path if resume else None)
    generator = device_generator(plan.device)
    with _engine_session(cfg, plan, generator, stop_requested, log, resume is not None, locked=ranks is None) as (
        host, train_network, logs
    ):
        if stop_requested():  # let go of before it started (an iter_events stream closed at once): load nothing
            return Outcome(resume.step if resume else 0, None, stopped=True)
        first = ranks is None or ranks.rank == 0
        spec = validation_spec(cfg) if first else None
        if ranks is None:
            samples = _prepare_files(cfg, resume)
        else:
            samples = prepare_samples(cfg, fresh=False) if first else None
        generators = [generator] if generator is not None else []
        processes = ranks.world_size if ranks is not None else 1
        probe = Probe(
            _to_caller(emit), stop_requested, started_at, logs.restore, cfg.max_nonfinite_steps,
            resume=resume, state_record=state_record(cfg, processes) if cfg.save_state else None,
            samples=samples, generator=generator,
            memory=memory_reader(plan.device), device_name=device_name(plan.device),
            held_out=HeldOut(train_network, spec, generators) if spec is not None else None, ranks=ranks,
        )  # fmt: skip
        try:
            with _ctrl_c_stops_after_the_step(probe):
                return _train(train_network, host, argv, probe)
        finally:
            probe.batch_context = None  # the run's models: let them go with the run


def _prepare_files(cfg: TrainConfig, resume: SavedState | None) -> SampleSpec | None:
    """Before a run: leftovers of a killed run removed, the dataset TOML and prompt file written, a fresh run's
    manifests started. Returns what sampling needs (None: no sampling)."""
    remove_partial_files(cfg)
    remove_partial_states(cfg)
    write_dataset_toml(cfg)
    spec = validation_spec(cfg)
    if spec is not None and spec.manifest is not None and resume is None:
        spec.manifest.unlink(missing_ok=True)  # a fresh run starts its own (a resumed one appends)
    return prepare_samples(cfg, fresh=resume is None)


@contextlib.contextmanager
def launched_run(cfg: TrainConfig, resume: SavedState | None) -> Iterator[None]:
    """The caller's side of a multi-process run, around its workers: the output's lock, held for the whole run,
    and the run's files written once, before any worker starts."""
    with output_lock(cfg):
        _prepare_files(cfg, resume)
        yield


def sample(
    cfg: TrainConfig,
    plan: DeviceChoice,
    files: list[tuple[int, Path]],
    emit: Callable[[Event], None],
    started_at: float,
    log: Path | None = None,
) -> None:
    """Sample LoRA files on disk (``(step, path)`` pairs) with ``cfg``'s prompts, CFG scales and seed, into
    ``cfg.output_dir``, with sd-scripts' own sampler; events (:class:`SampleSaved`) go to ``emit``."""
    from ._sample_files import sample_files

    argv = build_argv(cfg, plan)
    generator = device_generator(plan.device)
    with _engine_session(cfg, plan, generator, lambda: False, log, True) as (host, train_network, logs):
        probe = Probe(_to_caller(emit), lambda: False, started_at, logs.restore,
                      samples=prepare_samples(cfg, fresh=False), generator=generator)  # fmt: skip
        args = parse_argv(train_network.setup_parser(), argv)
        try:
            sample_files(train_network, args, files, probe, base_first=cfg.sample_at_first)
        except BaseException as e:
            _clear_engine_frames(e.__traceback__, host.root)
            if isinstance(e, Exception) and not isinstance(e, SpykeLoraError) and e is not probe.callback_error:
                raise TrainingError(f"sd-scripts failed while sampling: {type(e).__name__}: {e}") from e
            raise


def validate(
    cfg: TrainConfig,
    plan: DeviceChoice,
    files: list[Path | None],
    folder: Path | None,
    report: Callable[[Path | None, float, int], None],
    log: Path | None = None,
) -> None:
    """The held-out loss of each LoRA file on disk (None: the base model) on the images in ``folder`` (None: the
    config's held-out images), as a training run with ``cfg`` measures it; each figure goes to
    ``report(file, loss, images)``."""
    argv = build_argv(cfg, plan)
    generator = device_generator(plan.device)
    spec = validation_spec(cfg, folder)
    assert spec is not None
    with _engine_session(cfg, plan, generator, lambda: False, log, True) as (host, train_network, _):
        args = parse_argv(train_network.setup_parser(), argv)
        generators = [generator] if generator is not None else []
        try:
            validate_files(train_network, args, files, spec, generators, report)
        except BaseException as e:
            _clear_engine_frames(e.__traceback__, host.root)
            if isinstance(e, Exception) and not isinstance(e, SpykeLoraError):
                raise TrainingError(f"sd-scripts failed while validating: {type(e).__name__}: {e}") from e
            raise


def _train(train_network, host: EngineHost, argv: list[str], probe: Probe) -> Outcome:
    """Run ``NetworkTrainer.train()`` and turn how it ends into an :class:`Outcome` or one of our errors."""
    parser = train_network.setup_parser()
    args = parse_argv(parser, argv)
    trainer = trainer_class(train_network)(probe)
    try:
        try:
            trainer.train(args)
        except StopRun as stop:
            final = finish_after_stop(stop, train_network, probe)
            _clear_engine_frames(stop.__traceback__, host.root)
            return Outcome(probe.steps_done, final, stopped=True)
        except KeyboardInterrupt as interrupt:
            if probe.interrupted_at_boundary:  # between steps: keep the last completed step's LoRA
                finish_after_stop(interrupt, train_network, probe)
            raise
        # the final file, when this run wrote it: a save during a NaN/Inf streak is skipped
        name = train_network.train_util.get_last_ckpt_name(args, "." + args.save_model_as)
        return Outcome(probe.steps_done, probe.written(Path(args.output_dir) / name), stopped=False)
    except NonFiniteStop as e:
        _clear_engine_frames(e.__traceback__, host.root)
        raise _nonfinite_error(probe) from None
    except SystemExit as e:
        _clear_engine_frames(e.__traceback__, host.root)
        if e is probe.callback_error:  # the caller's own exit: theirs to have
            raise
        # sd-scripts calls exit() on some bad input; a library must not
        raise TrainingError(f"sd-scripts tried to exit the process (exit code {e.code}); see its log above") from None
    except BaseException as e:
        _clear_engine_frames(e.__traceback__, host.root)
        if isinstance(e, Exception) and e is not probe.callback_error and not isinstance(e, SpykeLoraError):
            raise TrainingError(f"sd-scripts failed: {type(e).__name__}: {e}") from e
        raise


@contextlib.contextmanager
def _ctrl_c_stops_after_the_step(probe: Probe) -> Iterator[None]:
    """While steps run, a first Ctrl-C ends the run after the current step (its LoRA saved under the final name,
    then KeyboardInterrupt); a second one, or one before training starts, interrupts at once. Main thread only
    (Python delivers signals there); the caller's handler is put back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)

    def on_sigint(signum: int, frame: Any) -> None:
        if not probe.started or probe.interrupt_requested:
            raise KeyboardInterrupt
        probe.interrupt_requested = True
        print("\nspyke-lora: stopping after this step (Ctrl-C again to abort at once)", file=sys.stderr, flush=True)

    signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _nonfinite_error(probe: Probe) -> NonFiniteLoss:
    kept = ", ".join(p.name for p in probe.saved) or "none were written before it"
    return NonFiniteLoss(
        f"the loss became {probe.last_loss} at step {probe.steps_done} (epoch {probe.epoch}); the run was stopped "
        f"and no file was written from the broken weights. Checkpoints kept: {kept}. Likely causes: a learning rate "
        f"too high (the recipe: unet_lr 1e-4, text_encoder_lr 5e-5), a half-precision VAE (keep it in fp32: the "
        f"default on MPS), or fp16 overflow on CUDA (try mixed_precision = 'bf16')",
        step=probe.steps_done,
        loss=probe.last_loss,
    )


def _clear_engine_frames(tb: TracebackType | None, root: Path) -> None:
    """Drop the locals of sd-scripts' frames held by a traceback: they hold the models (gigabytes), and a notebook
    keeps the last exception alive. The traceback's lines stay readable."""
    prefix = str(root) + os.sep
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_filename.startswith(prefix):
            try:
                frame.clear()
            except RuntimeError:  # still executing; cannot happen for an unwound frame
                pass
        tb = tb.tb_next
