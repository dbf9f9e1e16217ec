"""``extra_args.base_weights``: LoRA files merged into the base model before training, as sd-scripts' ``train()``
merges them, so validating or sampling files on disk starts from the base model the run trained on.

``NetworkTrainer.train()`` merges them inline (``train_network.py`` l.646-661, no function to call): for each file,
``create_network_from_weights(multiplier, path, vae, text_encoder, unet, for_inference=True)`` then
``merge_to(text_encoder, unet, weights, weight_dtype, device)``, the multiplier from ``base_weights_multiplier``
(1.0 where it has no entry), on the CPU unless ``lowram``. :func:`merge_base_weights` does those same calls, in
that order, after the base model is loaded and before the LoRA network is applied, as ``train()`` does.
"""

from __future__ import annotations

import argparse
from types import ModuleType
from typing import Any

__all__ = ["merge_base_weights"]


def merge_base_weights(
    args: argparse.Namespace,
    network_module: ModuleType,
    models: tuple[Any, Any, Any],
    weight_dtype: Any,
    accelerator: Any,
) -> list[tuple[str, float]]:
    """Merge ``args.base_weights`` into the loaded models as ``train()`` does.

    Args:
        args: sd-scripts' parsed arguments (``base_weights``, ``base_weights_multiplier``, ``lowram``).
        network_module: The run's ``network_module``, imported.
        models: ``(text_encoder, vae, unet)`` as ``load_target_model`` returned them, not yet moved to the device.
        weight_dtype: The run's weight dtype.
        accelerator: The run's accelerator (its device is used with ``lowram``).

    Returns:
        ``(file, multiplier)`` of each file merged, in order ([] without ``base_weights``).
    """
    text_encoder, vae, unet = models
    merged = []
    for i, path in enumerate(getattr(args, "base_weights", None) or ()):
        multipliers = getattr(args, "base_weights_multiplier", None)
        multiplier = 1.0 if multipliers is None or len(multipliers) <= i else multipliers[i]
        module, weights = network_module.create_network_from_weights(
            multiplier, path, vae, text_encoder, unet, for_inference=True
        )
        device = accelerator.device if getattr(args, "lowram", False) else "cpu"
        module.merge_to(text_encoder, unet, weights, weight_dtype, device)
        merged.append((str(path), float(multiplier)))
    return merged
