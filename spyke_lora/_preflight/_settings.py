"""Config values that need something on this machine (a package, a folder), and legal values worth a warning."""

from __future__ import annotations

import importlib.util

from ._context import CheckContext, Findings

__all__ = [
    "check_alpha",
    "check_flip_aug",
    "check_sample_prompts",
    "check_save_interval",
    "check_tensorboard",
    "check_tokenizer_cache_dir",
]


def check_tensorboard(ctx: CheckContext, found: Findings) -> None:
    """``tensorboard = true`` needs the tensorboard package."""
    if ctx.cfg.tensorboard and importlib.util.find_spec("tensorboard") is None:
        found.problem(
            "`tensorboard = true` needs the tensorboard package, which is not installed: "
            "pip install 'spyke-lora[tensorboard]' (or set tensorboard = false)"
        )


def check_tokenizer_cache_dir(ctx: CheckContext, found: Findings) -> None:
    """``tokenizer_cache_dir``, when set, is a folder."""
    folder = ctx.cfg.tokenizer_cache_dir
    if folder is not None and not folder.is_dir():
        found.problem(f"`tokenizer_cache_dir` {str(folder)!r} is not a folder; check the path")


def check_alpha(ctx: CheckContext, found: Findings) -> None:
    """``network_alpha`` above ``network_dim`` scales the LoRA's updates up."""
    cfg = ctx.cfg
    if cfg.network_alpha > cfg.network_dim:
        found.warning(
            f"`network_alpha` {cfg.network_alpha:g} is above `network_dim` {cfg.network_dim}: the LoRA's updates are "
            f"scaled up by {cfg.network_alpha / cfg.network_dim:g}x; the recipe uses alpha = dim / 2"
        )


def check_flip_aug(ctx: CheckContext, found: Findings) -> None:
    """Mirrored images teach a mirrored character."""
    if ctx.cfg.flip_aug:
        found.warning("`flip_aug` is on: mirrored images teach the LoRA a mirrored character (asymmetric costumes)")


def check_save_interval(ctx: CheckContext, found: Findings) -> None:
    """A save interval longer than the run saves only the final file."""
    every, total = ctx.cfg.save_every_n_steps, ctx.count.total_steps
    if every is not None and every > total:
        found.warning(
            f"`save_every_n_steps` {every} is more than the run's {total} steps: only the final file will be written"
        )


def check_sample_prompts(ctx: CheckContext, found: Findings) -> None:
    """Sample prompts without the trigger show the base model, not the LoRA (the recipe's defaults name Spyke's)."""
    cfg = ctx.cfg
    triggers = {f.class_tokens for f in ctx.dataset.value if not f.is_reg and f.class_tokens}
    if not cfg.sample_prompts or len(triggers) != 1 or cfg.keep_tokens < 1:
        return
    trigger = triggers.pop()
    missing = [i for i, prompt in enumerate(cfg.sample_prompts) if trigger not in prompt]
    if missing:
        found.warning(
            f"`sample_prompts` {missing} do not contain the trigger {trigger!r} of the training folder, so their "
            f"samples will not show what the LoRA learned; start each prompt with {trigger!r} (the defaults are the "
            f"Spyke recipe's prompts)"
        )
