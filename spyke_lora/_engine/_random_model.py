"""A randomly initialised, full-size SD1.5 checkpoint, for tests and the demo: nothing is downloaded."""

from __future__ import annotations

import sys
from pathlib import Path

from .._files import atomic_path
from ._host import host_for
from ._process import free_memory

__all__ = ["write_random_sd15_checkpoint"]


def write_random_sd15_checkpoint(path: Path, *, seed: int = 0, sd_scripts_dir: Path | None = None) -> Path:
    """A randomly initialised, full-size SD1.5 checkpoint (fp16 .safetensors, about 2.1 GB), built with sd-scripts'
    own ``model_util`` so its keys are exactly what the trainer loads. Written atomically to ``path``."""
    host = host_for(sd_scripts_dir)
    with host.active():
        host.train_network()  # imports library.* with the right sys.path
        import torch
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        model_util = sys.modules["library.model_util"]
        state = torch.get_rng_state()
        torch.manual_seed(seed)
        try:
            unet = UNet2DConditionModel(**model_util.create_unet_diffusers_config(False))
            vae = AutoencoderKL(**model_util.create_vae_diffusers_config())
            text_encoder = CLIPTextModel._from_config(
                CLIPTextConfig(  # the v1 config of model_util.load_models_from_stable_diffusion_checkpoint
                    vocab_size=49408,
                    hidden_size=768,
                    intermediate_size=3072,
                    num_hidden_layers=12,
                    num_attention_heads=12,
                    max_position_embeddings=77,
                    hidden_act="quick_gelu",
                    layer_norm_eps=1e-05,
                    dropout=0.0,
                    attention_dropout=0.0,
                    initializer_range=0.02,
                    initializer_factor=1.0,
                    pad_token_id=1,
                    bos_token_id=0,
                    eos_token_id=2,
                    model_type="clip_text_model",
                    projection_dim=768,
                    torch_dtype="float32",
                )
            )
        finally:
            torch.set_rng_state(state)
        with atomic_path(path, keep_suffix=True) as tmp:  # sd-scripts picks the format from the extension
            model_util.save_stable_diffusion_checkpoint(
                False, str(tmp), text_encoder, unet, None, 0, 0, None, save_dtype=torch.float16, vae=vae
            )
        del unet, vae, text_encoder
    free_memory()
    return path
