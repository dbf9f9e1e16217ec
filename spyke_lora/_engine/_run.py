"""One run, read top to bottom (:func:`run`), and the calls on files on disk that share its prelude
(:func:`sample_checkpoints`, :func:`validate_checkpoints`).

A run takes this process's run slot and the output's lock, hosts sd-scripts in a process state that is put back
afterwards, builds the run's parts (:class:`~._probe.Probe`, the hooks of ``_hooks``, the work after each save of
``_after_save``), drives ``NetworkTrainer.train()`` through the trainer of ``_trainer``, and turns how it ends
(completed, stopped, Ctrl-C, NaN, sd-scripts' own failure) into an :class:`~._context.Outcome` or one of our errors.
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
from ._after_save import AfterSave, CheckpointSampler, HeldOutPass, SampleSpec
from ._argv import build_argv, parse_argv, run_environment
from ._compat import features_of, require
from ._context import Outcome, RunContext
from ._engine_log import caller_output, engine_output, text_progress_bars
from ._frames import finish_after_stop
from ._held_out import HeldOut, validate_files, validation_spec
from ._host import EngineHost, RootLoggerSnapshot, host_for, quiet_git_revision, random_untouched_by_logging
from ._outputs import prepare_samples, remove_partial_files, write_dataset_toml
from ._probe import NonFiniteStop, Probe, StopRun
from ._process import (
    DeviceGenerator,
    class_attributes_restored,
    cuda_rng_calls_reach,
    device_generator,
    free_memory,
    isolated_run,
    module_values_restored,
)
from ._state import SavedState, remove_partial_states, state_record
from ._trainer import RunParts, trainer_class

__all__ = ["launched_run", "prepare_run_files", "run", "sample_checkpoints", "validate_checkpoints"]


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
    device: DeviceChoice,
    *,
    ending: Callable[[], bool],
    log: Path | None,
    append_log: bool,
    locked: bool = True,
) -> Iterator[_Session]:
    """What a training run and a sampling or validation call share: this process's run slot, then the output's lock
    (not in a worker of a multi-process run: the caller holds it, ``locked=False``), then the engine log (opened
    only now: a refused run must not empty a live run's log), then sd-scripts hosted in a process state that is put
    back afterwards."""
    host = host_for(cfg.sd_scripts_dir)
    generator = device_generator(device.device)
    lock = output_lock(cfg) if locked else contextlib.nullcontext()
    try:
        with _SLOT.taken(ending), lock, engine_output(log, append=append_log), host.active() as logging:
            train_network = host.train_network()
            modules = host.engine_modules(cfg.network_module)
            with contextlib.ExitStack() as restored:
                restored.enter_context(isolated_run(train_network, run_environment(device)))
                restored.enter_context(random_untouched_by_logging(host.logger_names()))
                restored.enter_context(class_attributes_restored(modules))
                restored.enter_context(module_values_restored(modules))
                restored.enter_context(cuda_rng_calls_reach(generator))
                restored.enter_context(text_progress_bars())
                restored.enter_context(quiet_git_revision(train_network.train_util))
                yield _Session(host, train_network, logging, generator)
    finally:
        free_memory()


@dataclasses.dataclass(frozen=True)
class _Session:
    """sd-scripts hosted for one call: the host, its ``train_network`` module, the caller's logging, the device's
    generator."""

    host: EngineHost
    train_network: Any
    logging: RootLoggerSnapshot
    generator: DeviceGenerator | None

    @property
    def generators(self) -> list[DeviceGenerator]:
        return [self.generator] if self.generator is not None else []

    def args(self, argv: list[str]) -> Any:
        """sd-scripts' own parser's namespace for ``argv``."""
        return parse_argv(self.train_network.setup_parser(), argv)

    def failure(self, error: BaseException, doing: str, callback_error: BaseException | None = None) -> None:
        """Drop sd-scripts' frames from ``error``'s traceback; raise it as a :class:`TrainingError` when it is
        sd-scripts' own (not ours, not a callback's)."""
        _clear_engine_frames(error.__traceback__, self.host.root)
        if isinstance(error, Exception) and not isinstance(error, SpykeLoraError) and error is not callback_error:
            raise TrainingError(f"sd-scripts failed{doing}: {type(error).__name__}: {error}") from error


def _to_caller(emit: Callable[[Event], None]) -> Callable[[Event], None]:
    """``emit`` with the callbacks' own prints going to the caller's streams, not to the engine log (flushed first,
    so a callback reading the log sees everything sd-scripts wrote up to the event)."""

    def deliver(event: Event) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        with caller_output():
            emit(event)

    return deliver


def run(ctx: RunContext) -> Outcome:
    """Train ``ctx.cfg`` in this process with sd-scripts.

    Args:
        ctx: The run: config, device, where events go, the stop poll, a resume, the engine log, the ranks.

    Returns:
        How the run ended.

    Raises:
        EngineError: This sd-scripts lacks what the run's features need (``_compat.require``), before anything
            is written.
        TrainingError: sd-scripts itself failed (or tried to exit the process).
        NonFiniteLoss: The loss was NaN/Inf for ``max_nonfinite_steps`` steps.
        KeyboardInterrupt: Ctrl-C (after the step's LoRA was saved, when it came between steps).
        BaseException: A callback's own exception, unchanged.
    """
    argv = build_argv(ctx.cfg, ctx.device, ctx.resume.path if ctx.resume else None)
    session = _engine_session(
        ctx.cfg,
        ctx.device,
        ending=ctx.stop_requested,
        log=ctx.log,
        append_log=ctx.resume is not None,
        locked=ctx.ranks is None,
    )
    with session as engine:
        if ctx.stop_requested():  # let go of before it started (an iter_events stream closed at once): load nothing
            return Outcome(ctx.first_step, None, stopped=True)
        # an sd-scripts older than the run's features need: refused before a file is written or a model loaded
        require(engine.train_network, features_of(ctx.cfg, resumed=ctx.resume is not None))
        parts = _run_parts(ctx, engine)
        try:
            with _ctrl_c_stops_after_the_step(parts.probe):
                return _drive(engine, engine.args(argv), parts)
        finally:
            if parts.after_save.held_out is not None:
                parts.after_save.held_out.batch_context = None  # the run's models: let them go with the run


def _run_parts(ctx: RunContext, engine: _Session) -> RunParts:
    """The probe and the work after each save, for this process (rank 0 alone samples and validates)."""
    cfg = ctx.cfg
    if ctx.ranks is None:
        samples = prepare_run_files(cfg, ctx.resume)
    else:
        samples = prepare_samples(cfg, fresh=False) if ctx.reports else None
    probe = Probe(
        _to_caller(ctx.emit),
        ctx.stop_requested,
        ctx.started_at,
        engine.logging.restore,
        first_step=ctx.first_step,
        max_nonfinite_steps=cfg.max_nonfinite_steps,
        ranks=ctx.ranks,
        memory=memory_reader(ctx.device.device),
        device_name=device_name(ctx.device.device),
    )
    spec = validation_spec(cfg) if ctx.reports else None
    held_out = HeldOutPass(HeldOut(engine.train_network, spec, engine.generators), probe) if spec else None
    sampler = CheckpointSampler(samples, probe.emit, engine.generator) if samples is not None else None
    after_save = AfterSave(probe, sampler, held_out)
    probe.held_out_every = after_save.at_step if held_out is not None else None
    return RunParts(
        probe,
        after_save,
        resumed=ctx.resume is not None,
        generator=engine.generator,
        state_record=state_record(cfg, ctx.processes) if cfg.save_state else None,
    )


def prepare_run_files(cfg: TrainConfig, resume: SavedState | None) -> SampleSpec | None:
    """Before a run: leftovers of a killed run removed, the dataset TOML and prompt file written, a fresh run's
    manifests started.

    Returns:
        What sampling needs, or None: no sampling.
    """
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
        prepare_run_files(cfg, resume)
        yield


def sample_checkpoints(
    cfg: TrainConfig,
    device: DeviceChoice,
    files: list[tuple[int, Path]],
    emit: Callable[[Event], None],
    started_at: float,
    log: Path | None = None,
    base_only: bool = False,
) -> None:
    """Sample LoRA files on disk with ``cfg``'s prompts, CFG scales and seed, into ``cfg.output_dir``, with
    sd-scripts' own sampler (``base_only``: the base model alone, as step 0, and none of the files).

    Args:
        cfg: The run's config (prompts, scales, seed, base model, output).
        device: The device to sample on.
        files: ``(step, path)`` of each file.
        emit: Receives one :class:`~spyke_lora.events.SampleSaved` per image.
        started_at: ``time.perf_counter()`` at the call's start.
        log: The file sd-scripts' own output goes to (None: the console).

    Raises:
        EngineError: This sd-scripts cannot sample (``_compat.require``), before a model is loaded.
        TrainingError: sd-scripts itself failed.
    """
    from ._sample_files import sample_files

    argv = build_argv(cfg, device)
    with _engine_session(cfg, device, ending=lambda: False, log=log, append_log=True) as engine:
        probe = Probe(_to_caller(emit), lambda: False, started_at, engine.logging.restore)
        require(engine.train_network, ("sampling",))  # before the folder is touched or a model loaded
        sampler = CheckpointSampler(prepare_samples(cfg, fresh=False), probe.emit, engine.generator)
        try:
            sample_files(
                engine.train_network,
                engine.args(argv),
                files,
                sampler,
                base_first=cfg.sample_at_first,
                base_only=base_only,
            )
        except BaseException as e:
            engine.failure(e, " while sampling", probe.callback_error)
            raise


def validate_checkpoints(
    cfg: TrainConfig,
    device: DeviceChoice,
    files: list[Path | None],
    folder: Path | None,
    report: Callable[[Path | None, float, int], None],
    log: Path | None = None,
) -> None:
    """The held-out loss of LoRA files on disk, as a training run with ``cfg`` measures it.

    Args:
        cfg: The run's config.
        device: The device to validate on.
        files: The LoRA files (None: the base model alone).
        folder: The images to measure on (None: the config's held-out images).
        report: Called with ``(file, loss, images)`` for each file.
        log: The file sd-scripts' own output goes to (None: the console).

    Raises:
        EngineError: This sd-scripts cannot validate (``_compat.require``), before a model is loaded.
        TrainingError: sd-scripts itself failed.
    """
    argv = build_argv(cfg, device)
    spec = validation_spec(cfg, folder)
    assert spec is not None
    with _engine_session(cfg, device, ending=lambda: False, log=log, append_log=True) as engine:
        require(engine.train_network, ("validation",))  # before a model is loaded
        try:
            validate_files(engine.train_network, engine.args(argv), files, spec, engine.generators, report)
        except BaseException as e:
            engine.failure(e, " while validating")
            raise


def _drive(engine: _Session, args: Any, parts: RunParts) -> Outcome:
    """Run ``NetworkTrainer.train()`` and turn how it ends into an :class:`Outcome` or one of our errors."""
    train_network, probe = engine.train_network, parts.probe
    trainer = trainer_class(train_network)(parts)
    try:
        try:
            trainer.train(args)
        except StopRun as stop:
            final = finish_after_stop(stop, train_network, probe, parts.written)
            _clear_engine_frames(stop.__traceback__, engine.host.root)
            return Outcome(probe.steps_done, final, stopped=True)
        except KeyboardInterrupt as interrupt:
            if probe.interrupted_at_boundary:  # between steps: keep the last completed step's LoRA
                finish_after_stop(interrupt, train_network, probe, parts.written)
            raise
        # the final file, when this run wrote it: a save during a NaN/Inf streak is skipped
        name = train_network.train_util.get_last_ckpt_name(args, "." + args.save_model_as)
        return Outcome(probe.steps_done, parts.written(Path(args.output_dir) / name), stopped=False)
    except NonFiniteStop as e:
        _clear_engine_frames(e.__traceback__, engine.host.root)
        raise _nonfinite_error(parts) from None
    except SystemExit as e:
        _clear_engine_frames(e.__traceback__, engine.host.root)
        if e is probe.callback_error:  # the caller's own exit: theirs to have
            raise
        # sd-scripts calls exit() on some bad input; a library must not
        raise TrainingError(f"sd-scripts tried to exit the process (exit code {e.code}); see its log above") from None
    except BaseException as e:
        engine.failure(e, "", probe.callback_error)
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


def _nonfinite_error(parts: RunParts) -> NonFiniteLoss:
    probe, loss = parts.probe, parts.probe.losses.last
    kept = ", ".join(p.name for p in parts.saved) or "none were written before it"
    return NonFiniteLoss(
        f"the loss became {loss} at step {probe.steps_done} (epoch {probe.epoch}); the run was stopped "
        f"and no file was written from the broken weights. Checkpoints kept: {kept}. Likely causes: a learning rate "
        f"too high (the recipe: unet_lr 1e-4, text_encoder_lr 5e-5), a half-precision VAE (keep it in fp32: the "
        f"default on MPS), or fp16 overflow on CUDA (try mixed_precision = 'bf16')",
        step=probe.steps_done,
        loss=loss,
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
