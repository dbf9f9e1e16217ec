"""``diffusers_pipeline(cfg)``: try a trained LoRA in Python with diffusers, offline."""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import _engine
from ._config import TrainConfig

if TYPE_CHECKING:  # pragma: no cover
    from diffusers import StableDiffusionPipeline

__all__ = ["diffusers_pipeline"]


def diffusers_pipeline(cfg: TrainConfig) -> StableDiffusionPipeline:
    """A diffusers ``StableDiffusionPipeline`` of ``cfg.base_model``, built offline, to try a trained LoRA.

    Its parts: sd-scripts' own conversion of the file (the weights the trainer loads), the SD1.5 DDIM scheduler, and
    the CLIP tokenizer from ``cfg.tokenizer_cache_dir`` when set (else the Hugging Face cache). On the CPU in fp32;
    move it with ``.to("mps")`` / ``.to("cuda", torch.float16)``. Load a LoRA with
    ``pipe.load_lora_weights(folder, weight_name=file_name)`` (needs ``pip install 'spyke-lora[diffusers]'``, which
    adds peft).

    Args:
        cfg: the run's config: its ``base_model`` (an SD1.x single-file checkpoint), ``tokenizer_cache_dir`` and
            ``sd_scripts_dir``.

    Returns:
        The pipeline.

    Raises:
        ConfigError: the base model cannot be read, or the tokenizer is not in ``tokenizer_cache_dir``.

    Example::

        pipe = diffusers_pipeline(cfg)
        pipe.load_lora_weights("runs/spyke", weight_name="spyke_plasma_v1-step00000600.safetensors")
        image = pipe("spyke_plasma_v1, full body", num_inference_steps=25, guidance_scale=7).images[0]
    """
    return _engine.diffusers_pipeline(cfg)
