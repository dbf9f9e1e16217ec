"""The event stream of one run and its stop points: what sd-scripts' hook calls become for the caller.

The order of one optimizer step, as sd-scripts v0.10.1's ``train()`` makes the calls (``train_network.py``):

1. ``network.on_epoch_start`` at an epoch's start (:class:`~._hooks.EpochWatch`): a stop point; the epoch number.
2. ``process_batch`` for each micro-batch: :meth:`Probe.before_micro_batch` (a stop point, the learning rates read
   from the optimizer before the step) and :meth:`Probe.after_micro_batch` (the micro-batch's loss).
3. sd-scripts steps the optimizer, then calls ``sample_images(epoch=None)``: :meth:`Probe.step_ends` delivers
   :class:`~spyke_lora.events.StepEnded`, ends the run on a NaN/Inf streak, runs a held-out pass every
   ``validate_every_n_steps``, agrees with the other ranks, and is a stop point.
4. When sd-scripts saves a file (``network.save_weights``, :class:`~._hooks.GuardedSave`):
   :class:`~spyke_lora.events.CheckpointSaved`, then :class:`~._after_save.AfterSave` (validation, samples).

``TrainStarted`` comes from the ``sample_images(epoch=0)`` call made once before the loop (:meth:`training_starts`),
when ``args.max_train_steps`` is final. A stop is :class:`StopRun`, raised at a stop point; ``_frames`` then runs the
end of sd-scripts' ``train()`` itself, so the final file is written by sd-scripts' own saving code.
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..events import Event, StepEnded, TrainStarted
from ._ranks import AbortRun, RankSync

__all__ = ["LearningRates", "LossWindow", "NonFiniteStop", "Probe", "StopRun"]


class StopRun(BaseException):
    """Raised inside sd-scripts' loop to end the run after the current step (never escapes the engine)."""


class NonFiniteStop(BaseException):
    """Raised inside sd-scripts' loop when the loss has been NaN/Inf too long: end now, save nothing."""


class LossWindow:
    """The step losses a run reports: the last one, the NaN/Inf streak, and sd-scripts' running average.

    sd-scripts' running average (``avr_loss``, its ``LossRecorder``) is the mean loss of the last epoch's worth of
    batches: each batch replaces the one at its position in the previous epoch. A window of that length is the same
    mean, and stays right when a resumed run starts mid-epoch.
    """

    def __init__(self) -> None:
        self.last = float("nan")
        self.nonfinite_streak = 0  # consecutive steps with a NaN/Inf loss: no file is saved during one
        self._recent: collections.deque[float] = collections.deque()
        self._micro: list[Any] = []  # detached loss tensors of the current optimizer step

    def size_to(self, batches: int) -> None:
        """Make the window one epoch long (``batches`` per epoch), at the first epoch's start."""
        self._recent = collections.deque(maxlen=max(1, batches))

    def add_micro_batch(self, loss: Any) -> None:
        """A micro-batch's loss tensor (read only at the step's end: no device sync per micro-batch)."""
        self._micro.append(loss.detach())

    def at_step_start(self) -> bool:
        """Whether no micro-batch of the current optimizer step has been seen yet."""
        return not self._micro

    def end_step(self, mean: Callable[[float], float] | None = None) -> float:
        """The step's loss (its micro-batches' mean; ``mean`` averages it over the ranks), recorded."""
        losses = [float(t.item()) for t in self._micro]
        self._micro.clear()
        loss = sum(losses) / len(losses) if losses else float("nan")
        if mean is not None:  # the effective batch's loss: every rank's step, averaged (NaN on any: NaN)
            loss = mean(loss)
            losses = [loss]
        self._recent.extend(losses)
        self.last = loss
        self.nonfinite_streak = 0 if math.isfinite(loss) else self.nonfinite_streak + 1
        return loss

    def average(self) -> float:
        """sd-scripts' running average (the last loss before any)."""
        return sum(self._recent) / len(self._recent) if self._recent else self.last


class LearningRates:
    """(U-Net lr, text-encoder lr or None) read from the optimizer's param groups, told apart by the U-Net LoRA
    parameters' ids."""

    def __init__(self) -> None:
        self.current: tuple[float, float | None] = (0.0, None)
        self._unet_ids: frozenset[int] = frozenset()

    def know_network(self, network: Any) -> None:
        """Remember which parameters are the U-Net's (``network.unet_loras``)."""
        loras = getattr(network, "unet_loras", None) or ()
        self._unet_ids = frozenset(id(p) for lora in loras for p in lora.parameters())

    def read(self, accelerator: Any) -> None:
        """Read the rates the next optimizer step will use."""
        optimizers = getattr(accelerator, "_optimizers", None)
        if optimizers:
            self.current = self._split(optimizers[0].param_groups)

    def _split(self, groups: list[dict[str, Any]]) -> tuple[float, float | None]:
        if not self._unet_ids:  # a network module without unet_loras: report the last group
            return float(groups[-1]["lr"]), None
        unet = [g["lr"] for g in groups if g["params"] and id(g["params"][0]) in self._unet_ids]
        text = [g["lr"] for g in groups if g["params"] and id(g["params"][0]) not in self._unet_ids]
        return float(unet[0]) if unet else 0.0, float(text[0]) if text else None


class Probe:
    """One run's event stream and stop points (see the module's docstring for the order of one step).

    Args:
        emit: The caller's side: every event, in order.
        stop_requested: Polled at every stop point.
        started_at: ``time.perf_counter()`` at the run's start.
        restore_logging: Puts the caller's logging back: sd-scripts re-installs its root handler at the start of
            ``train()`` and whenever one of its modules is imported lazily, so it runs before every event.
        first_step: The step a resumed run starts from (0: a fresh run).
        max_nonfinite_steps: End the run after this many NaN/Inf steps in a row (0: never).
        ranks: What the ranks of a multi-process run agree on (None: one process).
        memory: Bytes in use on the training device now (``StepEnded.memory_bytes``).
        device_name: E.g. "Apple M1 Pro" (``TrainStarted.device_name``).
    """

    def __init__(
        self,
        emit: Callable[[Event], None],
        stop_requested: Callable[[], bool],
        started_at: float,
        restore_logging: Callable[[], None],
        *,
        first_step: int = 0,
        max_nonfinite_steps: int = 1,
        ranks: RankSync | None = None,
        memory: Callable[[], int | None] = lambda: None,
        device_name: str = "",
    ) -> None:
        self.restore_logging = restore_logging
        self.first_step = first_step
        self.steps_done = first_step
        self.total_steps = 0
        self.epoch = 0  # 1-based, set at the network's on_epoch_start (_hooks.EpochWatch)
        self.started = False
        self.losses = LossWindow()
        self.learning_rates = LearningRates()
        self.held_out_every: Callable[[int], None] | None = None  # a held-out pass every N steps (AfterSave's)
        self.max_nonfinite_steps = max_nonfinite_steps
        # Ctrl-C: asked for by the SIGINT handler (first press), or raised by a callback; both at a step boundary
        self.interrupt_requested = False
        self.interrupted_at_boundary = False
        self.callback_error: BaseException | None = None  # an exception a callback raised: passed on unchanged
        self._emit_to_callbacks = emit
        self._stop_requested = stop_requested
        self._started_at = started_at
        self._ranks = ranks
        self._memory = memory
        self._device_name = device_name

    def emit(self, event: Event) -> None:
        """Deliver ``event``; a callback's exception is remembered (:attr:`callback_error`) and passed on."""
        self.restore_logging()
        try:
            self._emit_to_callbacks(event)
        except KeyboardInterrupt:
            self.interrupted_at_boundary = True  # raised between steps: the weights are a completed step's
            raise
        except BaseException as e:  # SystemExit included: the caller's, passed on as itself
            self.callback_error = e
            raise

    def training_starts(self, args: Any, accelerator: Any) -> None:
        """Deliver :class:`TrainStarted` (from the ``sample_images(epoch=0)`` call before the loop)."""
        self.started = True
        self.total_steps = int(args.max_train_steps)
        self.emit(
            TrainStarted(
                total_steps=self.total_steps,
                device=accelerator.device.type,
                mixed_precision=str(accelerator.mixed_precision),
                output_dir=Path(args.output_dir),
                resumed_from_step=self.first_step,
                device_name=self._device_name,
                gradient_checkpointing=bool(args.gradient_checkpointing),
                processes=int(accelerator.num_processes),
            )
        )
        if self._ranks is not None:
            self._ranks.device = accelerator.device
            self._agree()
        self.raise_if_stopping()

    def before_micro_batch(self, accelerator: Any) -> None:
        """A stop point before each micro-batch; the learning rates its step will use.

        In a multi-process run the ranks agree again before a step's first micro-batch: rank 0 delivers the
        save-time events (``CheckpointSaved``, ``ValidationEnded``, ``SampleSaved``) and may be Ctrl-C'd while it
        samples *after* the step's agreement, so a ``Stop`` given then must be shared before the next step starts,
        or every rank trains one step more than one process does (the final file must be the step the callback
        saw). Every rank starts the same optimizer steps, so every rank makes this call the same number of times.
        """
        if self._ranks is not None and self.losses.at_step_start():
            self._agree()
        self.raise_if_stopping()
        self.learning_rates.read(accelerator)

    def after_micro_batch(self, loss: Any) -> None:
        """The micro-batch's loss tensor."""
        self.losses.add_micro_batch(loss)

    def step_ends(self, global_step: int) -> None:
        """Deliver :class:`StepEnded`, then end the run on a NaN/Inf streak or a requested stop."""
        loss = self.losses.end_step(self._ranks.mean if self._ranks is not None else None)
        self.steps_done = global_step
        unet_lr, text_lr = self.learning_rates.current
        self.emit(
            StepEnded(
                step=global_step,
                total_steps=self.total_steps,
                epoch=self.epoch,
                loss=loss,
                avg_loss=self.losses.average(),
                lr=unet_lr,
                lr_text_encoder=text_lr,
                elapsed_s=time.perf_counter() - self._started_at,
                memory_bytes=self._memory(),
            )
        )  # delivered for the bad step too, so a notebook shows it
        if self.max_nonfinite_steps and self.losses.nonfinite_streak >= self.max_nonfinite_steps:
            raise NonFiniteStop
        if self.held_out_every is not None and not self.losses.nonfinite_streak:
            self.held_out_every(global_step)
        if self._ranks is not None:
            self._agree()
        self.raise_if_stopping()

    def raise_if_stopping(self) -> None:
        """At a stop point: KeyboardInterrupt after a first Ctrl-C, :class:`StopRun` when a stop was asked for."""
        if self.interrupt_requested:
            self.interrupted_at_boundary = True
            raise KeyboardInterrupt
        if self._stop_requested():
            raise StopRun

    def _agree(self) -> None:
        """Every rank takes the caller's answer at the same step (a multi-process run)."""
        assert self._ranks is not None
        self._ranks.agree()
        if self._ranks.aborted:
            raise AbortRun
