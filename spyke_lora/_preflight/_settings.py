"""Config values that need something on this machine (a package, a folder), and legal values worth a warning."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ._context import CheckContext, Findings

__all__ = [
    "check_alpha",
    "check_flip_aug",
    "check_gradient_accumulation",
    "check_learning_rates",
    "check_output_name",
    "check_sample_prompts",
    "check_save_interval",
    "check_steps",
    "check_tensorboard",
    "check_tokenizer_cache_dir",
    "check_warmup",
]

# File extensions a user may type into output_name; sd-scripts appends its own (".safetensors", train_util.py
# get_last_ckpt_name / get_step_ckpt_name).
_MODEL_EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


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
    """Sample prompts without the trigger show the base model, not the LoRA (the recipe's defaults name Spyke's).
    Only with ``keep_tokens >= 1``: a run that keeps its captions' first token trains a trigger word; without it the
    training folder's name need not be a trigger at all (a style LoRA), and the warning would be noise."""
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


def check_gradient_accumulation(ctx: CheckContext, found: Findings) -> None:
    """``extra_args.gradient_accumulation_steps`` is a whole number of at least 1: sd-scripts divides the batches by
    it (0: a ZeroDivisionError; -1: a negative step count; 2.5 or "4": its parser or accelerate refuses it later)."""
    value = ctx.cfg.extra_args.get("gradient_accumulation_steps", 1)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        found.problem(
            f"`extra_args.gradient_accumulation_steps` must be a whole number of at least 1, got {value!r}: it is how "
            f"many batches make one optimizer step; set gradient_accumulation_steps = 1 (no accumulation) or more"
        )


def check_steps(ctx: CheckContext, found: Findings) -> None:
    """A run of 0 or fewer steps trains nothing (whatever the cause: no training image sd-scripts keeps, a dataset of
    regularisation images only, which sd-scripts pairs with none, train_util.py l.2166-2180)."""
    count = ctx.count
    if count.total_steps > 0 and count.steps_per_epoch > 0:
        return
    trained = [s for s in count.subsets if not s.is_reg and s.images and s.repeats >= 1]
    if not trained and any(s.is_reg for s in count.subsets):
        why = (
            "the dataset has only regularisation images (is_reg = true), which sd-scripts adds only alongside "
            "training images; add a training subset (is_reg = false) of the character's images"
        )
    else:
        folders = ", ".join(repr(str(f.folder)) for f in ctx.dataset.value) or "none"
        why = f"sd-scripts finds no training image it keeps in the dataset's folders ({folders}); check them"
    steps = count.total_steps if count.steps_per_epoch > 0 else 0
    found.problem(
        f"the run has {steps} steps ({count.steps_per_epoch} per epoch, from {count.batches_per_epoch} batches): {why}"
    )


def _part_rate(cfg_rate: float | None, field: str, learning_rate: float) -> tuple[float, str]:
    """A part's learning rate as sd-scripts uses it (its own, else ``learning_rate``: networks/lora.py l.1199,
    l.1234), and where it comes from, for a message."""
    if cfg_rate is not None:
        return cfg_rate, f"`{field}` is {cfg_rate:g}"
    return learning_rate, f"`{field}` is unset (so `learning_rate` {learning_rate:g} is used)"


def check_learning_rates(ctx: CheckContext, found: Findings) -> None:
    """A learning rate of 0 trains nothing of its part: sd-scripts skips a parameter group whose rate is 0
    (networks/lora.py l.1187, "NO LR skipping!"). The text encoder alone at 0 trains the U-Net only (a choice);
    the U-Net at 0, or both, is almost surely a mistake; so is ``learning_rate`` 0 even where both parts override
    it."""
    cfg = ctx.cfg
    unet, unet_how = _part_rate(cfg.unet_lr, "unet_lr", cfg.learning_rate)
    te, te_how = _part_rate(cfg.text_encoder_lr, "text_encoder_lr", cfg.learning_rate)
    if cfg.extra_args.get("network_train_unet_only"):
        te, te_how = 0.0, "`extra_args.network_train_unet_only` is set"
    base = "`learning_rate` is 0, " if cfg.learning_rate == 0 and None in (cfg.unet_lr, cfg.text_encoder_lr) else ""
    if unet == 0 and te == 0:
        found.warning(
            f"nothing is trained: {base}{unet_how} for the U-Net and {te_how} for the text encoder, and sd-scripts "
            f"skips a part whose rate is 0; set `unet_lr` (the recipe: 1e-4) and `text_encoder_lr` (5e-5)"
        )
    elif unet == 0:
        found.warning(
            f"the U-Net is not trained: {base}{unet_how}, and sd-scripts skips a part whose rate is 0, so only the "
            f"text encoder learns (a character LoRA learns mostly in the U-Net); set unet_lr = 1e-4 (the recipe's)"
        )
    elif cfg.learning_rate == 0 and te == 0:
        found.warning(
            f"`learning_rate` is 0 and {te_how}: the text encoder is not trained, the U-Net only; set "
            f"text_encoder_lr = 5e-5 (the recipe's) to train it, or text_encoder_lr = 0 to say U-Net only"
        )
    elif cfg.learning_rate == 0:
        found.warning(
            f"`learning_rate` is 0: this run trains at `unet_lr` {unet:g} and `text_encoder_lr` {te:g}, which "
            f"override it, but a part left without a rate of its own would not train; set learning_rate to the rate "
            f"you mean (the recipe: 1e-4)"
        )


def check_warmup(ctx: CheckContext, found: Findings) -> None:
    """A warm-up as long as the run: the learning rate rises until the end and never reaches its value. sd-scripts'
    scheduler counts ``max_train_steps * num_processes`` steps (train_util.py l.5274)."""
    warmup, total = ctx.cfg.lr_warmup_steps, ctx.count.total_steps
    if warmup and total > 0 and warmup >= total * ctx.count.processes:
        found.warning(
            f"`lr_warmup_steps` {warmup} is as long as or longer than the run's {total} steps: the learning rate is "
            f"still rising when the run ends and never reaches its value; warm up for about a tenth of the run "
            f"(lr_warmup_steps = {max(1, total // 10)}) or not at all (0)"
        )


def check_output_name(ctx: CheckContext, found: Findings) -> None:
    """An ``output_name`` ending in a model file's extension: sd-scripts appends '.safetensors' to it."""
    name = ctx.cfg.output_name
    suffix = Path(name).suffix
    if suffix.lower() in _MODEL_EXTENSIONS:
        found.warning(
            f"`output_name` {name!r} ends in {suffix!r}, and sd-scripts adds the extension itself: the LoRA files "
            f"would be named {ctx.count.final_name!r} (and {name}-step00000200.safetensors, ...); use "
            f"output_name = {name[: -len(suffix)]!r}"
        )
