"""Running sd-scripts' ``NetworkTrainer`` in this process, observed through its own hook methods.

Where each event comes from (sd-scripts v0.10.1, ``train_network.py``):

* ``TrainStarted``: the ``sample_images(epoch=0)`` call made once before the training loop, when
  ``args.max_train_steps`` is final.
* ``StepEnded``: the ``sample_images(epoch=None)`` call made after every optimizer step; the loss is what
  ``process_batch`` returned for the step's micro-batches, the learning rates are read from the optimizer just
  before the step.
* ``CheckpointSaved``: a wrapper around ``network.save_weights`` installed in ``post_process_network``, so every
  file sd-scripts saves is seen after it is written.

A stop is a private ``BaseException`` raised at a safe point (right after a step, or before the next batch or
epoch); :func:`._frames.finish_after_stop` then runs the end of sd-scripts' ``train()`` itself, with the
``save_model`` closure and metadata of the interrupted ``train()`` frame, so the final file is written by sd-scripts'
own saving code.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType, ModuleType
from typing import Any

from .._errors import EngineError, TrainingError
from .._files import atomic_path
from ..events import CheckpointSaved, Event, SampleSaved, StepEnded, TrainStarted, ValidationEnded
from ._frames import set_frame_local
from ._held_out import BatchContext, HeldOut, append_validation
from ._process import DeviceGenerator, generators_preserved
from ._ranks import AbortRun, RankSync, alone_on_this_rank, frozen_models_unwrapped
from ._state import DEVICE_RNG_NAME, RECORD_NAME, SavedState, partial_state_dir, replace_state_dir


class StopRun(BaseException):
    """Raised inside sd-scripts' loop to end the run after the current step (never escapes the engine)."""


class NonFiniteStop(BaseException):
    """Raised inside sd-scripts' loop when the loss has been NaN/Inf too long: end now, save nothing."""


@dataclasses.dataclass(frozen=True)
class SampleSpec:
    """What sd-scripts' prompt file asks for, line by line, and where the images and their manifest go."""

    lines: tuple[tuple[str, float], ...]  # (prompt, CFG scale) of each line of the prompt file
    seed: int
    output_name: str
    folder: Path  # sd-scripts writes OUTPUT_DIR/sample/NAME_STEP_LINE_TIMESTAMP_SEED.png
    manifest: Path  # OUTPUT_DIR/NAME.samples.jsonl: one JSON line per image


class Probe:
    """Engine-side state of one run: turns hook calls into events and raises :class:`StopRun` at safe points."""

    def __init__(
        self,
        emit: Callable[[Event], None],
        stop_requested: Callable[[], bool],
        started_at: float,
        restore_logging: Callable[[], None],
        max_nonfinite_steps: int = 1,
        resume: SavedState | None = None,
        state_record: dict[str, Any] | None = None,
        samples: SampleSpec | None = None,
        generator: DeviceGenerator | None = None,
        memory: Callable[[], int | None] = lambda: None,
        device_name: str = "",
        held_out: HeldOut | None = None,
        ranks: RankSync | None = None,
    ) -> None:
        self._emit_to_callbacks = emit
        self.ranks = ranks  # a multi-process run: what every rank agrees on (None: one process)
        # the training device's generator (MPS, CUDA): kept as it was across sampling, and saved with every state
        self.generator = generator
        self._memory = memory  # bytes in use on the training device now (StepEnded.memory_bytes)
        self.device_name = device_name  # e.g. "Apple M1 Pro", "NVIDIA H100 80GB HBM3" (TrainStarted.device_name)
        self.resume = resume  # the state this run continues; its step is corrected into train() (see attach)
        self.first_step = resume.step if resume else 0
        self._state_record = state_record  # written into every state folder, to check a later resume against
        self.samples = samples  # what to sample at every saved file (None: no sampling)
        self.sampler: Callable[[int], None] | None = None  # runs sd-scripts' sampler on the current weights
        self._sampled_steps: set[int] = set()
        self.held_out = held_out  # the held-out images to validate on (None: no validation)
        self.batch_context: BatchContext | None = None  # the last training batch's models and strategies
        self._validated_steps: set[int] = set()
        self.max_nonfinite_steps = max_nonfinite_steps  # 0: never stop
        self.nonfinite_streak = 0  # consecutive steps with a NaN/Inf loss: no file is saved during one
        self.last_loss = float("nan")
        self.saved: list[Path] = []
        # Ctrl-C: asked for by the SIGINT handler (first press), or raised by a callback; both at a step boundary
        self.interrupt_requested = False
        self.interrupted_at_boundary = False
        # sd-scripts re-installs its root handler at the start of train() and whenever one of its modules is
        # imported lazily; the caller's logging configuration is put back at every hook.
        self.restore_logging = restore_logging
        self.callback_error: BaseException | None = None  # an exception a callback raised: passed on unchanged
        self._stop_requested = stop_requested
        self._started_at = started_at
        self.total_steps = 0
        self.steps_done = self.first_step
        self.epoch = 0  # 1-based, read from train()'s loop at the network's on_epoch_start
        self.started = False
        # sd-scripts' running average ("avr_loss", its LossRecorder) is the mean loss of the last epoch's worth of
        # batches: each batch replaces the one at its position in the previous epoch. A window of that length is the
        # same mean, and stays right when a resumed run starts mid-epoch.
        self._recent_losses: collections.deque[float] = collections.deque()
        self._micro_losses: list[Any] = []  # detached loss tensors of the current optimizer step
        self._lrs: tuple[float, float | None] = (0.0, None)
        self._unet_param_ids: frozenset[int] = frozenset()
        self._last_ckpt_name = ""
        self._train_code: Any = None  # NetworkTrainer.train.__code__, set by the trainer class
        self.states: list[Path] = []  # state folders written by this run

    def _emit(self, event: Event) -> None:
        self.restore_logging()
        try:
            self._emit_to_callbacks(event)
        except KeyboardInterrupt:
            self.interrupted_at_boundary = True  # raised between steps: the weights are a completed step's
            raise
        except BaseException as e:  # SystemExit included: the caller's, passed on as itself
            self.callback_error = e
            raise

    # --- called from the trainer hooks ------------------------------------------------------------------------------
    def attach(self, train_util: ModuleType, args: Any, network: Any, accelerator: Any) -> None:
        """Wrap the network's ``save_weights``/``on_epoch_start`` and accelerate's ``save_state``/``load_state``
        (from ``post_process_network``, once the network exists)."""
        self.restore_logging()
        self._last_ckpt_name = train_util.get_last_ckpt_name(args, "." + args.save_model_as)
        self._unet_param_ids = frozenset(
            id(p) for lora in getattr(network, "unet_loras", None) or () for p in lora.parameters()
        )
        original_save = network.save_weights
        original_epoch_start = network.on_epoch_start
        original_save_state = accelerator.save_state
        original_load_state = accelerator.load_state

        def save_weights(file: str, dtype: Any, metadata: Any) -> None:
            path = Path(file)
            if self.nonfinite_streak:
                return  # the weights after a NaN/Inf loss are not worth a file
            try:  # written whole under a temporary name, then renamed: never a truncated file under `path`
                with atomic_path(path, keep_suffix=True) as partial:  # sd-scripts picks the format by extension
                    original_save(str(partial), dtype, metadata)
            except OSError as e:  # a full disk, a vanished folder: stop with the files written so far intact
                kept = ", ".join(p.name for p in self.saved) or "none"
                size = self.saved[-1].stat().st_size / 1e6 if self.saved and self.saved[-1].exists() else 75
                raise TrainingError(
                    f"could not write {path} at step {self.steps_done}: {e}; the run was stopped. Files written "
                    f"before are intact: {kept}. Free some space (each file is about {size:.0f} MB) and run again"
                ) from e
            self.saved.append(path)
            final = path.name == self._last_ckpt_name
            self._emit(CheckpointSaved(self.steps_done, self.epoch, path, final))
            if self.held_out is not None and (final or self.held_out.spec.every_n_steps is None):
                self.validate(self.steps_done, path)
            # a Stop asked for here takes effect at the next safe point, after sd-scripts' bookkeeping
            if self.steps_done not in self._sampled_steps and not self.interrupt_requested:
                self.sample(self.steps_done, path)

        def on_epoch_start(*a: Any, **kw: Any) -> Any:
            self.raise_if_stopping()
            frame = sys._getframe(1)  # train(), in its epoch loop: `for epoch in range(epoch_to_start, ...)`
            if frame.f_code is not self._train_code or "epoch" not in frame.f_locals:
                raise EngineError("the network's on_epoch_start was not called from NetworkTrainer.train()")
            if self.epoch == 0:
                batches = len(frame.f_locals["train_dataloader"])
                self._recent_losses = collections.deque(maxlen=max(1, batches))
                if self.resume is not None:
                    self._correct_resumed_step(frame)
            self.epoch = int(frame.f_locals["epoch"]) + 1
            return original_epoch_start(*a, **kw)

        def save_state(output_dir: str, *a: Any, **kw: Any) -> Any:
            # written whole under a temporary name, then renamed: a kill leaves the previous state or the new one
            final = Path(output_dir)
            partial = partial_state_dir(final)
            try:
                result = original_save_state(str(partial), *a, **kw)
                if self.generator is not None and self.generator.device == "mps":  # accelerate saves no MPS state
                    import torch

                    torch.save(self.generator.get_state(), partial / DEVICE_RNG_NAME)
                if self._state_record is not None:
                    record = dict(self._state_record, step=self.steps_done, epoch=self.epoch)
                    (partial / RECORD_NAME).write_text(json.dumps(record, indent=1), encoding="utf-8")
                replace_state_dir(partial, final)
            except OSError as e:
                raise TrainingError(
                    f"could not write the training state {final} at step {self.steps_done}: {e}; the run was "
                    f"stopped. Files written before are intact. Free some space and run again"
                ) from e
            finally:
                if partial.exists():
                    shutil.rmtree(partial, ignore_errors=True)
            self.states.append(final)
            return result

        def load_state(input_dir: str, *a: Any, **kw: Any) -> Any:
            result = original_load_state(input_dir, *a, **kw)  # the CPU and CUDA generators, among the rest
            saved = Path(input_dir) / DEVICE_RNG_NAME
            if self.generator is not None and self.generator.device == "mps" and saved.is_file():
                import torch

                self.generator.set_state(torch.load(saved, weights_only=True))
            return result

        network.save_weights = save_weights
        network.on_epoch_start = on_epoch_start
        accelerator.save_state = save_state
        accelerator.load_state = load_state

    def sample(self, step: int, checkpoint: Path | None) -> None:
        """Sample the current weights (those saved as ``checkpoint``) with every prompt x CFG scale, with sd-scripts'
        own sampler; one :class:`SampleSaved` per image, and a line in the run's samples manifest."""
        if self.samples is None or self.sampler is None:
            return
        self._sampled_steps.add(step)
        folder = self.samples.folder
        before = set(os.listdir(folder)) if folder.is_dir() else set()
        # sd-scripts' sampler seeds with torch.manual_seed (every generator) and puts back the CPU and CUDA ones
        # only: the training device's is kept here, so training after a sample draws the noise it would have drawn
        with generators_preserved([self.generator] if self.generator is not None else []), (
            alone_on_this_rank()
        ):
            self.sampler(step)
        prefix = f"{self.samples.output_name}_{step:06d}_"
        made = sorted(p for p in folder.iterdir() if p.name not in before and p.name.startswith(prefix))
        for path in made:
            line = int(path.name[len(prefix) :].split("_", 1)[0])
            prompt, scale = self.samples.lines[line]
            record = {"step": step, "prompt": prompt, "cfg_scale": scale, "seed": self.samples.seed,
                      "path": os.path.relpath(path, self.samples.manifest.parent),
                      "checkpoint": _relative(checkpoint, self.samples.manifest.parent)}  # fmt: skip
            with self.samples.manifest.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            self._emit(SampleSaved(step, prompt, scale, self.samples.seed, path, checkpoint))

    def validate(self, step: int, checkpoint: Path | None = None) -> None:
        """One validation pass over the current weights (once per step, those saved as ``checkpoint`` when given):
        a line in the validation manifest, and :class:`ValidationEnded`."""
        if self.held_out is None or self.batch_context is None or step in self._validated_steps:
            return
        self._validated_steps.add(step)
        with alone_on_this_rank():  # rank 0's own pass (a multi-process run); nothing changes with one process
            loss = self.held_out.loss(self.batch_context)
        spec = self.held_out.spec
        if spec.manifest is not None:
            append_validation(spec.manifest, step, checkpoint, spec.folder, loss, self.held_out.images, True)
        average = sum(self._recent_losses) / len(self._recent_losses) if self._recent_losses else self.last_loss
        self._emit(ValidationEnded(step=step, epoch=self.epoch, loss=loss, divergence=loss - average))

    def training_starts(self, args: Any, accelerator: Any) -> None:
        """Deliver :class:`TrainStarted` (from the ``sample_images(epoch=0)`` call before the loop)."""
        self.started = True
        self.total_steps = int(args.max_train_steps)
        self._emit(
            TrainStarted(
                total_steps=self.total_steps,
                device=accelerator.device.type,
                mixed_precision=str(accelerator.mixed_precision),
                output_dir=Path(args.output_dir),
                resumed_from_step=self.first_step,
                device_name=self.device_name,
                gradient_checkpointing=bool(args.gradient_checkpointing),
                processes=int(accelerator.num_processes),
            )
        )
        if self.ranks is not None:
            self.ranks.device = accelerator.device
            self._agree()
        self.raise_if_stopping()

    def before_micro_batch(self, accelerator: Any) -> None:
        self.raise_if_stopping()
        optimizers = getattr(accelerator, "_optimizers", None)
        if optimizers:
            self._lrs = self._read_lrs(optimizers[0].param_groups)

    def after_micro_batch(self, loss: Any) -> None:
        self._micro_losses.append(loss.detach())

    def step_ends(self, global_step: int) -> None:
        """Deliver :class:`StepEnded`, then end the run on a NaN/Inf streak or a requested stop."""
        losses = [float(t.item()) for t in self._micro_losses]
        self._micro_losses.clear()
        loss = sum(losses) / len(losses) if losses else float("nan")
        if self.ranks is not None:  # the effective batch's loss: every rank's step, averaged (NaN on any: NaN)
            loss = self.ranks.mean(loss)
            losses = [loss]
        self._recent_losses.extend(losses)
        self.steps_done = global_step
        self.last_loss = loss
        self.nonfinite_streak = 0 if math.isfinite(loss) else self.nonfinite_streak + 1
        self._emit(
            StepEnded(
                step=global_step,
                total_steps=self.total_steps,
                epoch=self.epoch,
                loss=loss,
                avg_loss=sum(self._recent_losses) / len(self._recent_losses) if self._recent_losses else loss,
                lr=self._lrs[0],
                lr_text_encoder=self._lrs[1],
                elapsed_s=time.perf_counter() - self._started_at,
                memory_bytes=self._memory(),
            )
        )  # delivered for the bad step too, so a notebook shows it
        if self.max_nonfinite_steps and self.nonfinite_streak >= self.max_nonfinite_steps:
            raise NonFiniteStop
        every = self.held_out.spec.every_n_steps if self.held_out is not None else None
        if every and global_step % every == 0 and not self.nonfinite_streak:
            self.validate(global_step)
        if self.ranks is not None:
            self._agree()
        self.raise_if_stopping()

    def _agree(self) -> None:
        """Every rank takes the caller's answer at the same step (a multi-process run)."""
        assert self.ranks is not None
        self.ranks.agree()
        if self.ranks.aborted:
            raise AbortRun

    def _correct_resumed_step(self, frame: FrameType) -> None:
        """sd-scripts v0.10.1 resumes with ``global_step`` set to the steps done *within* the resumed epoch, not in
        the run (``global_step = initial_step`` after subtracting the skipped epochs, l.1344; kohya-ss/sd-scripts
        #1999, #1406), so step numbers, checkpoint names and the end of the run would be wrong after an epoch
        boundary. The first ``on_epoch_start`` of a resumed run runs after that line and before the first step:
        the right value is put into train()'s local there."""
        set_frame_local(frame, "global_step", self.first_step)
        if int(frame.f_locals["global_step"]) != self.first_step:
            raise EngineError(
                f"could not continue the step count at {self.first_step} on Python {sys.version.split()[0]}; "
                "resuming is not possible on this Python"
            )

    def written(self, path: Path) -> Path | None:
        """``path`` when this run wrote it (from finite weights), else None: a save is skipped during a NaN/Inf
        streak, and an older file of that name (``overwrite = true``) is not this run's."""
        return path if path in self.saved else None

    def raise_if_stopping(self) -> None:
        """At a safe point: KeyboardInterrupt after a first Ctrl-C, :class:`StopRun` when a stop was asked for."""
        if self.interrupt_requested:
            self.interrupted_at_boundary = True
            raise KeyboardInterrupt
        if self._stop_requested():
            raise StopRun

    def _read_lrs(self, groups: list[dict[str, Any]]) -> tuple[float, float | None]:
        """(U-Net lr, text-encoder lr or None), the param groups told apart by the U-Net LoRA parameters' ids."""
        unet = [g["lr"] for g in groups if g["params"] and id(g["params"][0]) in self._unet_param_ids]
        text = [g["lr"] for g in groups if g["params"] and id(g["params"][0]) not in self._unet_param_ids]
        if not self._unet_param_ids:  # a network module without unet_loras: report the last group
            return float(groups[-1]["lr"]), None
        return float(unet[0]) if unet else 0.0, float(text[0]) if text else None


def _relative(path: Path | None, folder: Path) -> str | None:
    """A file name when ``path`` is in ``folder`` (a run's own checkpoint), else the absolute path."""
    if path is None:
        return None
    return path.name if path.parent == folder else str(path)


_TRAINER_CLASSES: dict[int, type] = {}
_HOOKS = ("get_tokenize_strategy", "post_process_network", "process_batch", "sample_images", "train")


def trainer_class(train_network: ModuleType) -> type:
    """A ``NetworkTrainer`` subclass that reports to a :class:`Probe` (one class per engine module)."""
    key = id(train_network)
    if key in _TRAINER_CLASSES:
        return _TRAINER_CLASSES[key]
    missing = [name for name in _HOOKS if not hasattr(train_network.NetworkTrainer, name)]
    if missing:
        raise EngineError(
            f"this sd-scripts ({train_network.__file__}) has no NetworkTrainer.{', '.join(missing)}: it is not a "
            f"version spyke-lora can drive; use the vendored v0.10.1 (unset $SPYKE_LORA_SD_SCRIPTS / sd_scripts_dir)"
        )
    train_util = train_network.train_util

    class SpykeTrainer(train_network.NetworkTrainer):  # type: ignore[name-defined,misc]
        def __init__(self, probe: Probe) -> None:
            super().__init__()
            self._probe = probe

        def get_tokenize_strategy(self, args):  # the first hook after train()'s setup_logging(reset=True)
            self._probe.restore_logging()
            self._probe.raise_if_stopping()  # a stop asked for already: end before loading the model
            return super().get_tokenize_strategy(args)

        def post_process_network(self, args, accelerator, network, text_encoders, unet):
            super().post_process_network(args, accelerator, network, text_encoders, unet)
            self._probe._train_code = train_network.NetworkTrainer.train.__code__
            self._probe.attach(train_util, args, network, accelerator)
            # before the U-Net and text encoders go through accelerator.prepare (l.880-887): on MULTI_CPU, frozen
            # models stay out of DDP (see _ranks); nothing changes with one process or on CUDA
            frozen_models_unwrapped(accelerator)
            self._probe.raise_if_stopping()  # the model is loaded: end before caching latents and training

        def process_batch(self, batch, text_encoders, unet, network, vae, noise_scheduler, vae_dtype, weight_dtype,
                          accelerator, args, text_encoding_strategy, tokenize_strategy, is_train=True,
                          train_text_encoder=True, train_unet=True):  # fmt: skip
            if is_train:
                self._probe.before_micro_batch(accelerator)
                self._probe.batch_context = BatchContext(
                    self, text_encoders, unet, network, vae, noise_scheduler, vae_dtype, weight_dtype, accelerator,
                    args, text_encoding_strategy, tokenize_strategy, train_text_encoder, train_unet,
                )  # fmt: skip
            loss = super().process_batch(
                batch, text_encoders, unet, network, vae, noise_scheduler, vae_dtype, weight_dtype, accelerator,
                args, text_encoding_strategy, tokenize_strategy, is_train=is_train,
                train_text_encoder=train_text_encoder, train_unet=train_unet,
            )  # fmt: skip
            if is_train:
                self._probe.after_micro_batch(loss)
            return loss

        def sample_images(self, accelerator, args, epoch, global_step, device, vae, tokenizers, text_encoder, unet):
            # sd-scripts calls this before the first step (epoch 0), after every step (epoch None) and at every
            # epoch end. spyke-lora samples right after each file is saved instead (Probe.sample), through
            # sd-scripts' own sample_images with a copy of args that says "now".
            def sampler(step: int) -> None:
                now = argparse.Namespace(**vars(args))
                now.sample_every_n_steps, now.sample_every_n_epochs, now.sample_at_first = 1, None, True
                super(SpykeTrainer, self).sample_images(
                    accelerator, now, None, step, device, vae, tokenizers, text_encoder, unet
                )

            self._probe.sampler = sampler
            if epoch is None:
                self._probe.step_ends(global_step)
            elif epoch == 0 and not self._probe.started:
                self._probe.training_starts(args, accelerator)
                if args.sample_at_first and not self._probe.first_step:
                    self._probe.sample(0, None)
            else:
                self._probe.raise_if_stopping()

    _TRAINER_CLASSES[key] = SpykeTrainer
    return SpykeTrainer
