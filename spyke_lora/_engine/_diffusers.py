"""A diffusers ``StableDiffusionPipeline`` of an SD1.x single-file checkpoint, built offline with sd-scripts' code.

sd-scripts' own conversion (``library.model_util``) gives the same text encoder, VAE and U-Net weights the trainer
loads, so a LoRA can be tried with ``pipe.load_lora_weights(file)``, a consumer of the file other than sd-scripts
(like ComfyUI).

diffusers' own ``from_single_file`` fetches model configs from the Hugging Face hub; this needs nothing but the
checkpoint and a CLIP tokenizer folder.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from .._config import TrainConfig
from .._errors import ConfigError
from ._host import EngineHost, host_for

# The scheduler of the SD1.5 release (its scheduler_config.json), written out so that nothing is downloaded.
SD15_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)
TOKENIZER_ID = "openai/clip-vit-large-patch14"  # what sd-scripts loads for SD1.x
TOKENIZER_FOLDER = "openai_clip-vit-large-patch14"  # its name inside sd-scripts' --tokenizer_cache_dir


def build_pipeline(host: EngineHost, base_model: Path, tokenizer_cache_dir: Path | None) -> Any:
    """The pipeline of ``base_model``, converted with ``host``'s ``model_util``; the caller's torch generator kept."""
    import diffusers
    import torch
    from transformers import CLIPTokenizer

    with host.active():
        host.train_network()  # imports library.* with sd-scripts' sys.path
        model_util = sys.modules["library.model_util"]
        state = torch.get_rng_state()  # building modules draws initial weights; the caller's generator is kept
        try:
            text_encoder, vae, sd_unet = model_util.load_models_from_stable_diffusion_checkpoint(False, str(base_model))
            unet = diffusers.UNet2DConditionModel(**model_util.create_unet_diffusers_config(False))
        finally:
            torch.set_rng_state(state)
        # sd-scripts' U-Net mirrors diffusers' module names: its weights load as they are, every key matched
        unet.load_state_dict(sd_unet.state_dict(), strict=True)
        del sd_unet
    if tokenizer_cache_dir is not None:
        folder = Path(tokenizer_cache_dir) / TOKENIZER_FOLDER
        if not folder.is_dir():
            raise ConfigError(
                f"`tokenizer_cache_dir` {tokenizer_cache_dir} has no {TOKENIZER_FOLDER} folder; "
                f"point it at the folder sd-scripts' --tokenizer_cache_dir uses"
            )
        tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    else:
        tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER_ID)  # the Hugging Face cache, as sd-scripts does
    return diffusers.StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=diffusers.DDIMScheduler(**SD15_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def diffusers_pipeline(cfg: TrainConfig) -> Any:
    """A diffusers ``StableDiffusionPipeline`` of ``cfg.base_model`` (SD1.x), converted offline by sd-scripts'
    ``model_util``, with ``cfg.tokenizer_cache_dir``'s tokenizer when set. See :mod:`._diffusers`."""
    from .._header import check_base_model

    if check_base_model(cfg.base_model).family != "sd1":
        raise ConfigError(f"`base_model` {str(cfg.base_model)!r} is SD2.x; diffusers_pipeline() converts SD1.x only")
    return build_pipeline(host_for(cfg.sd_scripts_dir), cfg.base_model, cfg.tokenizer_cache_dir)
