"""A LoRA file's weights loaded into a network built from another file of the same layout: what sampling files on
disk (``_sample_files``) and validating them (``_held_out``) share, so one network serves every file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .._errors import ConfigError

__all__ = ["load_lora_weights", "lora_alphas"]


def lora_alphas(weights: dict[str, Any]) -> dict[str, float]:
    """The ``alpha`` of every LoRA module in ``weights`` (a LoRA file's tensors), as floats."""
    return {k: float(v) for k, v in weights.items() if k.endswith(".alpha")}


def load_lora_weights(network: Any, path: Path, first: Path, reference: dict[str, float]) -> None:
    """Load the LoRA file ``path`` into ``network``, built from ``first`` (whose alphas are ``reference``).

    Raises:
        ConfigError: ``path`` does not have ``first``'s layout (other modules, rank or alpha).
    """
    from safetensors.torch import load_file

    weights = load_file(str(path))
    try:
        info = network.load_state_dict(weights, strict=False)
    except RuntimeError as e:  # a tensor of another shape: another rank
        raise ConfigError(
            f"{path} does not have the layout of {first.name} ({str(e).splitlines()[-1].strip()}); sample files of "
            f"different networks in separate calls"
        ) from None
    different = [k for k, v in lora_alphas(weights).items() if reference.get(k) != v]
    if info.missing_keys or info.unexpected_keys or different:
        raise ConfigError(
            f"{path} does not have the layout of {first.name} (other modules, rank or alpha: "
            f"{len(info.missing_keys)} missing, {len(info.unexpected_keys)} unexpected, {len(different)} alphas "
            f"differ); sample files of different networks in separate calls"
        )
