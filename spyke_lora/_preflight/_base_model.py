"""The base model, from its safetensors header alone: an SD1.x or SD2.x checkpoint, whole, that sd-scripts loads."""

from __future__ import annotations

from .._errors import ConfigError
from .._header import inspect_model
from ._context import CheckContext, Findings

__all__ = ["check_base_model", "check_sd2", "check_unet_and_vae"]

# a U-Net's input channels -> what kind of model takes them (SD1.5's own takes 4: latents)
_KINDS = {9: "an inpainting model: latents, mask and masked image", 8: "an instruct-pix2pix model: latents and image"}


def check_base_model(ctx: CheckContext, found: Findings) -> None:
    """The file exists, is safetensors (not a pickle), is whole, and is an SD1.x or SD2.x checkpoint."""
    found.problems += ctx.model.problems


def check_sd2(ctx: CheckContext, found: Findings) -> None:
    """An SD2.x base model trains with sd-scripts' v2 settings; a 768-v one also needs v-parameterization."""
    if ctx.model.value == "sd2":
        found.warning(
            "the base model is SD2.x: it is trained with sd-scripts' v2 settings; a 768-v model (SD 2.0-v, 2.1-768) "
            "also needs extra_args.v_parameterization = true"
        )


def check_unet_and_vae(ctx: CheckContext, found: Findings) -> None:
    """sd-scripts' SD1.x/2.x U-Net takes 4 input channels, and its loader converts the checkpoint's own VAE.

    ``model_util.load_models_from_stable_diffusion_checkpoint`` builds a 4-channel U-Net (``in_channels=4``,
    ``create_unet_diffusers_config``) and loads the checkpoint into it (l.1009-1010): an inpainting checkpoint's
    9-channel ``conv_in`` (instruct-pix2pix's 8) fails there with a size mismatch. It then converts the VAE from the
    checkpoint's ``first_stage_model.*`` keys (l.1015) before train_util's ``_load_target_model`` looks at
    ``extra_args.vae`` (l.5564), so a checkpoint without them fails with a KeyError even when a VAE is given."""
    if ctx.model.problems:
        return
    try:
        info = inspect_model(ctx.cfg.base_model)
    except ConfigError:
        return
    where = f"`base_model` {str(info.path)!r}"
    if info.unet_in_channels is not None and info.unet_in_channels != 4:
        kind = _KINDS.get(info.unet_in_channels, "a U-Net that is not a text-to-image one")
        found.problem(
            f"{where} has a U-Net with {info.unet_in_channels} input channels ({kind}); sd-scripts trains a "
            "4-channel text-to-image U-Net and fails loading it: use the plain SD1.5 checkpoint of that model"
        )
    if info.has_unet and not info.has_vae:
        found.problem(
            f"{where} has no VAE (no first_stage_model.* keys): sd-scripts converts the checkpoint's own VAE before it "
            "looks at extra_args.vae, so setting extra_args.vae does not help; use a checkpoint with its VAE baked in "
            "(the full release, not a pruned U-Net-and-text-encoder file)"
        )
