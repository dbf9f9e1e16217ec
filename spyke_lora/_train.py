"""``train(cfg, callbacks)``: one sd-scripts LoRA run in this process, delivered as events."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Union

from . import _engine
from ._config import TrainConfig
from ._device import DeviceChoice
from ._launch import Launch, launch_command, resolve_launch, run_processes
from ._memory import UNDERESTIMATE, MemoryPlan, PeakMeter, gib
from ._mps_fallback import fallback_missing
from ._plan import Plan, plan
from ._records import RunRecorder
from ._user_warnings import warn_caller
from .events import CheckpointSaved, Event, StepEnded, Stop, TrainEnded, TrainStarted, ValidationEnded

__all__ = ["Callback", "TrainResult", "train"]

logger = logging.getLogger("spyke_lora")

# what train() calls with every event: any callable taking one event; returning Stop ends the run after this step
Callback = Callable[[Event], Union[Stop, None, Any]]


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What a run did. ``status``: "completed", or "stopped" when a callback returned :class:`Stop`."""

    status: str
    steps: int  # the step reached (a resumed run counts from the start of the run it continues)
    final_path: Path | None  # NAME.safetensors (None only when a stop came before the first step)
    checkpoints: tuple[CheckpointSaved, ...]  # every file written, in order; the final one last
    history: tuple[StepEnded, ...]  # one entry per step
    device: str
    mixed_precision: str
    stop_reason: str | None = None
    resumed_from_step: int = 0  # 0: a fresh run
    validations: tuple[ValidationEnded, ...] = ()  # every held-out validation pass, in order (validation_dir)
    peak_memory_bytes: int | None = None  # the run's measured peak on its device (TrainEnded.peak_memory_bytes)
    memory: MemoryPlan | None = None  # what plan() predicted: peak, budget, parts, gradient checkpointing and why

    @property
    def losses(self) -> list[float]:
        """The loss of every step, in order."""
        return [s.loss for s in self.history]


class _Session:
    """Delivers events to the callbacks in order and remembers what the result needs."""

    def __init__(self, callbacks: tuple[Callback, ...], let_go: Callable[[], str | None] = lambda: None) -> None:
        self.callbacks = callbacks
        self.let_go = let_go  # a reason once the caller has let go of the run (an iter_events stream closed)
        self.started: TrainStarted | None = None
        self.history: list[StepEnded] = []
        self.checkpoints: list[CheckpointSaved] = []
        self.validations: list[ValidationEnded] = []
        self.meter: PeakMeter | None = None  # the run's peak memory (TrainEnded.peak_memory_bytes)
        self.measured_peak: int | None = None  # a multi-process run's: rank 0's own meter (the caller's is idle)
        self.predicted_peak: int | None = None
        self.memory_budget: int | None = None  # what plan() measured the device's budget at (the loss chart's line)
        self.stop_reason: str | None = None
        self.ended = False

    def emit(self, event: Event) -> None:
        if isinstance(event, TrainStarted):
            self.started = event
        elif isinstance(event, StepEnded):
            self.history.append(event)
        elif isinstance(event, CheckpointSaved):
            self.checkpoints.append(event)
        elif isinstance(event, ValidationEnded):
            self.validations.append(event)
        for callback in self.callbacks:
            answer = callback(event)  # an exception here is the caller's: it propagates unchanged
            if isinstance(answer, Stop) and self.stop_reason is None and not isinstance(event, TrainEnded):
                self.stop_reason = answer.reason
                logger.info("stop requested after step %d: %s", self.step_reached(0), answer.reason)

    def peak(self) -> int | None:
        if self.measured_peak is not None:
            return self.measured_peak
        return self.meter.peak() if self.meter is not None else None

    def step_reached(self, default: int) -> int:
        return self.history[-1].step if self.history else default

    def stop_requested(self) -> bool:
        if self.stop_reason is None:
            self.stop_reason = self.let_go()
        return self.stop_reason is not None

    def end(self, status: str, steps: int, final_path: Path | None) -> None:
        if self.started is not None and not self.ended:
            self.ended = True
            peak = self.peak()
            self.emit(TrainEnded(status, steps, final_path, peak, self.predicted_peak, self.memory_budget))  # type: ignore[arg-type]
            if peak is not None and self.predicted_peak and peak > UNDERESTIMATE * self.predicted_peak:
                warn_caller(
                    f"the run's peak memory {gib(peak)} was {peak / self.predicted_peak - 1:.0%} above the "
                    f"{gib(self.predicted_peak)} plan() predicted: the memory model is off for this machine or this "
                    f"setup; run `spyke-lora calibrate` so plan() measures it (docs/memory.md)"
                )


def train(
    cfg: TrainConfig,
    callbacks: Iterable[Callback] | Callback = (),
    *,
    resume: str | os.PathLike[str] | None = None,
    engine_log: str | os.PathLike[str] | None = "auto",
    processes: int | None = None,
    launch: Launch | None = None,
) -> TrainResult:
    """Train a LoRA with kohya-ss/sd-scripts in this process (or in ``processes`` worker processes).

    Every check of :func:`~spyke_lora.plan` runs first: a refused run loads and writes nothing.

    Usage::

        from spyke_lora import TrainConfig, train
        from spyke_lora.callbacks import Progress

        result = train(TrainConfig.from_toml("spyke.toml"), Progress())
        print(result.final_path, result.losses[-1])

    Args:
        cfg: What to train (:class:`~spyke_lora.TrainConfig`).
        callbacks: One callable or several, each receiving every :mod:`~spyke_lora.events` event in order. A
            callback that returns :class:`~spyke_lora.Stop` ends the run cleanly after the current step, with that
            step's LoRA saved under the final name. An exception raised by a callback ends the run
            (``TrainEnded(status="failed")`` is delivered first) and propagates unchanged.
        resume: ``"latest"``, or the path of a ``NAME-step…-state`` folder: continues a run saved with
            ``save_state = true``; its step count, epoch, learning-rate schedule and checkpoint schedule go on as if
            it had never stopped. A config or dataset that would train differently is refused with the differences
            listed.
        engine_log: Where sd-scripts' own prints, log lines and progress bars go: a file path; None for the console;
            ``"auto"`` (the default) is the console, except in a Jupyter notebook, where they go to
            ``NAME.engine.log`` in ``output_dir`` so the cell shows the callbacks' output
            (:class:`~spyke_lora.callbacks.Progress`) instead of sd-scripts' carriage-return progress bars.
        processes: Train in N worker processes started by accelerate's launcher (``accelerate launch``: DDP, one
            GPU per process on CUDA, gloo on the CPU), each running this same engine. Rank 0's events reach
            ``callbacks`` in order, a ``Stop`` or Ctrl-C stops every rank after the same step, rank 0 alone writes
            the files, and each rank's sd-scripts output goes to ``NAME.engine.log`` (rank 0; or ``engine_log``) and
            ``NAME.engine.rankR.log`` in ``output_dir`` (docs/scaling.md).
        launch: A :class:`~spyke_lora.Launch`: several machines, or an accelerate config file.

    Returns:
        What the run did (:class:`TrainResult`): its status, steps, files, losses, device and peak memory.

    Raises:
        ConfigError: A check of :func:`~spyke_lora.plan` refused the run; nothing was loaded or written.
        TrainingError: sd-scripts itself failed.
        NonFiniteLoss: The loss was NaN/Inf (no file is written from such weights).
        WorkerFailed: A worker of a multi-process run died; it names its rank.
        KeyboardInterrupt: After a first Ctrl-C, once the current step's LoRA is saved (a second Ctrl-C interrupts
            at once).
    """
    return run_training(cfg, callbacks, resume=resume, engine_log=engine_log, launch=resolve_launch(processes, launch))


def run_training(
    cfg: TrainConfig,
    callbacks: Iterable[Callback] | Callback,
    *,
    resume: str | os.PathLike[str] | None,
    engine_log: str | os.PathLike[str] | None,
    let_go: Callable[[], str | None] = lambda: None,
    launch: Launch | None = None,
) -> TrainResult:
    """:func:`train` plus ``let_go``.

    Args:
        cfg: As for :func:`train`.
        callbacks: As for :func:`train`.
        resume: As for :func:`train`.
        engine_log: As for :func:`train`.
        let_go: Polled with the callbacks' answers: a reason once the caller no longer wants the run (an
            ``iter_events`` stream closed, perhaps before any event). The run then stops as on a :class:`Stop`,
            before loading anything when that comes early enough.
        launch: The processes to train in (None: this one).

    Returns:
        What the run did.
    """
    with _engine.preserved_random_state():  # the caller's generators are theirs: a run seeds and draws from them
        try:
            return _plan_record_run(cfg, callbacks, resume, engine_log, let_go, launch or Launch())
        finally:  # the run's last references are gone only now: give the freed memory back (a notebook sweep)
            _engine.free_memory()


def _plan_record_run(
    cfg: TrainConfig,
    callbacks: Iterable[Callback] | Callback,
    resume: str | os.PathLike[str] | None,
    engine_log: str | os.PathLike[str] | None,
    let_go: Callable[[], str | None],
    launch: Launch,
) -> TrainResult:
    """The recipe of a run: plan (every check), records, the run (here or launched), the result."""
    started_at = time.perf_counter()
    # 1. plan: every check first, so a refused run loads and writes nothing
    checked = plan(cfg, resume=resume, launch=launch)
    cfg = cfg.replace(gradient_checkpointing=checked.gradient_checkpointing)  # "auto" as the memory plan resolved it
    if checked.alone is not None and checked.alone.ddp_timeout is not None:  # rank 0 samples alone: let the rest wait
        cfg = cfg.replace(extra_args={**cfg.extra_args, "ddp_timeout": checked.alone.ddp_timeout})
    state = _engine.resolve_resume(cfg, checked.resume_from, launch.world_size) if checked.resume_from else None
    device = _engine.device_choice(cfg)
    _announce(cfg, device, checked, launch)
    # 2. records: the run's config, command line and events next to its LoRA files (the main machine's)
    own = (callbacks,) if callable(callbacks) else tuple(callbacks)
    recorder = _recorder(cfg, device, state, launch)
    session = _Session((recorder, *own) if launch.main_machine else own, let_go)
    session.predicted_peak = checked.memory.peak_bytes if checked.memory is not None else None
    session.memory_budget = checked.memory.budget_bytes if checked.memory is not None else None
    # 3. the run, in this process or in launch.world_size workers, its peak memory measured
    context = _engine.RunContext(
        cfg, device, session.emit, session.stop_requested, started_at, state, engine_log_path(engine_log, cfg)
    )
    with PeakMeter(device.device) as meter:
        session.meter = meter
        outcome = _run(context, launch, session, engine_log, checked.resume_step)
    # 4. the result
    return _result(outcome, session, device, checked)


def _announce(cfg: TrainConfig, device: DeviceChoice, checked: Plan, launch: Launch) -> None:
    """The plan's warnings, the MPS fallback's, and the run's first log lines."""
    for note in checked.warnings:
        warn_caller(note)
    if device.device == "mps" and fallback_missing():
        warn_caller(
            "PYTORCH_ENABLE_MPS_FALLBACK=1 was not in the environment when torch was imported, so an operation MPS "
            "lacks will fail instead of running on the CPU; import spyke_lora before torch (it sets the variable) "
            "or export PYTORCH_ENABLE_MPS_FALLBACK=1 before starting Python"
        )
    processes = f" in {launch.world_size} processes" if launch.multi_process else ""
    logger.info(
        "training %s on %s (mixed precision %s)%s", cfg.output_name, device.device, device.mixed_precision, processes
    )
    if checked.memory is not None:
        memory = checked.memory
        checkpointing = "on" if memory.gradient_checkpointing else "off"
        logger.info(
            "predicted peak memory %s; gradient checkpointing %s: %s",
            gib(memory.peak_bytes),
            checkpointing,
            memory.reason,
        )


def _recorder(cfg: TrainConfig, device: DeviceChoice, state: Any, launch: Launch) -> RunRecorder:
    """The run's records: its config, the equivalent command line, where sd-scripts came from."""
    root = _engine.locate_engine(cfg.sd_scripts_dir)
    engine = {"sd_scripts": str(root), "sd_scripts_commit": _engine.engine_commit(root) or "unknown"}
    if launch.multi_process:
        engine.update(processes=launch.world_size, machines=launch.num_machines)
    launcher = None
    if launch.multi_process:

        def launcher(script: list[str]) -> list[str]:
            return launch_command(launch, device.mixed_precision, script)

    command = _engine.command_line(cfg, device, state.path if state else None, launcher)
    return RunRecorder(cfg, command, engine)


def _run(
    context: _engine.RunContext, launch: Launch, session: _Session, engine_log: Any, resume_step: int
) -> _engine.Outcome:
    """The run itself, with ``TrainEnded`` delivered however it ends."""
    try:
        if launch.multi_process:
            outcome = _run_launched(context, launch, engine_log)
            session.measured_peak = outcome.peak_memory_bytes
        else:
            outcome = _engine.run(context)
    except KeyboardInterrupt:
        final = next((c.path for c in reversed(session.checkpoints) if c.final), None)
        session.end("interrupted", session.step_reached(resume_step), final)
        raise
    except BaseException:
        session.end("failed", session.step_reached(resume_step), None)
        raise
    if outcome.final_path is None and outcome.steps > resume_step and launch.main_machine:
        warn_caller(
            f"no final LoRA was written at step {outcome.steps}: the loss was not finite there (NaN/Inf), and no "
            f"file is saved from such weights. Files written before: "
            f"{', '.join(c.path.name for c in session.checkpoints) or 'none'}"
        )
    session.end("stopped" if outcome.stopped else "completed", outcome.steps, outcome.final_path)
    return outcome


def _result(outcome: _engine.Outcome, session: _Session, device: DeviceChoice, checked: Plan) -> TrainResult:
    started = session.started
    return TrainResult(
        status="stopped" if outcome.stopped else "completed",
        steps=outcome.steps,
        final_path=outcome.final_path,
        checkpoints=tuple(session.checkpoints),
        history=tuple(session.history),
        device=started.device if started else device.device,
        mixed_precision=started.mixed_precision if started else device.mixed_precision,
        stop_reason=session.stop_reason if outcome.stopped else None,
        resumed_from_step=checked.resume_step,
        validations=tuple(session.validations),
        peak_memory_bytes=session.peak(),
        memory=checked.memory,
    )


def _run_launched(
    context: _engine.RunContext, launch: Launch, engine_log: str | os.PathLike[str] | None
) -> _engine.Outcome:
    """The run in ``launch.world_size`` worker processes (``_launch``), its output lock held and its files written
    here first; rank 0's events go to ``context.emit``."""
    cfg, device, state = context.cfg, context.device, context.resume
    given = None if isinstance(engine_log, str) and engine_log == "auto" else engine_log
    first = Path(given) if given is not None else cfg.output_dir / f"{cfg.output_name}.engine.log"
    ranks = range(1, launch.world_size)
    logs = [str(first.absolute())] + [
        str((cfg.output_dir / f"{cfg.output_name}.engine.rank{r}.log").absolute()) for r in ranks
    ]
    spec = {
        "config": cfg.to_dict(),
        "device": device.device,
        "resume": str(state.path) if state is not None else None,
        "started": time.time() - (time.perf_counter() - context.started_at),
        "logs": logs,
    }
    with _engine.launched_run(cfg, state):
        environment = _engine.run_environment(device)
        return run_processes(
            cfg, launch, device.mixed_precision, environment, spec, context.emit, context.stop_requested
        )


def engine_log_path(engine_log: str | os.PathLike[str] | None, cfg: TrainConfig) -> Path | None:
    """The file sd-scripts' own output goes to, or None for the console (see ``engine_log`` in :func:`train`)."""
    from .callbacks import in_notebook

    if isinstance(engine_log, str) and engine_log == "auto":
        return cfg.output_dir / f"{cfg.output_name}.engine.log" if in_notebook() else None
    return None if engine_log is None else Path(engine_log)
