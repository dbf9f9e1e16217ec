"""Sampling LoRA files that are already on disk, with the same sd-scripts sampler a training run uses.

The base model is loaded once, the way ``NetworkTrainer.train()`` loads it (``load_target_model``, sdpa attention),
and ``extra_args.base_weights`` are merged into it as ``train()`` merges them; the LoRA network is built from the
first file with the module's own ``create_network_from_weights`` and applied once; every file's weights are then
loaded into it in turn and sampled through ``NetworkTrainer.sample_images``. So a
file sampled here gives the images the training run made for it (tested: bit-identical on CPU).
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from ._after_save import CheckpointSampler
from ._base_weights import merge_base_weights
from ._lora_weights import load_lora_weights, lora_alphas


def sample_files(
    train_network: ModuleType,
    args: argparse.Namespace,
    files: Sequence[tuple[int, Path]],
    sampler: CheckpointSampler,
    *,
    base_first: bool,
    base_only: bool = False,
) -> None:
    """Sample each ``(step, file)`` with ``sampler``'s spec; ``base_first``: the base model alone first (step 0);
    ``base_only``: the base model alone and no file (the files give the network's shape only)."""
    import torch

    train_util = train_network.train_util
    trainer = train_network.NetworkTrainer()
    accelerator = train_util.prepare_accelerator(args)
    weight_dtype, _ = train_util.prepare_dtype(args)
    _, text_encoder, vae, unet = trainer.load_target_model(args, weight_dtype, accelerator)
    module = importlib.import_module(args.network_module)
    merge_base_weights(args, module, (text_encoder, vae, unet), weight_dtype, accelerator)  # as train() does
    tokenizers = trainer.get_tokenizers(trainer.get_tokenize_strategy(args))
    device = accelerator.device
    for model in (text_encoder, unet):
        model.requires_grad_(False)
        model.eval()
        model.to(device, dtype=weight_dtype)
    vae.requires_grad_(False)
    vae.eval()
    vae.to(dtype=torch.float32 if args.no_half_vae else weight_dtype)  # the sampler moves it to the device

    def sample_now(step: int) -> None:
        now = argparse.Namespace(**vars(args))
        now.sample_every_n_steps, now.sample_every_n_epochs, now.sample_at_first = 1, None, True
        trainer.sample_images(accelerator, now, None, step, device, vae, tokenizers, text_encoder, unet)

    sampler.sampler = sample_now
    network, first_weights = module.create_network_from_weights(
        1.0, str(files[0][1]), vae, text_encoder, unet, for_inference=False
    )
    network.apply_to(text_encoder, unet, True, True)
    network.to(device, dtype=torch.float32)  # as in training: the LoRA in fp32, the model in the weight dtype
    reference = lora_alphas(first_weights)
    with torch.no_grad():
        if base_first or base_only:
            network.set_multiplier(0.0)  # adds exactly zero: the base model's own images
            sampler.sample(0, None)
            network.set_multiplier(1.0)
        for step, path in [] if base_only else files:
            load_lora_weights(network, path, files[0][1], reference)
            sampler.sample(step, path)
