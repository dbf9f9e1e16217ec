"""Held-out validation loss: sd-scripts' own loss on a folder of captioned images, without changing what is trained.

What a pass computes is sd-scripts v0.10.1's validation (``train_network.py`` l.1361-1598, PR #1903): every
held-out batch at 4 fixed timesteps (``np.linspace(min, max, 6)[1:-1]``: 200, 400, 600, 800), through
``NetworkTrainer.process_batch(is_train=False)``, after ``torch.manual_seed(seed)`` and ``random.seed(seed)``; the
figure is the mean of those losses.

Why not sd-scripts' in-run validation (a ``[[datasets]]`` block with ``validation_split = 1.0``): with it, a run
trains a different LoRA than the same run without it, before any validation pass (measured on the tiny model,
64 px, seed 11: the step-2 files differ by up to 0.11). Three causes, all in building that dataset:

- ``config_util.generate_dataset_group_by_blueprint`` runs every dataset's ``make_buckets``, which reseeds Python's
  ``random`` (``random.seed(self.seed + epoch)``, before ``set_seed``) and shuffles; the held-out dataset's runs last,
  so training starts from another Python random state, and the first batch's caption shuffle differs;
- ``split_train_val`` shuffles with the global ``random`` unless ``validation_seed`` is set (it also draws the
  bucket seed, ``random.randint``, after it);
- caching the held-out latents samples the VAE's latent distribution from torch's generator, so every noise and
  timestep of training after it differs;
- and the held-out block is also a (empty) training dataset, whose ``shuffle_buckets`` reseeds Python's ``random``
  at every epoch, after the real dataset's.

sd-scripts' own figure has a trap too: ``loss/validation/step_average`` is a running mean over every pass of the
first epoch (one ``LossRecorder`` for the run, which appends in epoch 0), and a mix of passes after it; only the
first pass's figure is that pass's. Here each pass's figure is its own (the same as sd-scripts' ``epoch_average``
for the same weights).

So the held-out dataset is built here, as sd-scripts builds a block held out whole (``validation_split = 1.0``,
split with the validation seed), with its dataset code and the run's arguments; its latents are cached under
``torch.manual_seed(seed)``; and every pass runs inside a block that puts Python's, NumPy's, torch's and the
training device's generators back as they were. Training draws exactly what it draws without validation (tested:
the LoRA is bit-identical to sd-scripts' command line without the held-out set), a file validated later
(:func:`validate_files`) gets the figure the run reported for it, and both equal sd-scripts' own figure for the same
weights (tested against its TensorBoard scalars, with latents not cached: cached held-out latents in sd-scripts come
from wherever training left torch's generator).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from .._config import TrainConfig, repeats_from_folder_name
from ._base_weights import merge_base_weights
from ._compat import vae_is_cast
from ._file_identity import checkpoint_identity
from ._lora_weights import load_lora_weights, lora_alphas
from ._process import DeviceGenerator, preserved_random_state

NUM_TIMESTEPS = 4  # sd-scripts' NUM_VALIDATION_TIMESTEPS (not configurable in v0.10.1)


@dataclasses.dataclass(frozen=True)
class ValidationSpec:
    """What to validate on: a folder of held-out images, the seed, how often, and how many batches per pass."""

    folder: Path
    class_tokens: str  # the caption of an image without a caption file (kohya's folder-name convention)
    seed: int
    every_n_steps: int | None  # None: at every saved file
    max_batches: int | None  # sd-scripts' max_validation_steps: None means the whole folder
    manifest: Path | None = None  # the run's validation manifest, a line per figure (None: not recorded)
    held_out: bool = True  # the config's own held-out images (False: another folder, e.g. class images)
    split: float = 1.0  # the fraction of ``folder`` held out (1: all of it; below 1: train_dir, split as sd-scripts)


def validation_spec(cfg: TrainConfig, folder: Path | None = None) -> ValidationSpec | None:
    """What ``cfg`` validates on (``folder`` instead of ``cfg.validation_dir`` when given); None: no validation."""
    split = 1.0
    if folder is None and cfg.validation_split:
        folder, split = cfg.train_dir, cfg.validation_split
    folder = folder or cfg.validation_dir
    if folder is None:
        return None
    parsed = repeats_from_folder_name(folder)
    return ValidationSpec(
        folder=folder,
        class_tokens=parsed[1] if parsed else folder.name,
        seed=cfg.seed if cfg.validation_seed is None else cfg.validation_seed,
        every_n_steps=cfg.validate_every_n_steps,
        max_batches=cfg.max_validation_steps,
        manifest=validation_manifest_path(cfg),
        held_out=folder == cfg.validation_dir or split < 1,
        split=split,
    )


def validation_manifest_path(cfg: TrainConfig) -> Path:
    """The run's validation manifest: one JSON line per figure (step, checkpoint, folder, loss, images, held_out),
    from the run's own passes and from later :func:`~spyke_lora.validation_loss` calls."""
    return cfg.output_dir / f"{cfg.output_name}.validation.jsonl"


def append_validation(
    manifest: Path, step: int, checkpoint: Path | None, folder: Path, loss: float, images: int, held_out: bool
) -> None:
    """One line in the validation manifest (``checkpoint`` by name when it is in the manifest's folder, and what
    identifies its content: :func:`~._file_identity.checkpoint_identity`)."""
    where = (
        None if checkpoint is None else (checkpoint.name if checkpoint.parent == manifest.parent else str(checkpoint))
    )
    record = {
        "step": step,
        "checkpoint": where,
        "folder": str(folder),
        "loss": loss,
        "images": images,
        "held_out": held_out,
        **checkpoint_identity(checkpoint),
    }
    with manifest.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


@dataclasses.dataclass
class BatchContext:
    """What ``process_batch`` needs besides the batch: the models, the scheduler and the strategies of the run."""

    trainer: Any
    text_encoders: Any
    unet: Any
    network: Any
    vae: Any
    noise_scheduler: Any
    vae_dtype: Any
    weight_dtype: Any
    accelerator: Any
    args: argparse.Namespace
    text_encoding_strategy: Any
    tokenize_strategy: Any
    train_text_encoder: bool
    train_unet: bool


def held_out_group(train_network: ModuleType, args: argparse.Namespace, spec: ValidationSpec) -> Any:
    """sd-scripts' dataset of the held-out images, with the run's arguments: a dataset block held out whole (or
    train_dir's held-out part), built as sd-scripts builds one: the images its seeded split gives, in that order.
    Python's ``random`` is moved by it: call it inside a block that puts it back."""
    config_util = train_network.config_util
    subset = {"image_dir": str(spec.folder), "num_repeats": 1, "class_tokens": spec.class_tokens}
    generator = config_util.BlueprintGenerator(config_util.ConfigSanitizer(True, True, args.masked_loss, True))
    block = {"validation_split": spec.split, "validation_seed": spec.seed, "subsets": [subset]}
    blueprint = generator.generate({"datasets": [block]}, args)
    _, group = config_util.generate_dataset_group_by_blueprint(blueprint.dataset_group)
    group.verify_bucket_reso_steps(64)
    return group


class HeldOut:
    """The held-out dataset of one run or one :func:`validate_files` call, built on first use."""

    def __init__(self, train_network: ModuleType, spec: ValidationSpec, generators: Sequence[DeviceGenerator]):
        self._train_network = train_network
        self.spec = spec
        self._generators = list(generators)
        self._loader: Any = None
        self.images = 0

    def loss(self, context: BatchContext) -> float:
        """One validation pass over the current weights: the mean of sd-scripts' validation losses."""
        import numpy as np
        import torch

        with preserved_random_state(self._generators):
            if self._loader is None:
                self._loader = self._build(context)
            args = argparse.Namespace(**vars(context.args))  # sd-scripts sets the timestep on args: on a copy here
            low = 0 if args.min_timestep is None else args.min_timestep
            high = (
                context.noise_scheduler.config.num_train_timesteps if args.max_timestep is None else args.max_timestep
            )
            timesteps = np.linspace(low, high, NUM_TIMESTEPS + 2, dtype=int)[1:-1]
            batches = len(self._loader)
            if self.spec.max_batches is not None:
                batches = min(batches, self.spec.max_batches)
            network = context.accelerator.unwrap_model(context.network)
            training = network.training
            losses: list[float] = []
            torch.manual_seed(self.spec.seed)  # sd-scripts' switch_rng_state
            random.seed(self.spec.seed)
            network.eval()
            try:
                for index, batch in enumerate(self._loader):
                    if index >= batches:
                        break
                    for timestep in timesteps:
                        context.trainer.on_step_start(
                            args,
                            context.accelerator,
                            context.network,
                            context.text_encoders,
                            context.unet,
                            batch,
                            context.weight_dtype,
                            is_train=False,
                        )
                        args.min_timestep = args.max_timestep = timestep
                        loss = context.trainer.process_batch(
                            batch,
                            context.text_encoders,
                            context.unet,
                            context.network,
                            context.vae,
                            context.noise_scheduler,
                            context.vae_dtype,
                            context.weight_dtype,
                            context.accelerator,
                            args,
                            context.text_encoding_strategy,
                            context.tokenize_strategy,
                            is_train=False,
                            train_text_encoder=context.train_text_encoder,
                            train_unet=context.train_unet,
                        )
                        losses.append(float(loss.detach().item()))
            finally:
                network.train(training)
        return sum(losses) / len(losses) if losses else float("nan")

    def _build(self, context: BatchContext) -> Any:
        """sd-scripts' dataset of the held-out folder, with the run's arguments, its latents cached when the run
        caches; a loader as sd-scripts' ``val_dataloader`` (in order, batch size 1 over the dataset's batches)."""
        from multiprocessing import Value

        import torch

        train_util = self._train_network.train_util
        args = context.args
        group = held_out_group(self._train_network, args, self.spec)
        self.images = group.num_train_images
        if args.cache_latents:
            vae = context.vae
            device = next(vae.parameters()).device
            vae.to(context.accelerator.device, dtype=context.vae_dtype)
            torch.manual_seed(self.spec.seed)  # the VAE's latent distribution is sampled: the same latents each time
            group.new_cache_latents(vae, context.accelerator)
            vae.to(device)
        group.set_current_strategies()
        collator = train_util.collator_class(Value("i", 0), Value("i", 0), group)
        return torch.utils.data.DataLoader(group, batch_size=1, shuffle=False, collate_fn=collator, num_workers=0)


def validate_files(
    train_network: ModuleType,
    args: argparse.Namespace,
    files: Sequence[Path | None],
    spec: ValidationSpec,
    generators: Sequence[DeviceGenerator],
    report: Callable[[Path | None, float, int], None],
) -> None:
    """The held-out loss of each LoRA file (None: the base model alone), reported as ``(file, loss, images)``.

    The base model is loaded once, as ``NetworkTrainer.train()`` loads it; the network is built from the first file
    (or from the arguments when only the base model is asked for) and applied once; each file's weights are then
    loaded into it, and the base model is the network at multiplier 0 (it adds exactly zero)."""
    import torch

    train_util = train_network.train_util
    strategy_base = train_network.strategy_base
    train_util.prepare_dataset_args(args, True)  # as train() does first: resolution as a pair, and the like
    trainer = train_network.NetworkTrainer()
    tokenize_strategy = trainer.get_tokenize_strategy(args)
    strategy_base.TokenizeStrategy.set_strategy(tokenize_strategy)
    strategy_base.LatentsCachingStrategy.set_strategy(trainer.get_latents_caching_strategy(args))
    accelerator = train_util.prepare_accelerator(args)
    weight_dtype, _ = train_util.prepare_dtype(args)
    vae_dtype = (torch.float32 if args.no_half_vae else weight_dtype) if vae_is_cast(trainer, args) else None
    _, text_encoder, vae, unet = trainer.load_target_model(args, weight_dtype, accelerator)
    module = importlib.import_module(args.network_module)
    merge_base_weights(args, module, (text_encoder, vae, unet), weight_dtype, accelerator)  # as train() does
    vae_dtype = vae.dtype if vae_dtype is None else vae_dtype
    vae.requires_grad_(False)
    vae.eval()
    if not args.cache_latents:
        vae.to(accelerator.device, dtype=vae_dtype)
    text_encoding_strategy = trainer.get_text_encoding_strategy(args)
    strategy_base.TextEncodingStrategy.set_strategy(text_encoding_strategy)
    device = accelerator.device
    for model in (text_encoder, unet):
        model.requires_grad_(False)
        model.eval()
        model.to(device, dtype=weight_dtype)
    first = next((f for f in files if f is not None), None)
    if first is not None:
        network, first_weights = module.create_network_from_weights(
            1.0, str(first), vae, text_encoder, unet, for_inference=False
        )
        reference = lora_alphas(first_weights)
    else:
        network = module.create_network(1.0, args.network_dim, args.network_alpha, vae, text_encoder, unet)
        reference = {}
    network.apply_to(text_encoder, unet, True, True)
    network.to(device, dtype=torch.float32)  # as in training: the LoRA in fp32, the model in the weight dtype
    context = BatchContext(
        trainer=trainer,
        text_encoders=[text_encoder],
        unet=unet,
        network=network,
        vae=vae,
        noise_scheduler=trainer.get_noise_scheduler(args, device),
        vae_dtype=vae_dtype,
        weight_dtype=weight_dtype,
        accelerator=accelerator,
        args=args,
        text_encoding_strategy=text_encoding_strategy,
        tokenize_strategy=tokenize_strategy,
        train_text_encoder=trainer.is_train_text_encoder(args),
        train_unet=True,
    )
    held_out = HeldOut(train_network, spec, generators)
    with torch.no_grad():
        for path in files:
            if path is None:
                network.set_multiplier(0.0)
            else:
                network.set_multiplier(1.0)
                if first is not None:
                    load_lora_weights(network, path, first, reference)
            report(path, held_out.loss(context), held_out.images)
