"""The base model, from its safetensors header alone: an SD1.x or SD2.x checkpoint, whole."""

from __future__ import annotations

from ._context import CheckContext, Findings

__all__ = ["check_base_model", "check_sd2"]


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
