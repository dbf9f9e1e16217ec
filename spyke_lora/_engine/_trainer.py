"""The ``NetworkTrainer`` subclass: sd-scripts' own hook methods, each handing over to the run's parts.

sd-scripts' ``train()`` calls, and what each becomes (``train_network.py`` v0.10.1):

* ``get_tokenize_strategy``: the first hook after ``train()``'s ``setup_logging(reset=True)``: the caller's logging
  back, and a stop point before the model is loaded;
* ``post_process_network``: the network exists: the wrapped calls go in (:func:`~._hooks.install_hooks`), frozen
  models stay out of DDP on MULTI_CPU (``_ranks``), and a stop point before latents are cached;
* ``process_batch``: each micro-batch's stop point, learning rates and loss (:class:`~._probe.Probe`), and the models
  a held-out pass needs;
* ``sample_images``: before the loop (``TrainStarted``), after every step (``StepEnded``) and at every epoch end (a
  stop point). spyke-lora samples right after each file is saved instead (:class:`~._after_save.CheckpointSampler`),
  through sd-scripts' own ``sample_images`` with a copy of ``args`` that says "now".
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from types import ModuleType
from typing import Any

from ._after_save import AfterSave
from ._compat import require
from ._held_out import BatchContext
from ._hooks import AtomicState, GuardedSave, install_hooks
from ._probe import Probe
from ._process import DeviceGenerator
from ._ranks import frozen_models_unwrapped

__all__ = ["RunParts", "trainer_class"]


@dataclasses.dataclass
class RunParts:
    """The engine-side parts of one run that the trainer's hooks hand over to.

    Attributes:
        probe: The event stream and the stop points.
        after_save: The work after each saved file (validation, samples, manifests).
        resumed: Whether the run continues a saved state.
        generator: The training device's generator (MPS, CUDA), kept across sampling and saved with every state.
        state_record: Written into every state folder, to check a later resume against (None: no states).
        save: The guarded ``save_weights``, once the network exists.
        state: The atomic ``save_state``/``load_state``, once the network exists.
    """

    probe: Probe
    after_save: AfterSave
    resumed: bool = False
    generator: DeviceGenerator | None = None
    state_record: dict[str, Any] | None = None
    save: GuardedSave | None = None
    state: AtomicState | None = None

    @property
    def saved(self) -> list[Path]:
        """Every LoRA file this run wrote, in order."""
        return self.save.saved if self.save is not None else []

    def written(self, path: Path) -> Path | None:
        """``path`` when this run wrote it (from finite weights), else None."""
        return self.save.written(path) if self.save is not None else None


class _Hooks:
    """sd-scripts' hook methods as spyke-lora overrides them (mixed into the engine's own ``NetworkTrainer``)."""

    _train_code: Any = None  # NetworkTrainer.train.__code__ of the engine module this class was made for
    _train_util: Any = None  # that module's library.train_util

    def __init__(self, parts: RunParts) -> None:
        super().__init__()
        self._parts = parts
        self._probe = parts.probe

    def get_tokenize_strategy(self, args):
        self._probe.restore_logging()
        self._probe.raise_if_stopping()  # a stop asked for already: end before loading the model
        return super().get_tokenize_strategy(args)

    def post_process_network(self, args, accelerator, network, text_encoders, unet):
        super().post_process_network(args, accelerator, network, text_encoders, unet)
        self._probe.restore_logging()
        parts = self._parts
        parts.save, parts.state = install_hooks(
            network,
            accelerator,
            self._probe,
            final_name=self._final_name(args),
            train_code=self._train_code,
            after_save=parts.after_save,
            resumed=parts.resumed,
            generator=parts.generator,
            state_record=parts.state_record,
        )
        self._probe.learning_rates.know_network(network)
        # before the U-Net and text encoders go through accelerator.prepare (l.880-887): on MULTI_CPU, frozen
        # models stay out of DDP (see _ranks); nothing changes with one process or on CUDA
        frozen_models_unwrapped(accelerator)
        self._probe.raise_if_stopping()  # the model is loaded: end before caching latents and training

    def process_batch(
        self,
        batch,
        text_encoders,
        unet,
        network,
        vae,
        noise_scheduler,
        vae_dtype,
        weight_dtype,
        accelerator,
        args,
        text_encoding_strategy,
        tokenize_strategy,
        is_train=True,
        train_text_encoder=True,
        train_unet=True,
    ):
        models = (text_encoders, unet, network, vae, noise_scheduler, vae_dtype, weight_dtype, accelerator, args)
        strategies = (text_encoding_strategy, tokenize_strategy)
        if is_train:
            self._probe.before_micro_batch(accelerator)
            held_out = self._parts.after_save.held_out
            if held_out is not None:
                held_out.batch_context = BatchContext(self, *models, *strategies, train_text_encoder, train_unet)
        loss = super().process_batch(
            batch,
            *models,
            *strategies,
            is_train=is_train,
            train_text_encoder=train_text_encoder,
            train_unet=train_unet,
        )
        if is_train:
            self._probe.after_micro_batch(loss)
        return loss

    def sample_images(self, accelerator, args, epoch, global_step, device, vae, tokenizers, text_encoder, unet):
        sampler = self._parts.after_save.sampler
        if sampler is not None:
            sampler.sampler = self._sampler(accelerator, args, device, vae, tokenizers, text_encoder, unet)
        if epoch is None:
            self._probe.step_ends(global_step)
        elif epoch == 0 and not self._probe.started:
            self._probe.training_starts(args, accelerator)
            if args.sample_at_first and not self._probe.first_step and sampler is not None:
                sampler.sample(0, None)
        else:
            self._probe.raise_if_stopping()

    def _sampler(self, accelerator, args, device, vae, tokenizers, text_encoder, unet):
        """sd-scripts' own ``sample_images`` on the current weights, told to sample now, at ``step``."""

        def sample_now(step: int) -> None:
            now = argparse.Namespace(**vars(args))
            now.sample_every_n_steps, now.sample_every_n_epochs, now.sample_at_first = 1, None, True
            super(_Hooks, self).sample_images(accelerator, now, None, step, device, vae, tokenizers, text_encoder, unet)

        return sample_now

    def _final_name(self, args) -> str:
        """The run's final file name, as sd-scripts' saving names it (``NAME.safetensors``)."""
        return self._train_util.get_last_ckpt_name(args, "." + args.save_model_as)


_TRAINER_CLASSES: dict[int, type] = {}


def trainer_class(train_network: ModuleType) -> type:
    """A ``NetworkTrainer`` subclass whose hooks hand over to a :class:`RunParts` (one class per engine module).

    Raises:
        EngineError: This sd-scripts lacks a method spyke-lora overrides or calls (``_compat.NEEDS``).
    """
    key = id(train_network)
    if key in _TRAINER_CLASSES:
        return _TRAINER_CLASSES[key]
    require(train_network, ("train",))  # the hooks overridden here, and what a stop's save calls
    attributes = {"_train_code": train_network.NetworkTrainer.train.__code__, "_train_util": train_network.train_util}
    made = type("SpykeTrainer", (_Hooks, train_network.NetworkTrainer), attributes)
    _TRAINER_CLASSES[key] = made
    return made
