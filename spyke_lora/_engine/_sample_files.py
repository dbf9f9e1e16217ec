"""Sampling LoRA files that are already on disk, with the same sd-scripts sampler a training run uses.

The base model is loaded once, the way ``NetworkTrainer.train()`` loads it (``load_target_model``, sdpa attention);
the LoRA network is built from the first file with the module's own ``create_network_from_weights`` and applied
once; every file's weights are then loaded into it in turn and sampled through ``NetworkTrainer.sample_images``. So a
file sampled here gives the images the training run made for it (tested: bit-identical on CPU).
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from .._errors import ConfigError
from ._trainer import Probe


def sample_files(train_network: ModuleType, args: argparse.Namespace, files: Sequence[tuple[int, Path]],
                 probe: Probe, *, base_first: bool) -> None:  # fmt: skip
    """Sample each ``(step, file)`` with ``probe.samples``; ``base_first``: the base model alone first (step 0)."""
    import torch

    train_util = train_network.train_util
    trainer = train_network.NetworkTrainer()
    accelerator = train_util.prepare_accelerator(args)
    weight_dtype, _ = train_util.prepare_dtype(args)
    _, text_encoder, vae, unet = trainer.load_target_model(args, weight_dtype, accelerator)
    tokenizers = trainer.get_tokenizers(trainer.get_tokenize_strategy(args))
    device = accelerator.device
    for model in (text_encoder, unet):
        model.requires_grad_(False)
        model.eval()
        model.to(device, dtype=weight_dtype)
    vae.requires_grad_(False)
    vae.eval()
    vae.to(dtype=torch.float32 if args.no_half_vae else weight_dtype)  # the sampler moves it to the device

    def sampler(step: int) -> None:
        now = argparse.Namespace(**vars(args))
        now.sample_every_n_steps, now.sample_every_n_epochs, now.sample_at_first = 1, None, True
        trainer.sample_images(accelerator, now, None, step, device, vae, tokenizers, text_encoder, unet)

    probe.sampler = sampler
    module = importlib.import_module(args.network_module)
    network, first_weights = module.create_network_from_weights(
        1.0, str(files[0][1]), vae, text_encoder, unet, for_inference=False
    )
    network.apply_to(text_encoder, unet, True, True)
    network.to(device, dtype=torch.float32)  # as in training: the LoRA in fp32, the model in the weight dtype
    reference = _alphas(first_weights)
    with torch.no_grad():
        if base_first:
            network.set_multiplier(0.0)  # adds exactly zero: the base model's own images
            probe.sample(0, None)
            network.set_multiplier(1.0)
        for step, path in files:
            _load_into(network, path, files[0][1], reference)
            probe.sample(step, path)


def _alphas(weights: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in weights.items() if k.endswith(".alpha")}


def _load_into(network: Any, path: Path, first: Path, reference: dict[str, float]) -> None:
    from safetensors.torch import load_file

    weights = load_file(str(path))
    try:
        info = network.load_state_dict(weights, strict=False)
    except RuntimeError as e:  # a tensor of another shape: another rank
        raise ConfigError(
            f"{path} does not have the layout of {first.name} ({str(e).splitlines()[-1].strip()}); sample files of "
            f"different networks in separate calls"
        ) from None
    different = [k for k, v in _alphas(weights).items() if reference.get(k) != v]
    if info.missing_keys or info.unexpected_keys or different:
        raise ConfigError(
            f"{path} does not have the layout of {first.name} (other modules, rank or alpha: "
            f"{len(info.missing_keys)} missing, {len(info.unexpected_keys)} unexpected, {len(different)} alphas "
            f"differ); sample files of different networks in separate calls"
        )
