"""TrainConfig + device choice -> the exact ``train_network.py`` arguments, their dataset TOML and shell command.

This is the only place that knows sd-scripts' option names. Building the list is pure; checking it runs sd-scripts'
own ``setup_parser()``.
"""

from __future__ import annotations

import argparse
import difflib
import json
import shlex
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from .._config import TrainConfig, repeats_from_folder_name
from .._device import DeviceChoice, available_devices, choose_device, resolve_device
from .._errors import ConfigError, DeviceError, EngineError, SpykeLoraWarning
from .._header import inspect_model
from ._host import host_for, locate_engine

# Options the library sets itself from config fields or the device policy: extra_args may not set them.
_MANAGED: dict[str, str] = {
    "pretrained_model_name_or_path": "set `base_model` instead",
    "train_data_dir": "set `train_dir` instead",
    "reg_data_dir": "set `reg_dir` instead",
    "in_json": "use `dataset_config` (a kohya dataset TOML) instead",
    "save_model_as": "spyke-lora always writes .safetensors",
    "sdpa": "attention is chosen by the device policy (sdpa everywhere, or extra_args.xformers = true on CUDA)",
    "mem_eff_attn": "attention is chosen by the device policy (sdpa everywhere, or extra_args.xformers = true on CUDA)",
    "use_8bit_adam": "set `optimizer_type` instead",
    "v2": "it is set from the base model's header (SD2.x checkpoints)",
    "use_lion_optimizer": "set `optimizer_type` instead",
    "caption_extention": "set `caption_extension` instead",
    "console_log_level": "configure Python logging in your program instead",
    "console_log_file": "configure Python logging in your program instead",
    "save_state": "set `save_state` instead",
    "resume": "pass `resume=` to train() (or `--resume` to spyke-lora train) instead",
    "skip_until_initial_step": "resuming is managed by train(resume=...)",
    "initial_step": "resuming is managed by train(resume=...)",
    "initial_epoch": "resuming is managed by train(resume=...)",
    "sample_prompts": "set `sample_prompts` (a list of prompts) and the other `sample_*` fields instead",
    "sample_every_n_steps": "every saved checkpoint is sampled (set `sample_prompts = []` to turn sampling off)",
    "sample_every_n_epochs": "every saved checkpoint is sampled (set `sample_prompts = []` to turn sampling off)",
    "validate_every_n_epochs": "held-out images are validated at every saved file, or every `validate_every_n_steps`",
    "console_log_simple": "spyke-lora always sets it (rich log rendering draws from Python's `random`, which "
    "sd-scripts also uses for caption shuffling, so a rich log changes what is trained)",
}
_NEVER = 10**9  # an epoch interval no run reaches
# Options only CUDA can run.
_CUDA_ONLY = ("full_fp16", "full_bf16", "fp8_base", "fp8_base_unet")
_FP8 = ("fp8_base", "fp8_base_unet")  # train_network.py l.829-833: fp8 needs fp16 or bf16 mixed precision


def dataset_toml_path(cfg: TrainConfig) -> Path:
    """Where ``train()`` writes the dataset TOML for ``train_dir``/``reg_dir`` (a fixed path, so the command line
    of a finished run can be rerun as-is); the user's own file when ``dataset_config`` is set."""
    if cfg.dataset_config is not None:
        return cfg.dataset_config
    return cfg.output_dir / f"{cfg.output_name}_dataset.toml"


def dataset_toml_text(cfg: TrainConfig) -> str | None:
    """The dataset TOML for ``train_dir``/``reg_dir`` (None when the user supplies ``dataset_config``).

    Only the folders are in it: resolution, batch size, bucketing and the caption options are passed on the command
    line, which sd-scripts uses for every subset that does not set them itself."""
    if cfg.dataset_config is not None or cfg.train_dir is None:
        return None
    subsets = [_subset(cfg.train_dir, cfg.resolved_num_repeats(), is_reg=False)]
    if cfg.reg_dir is not None:
        subsets.append(_subset(cfg.reg_dir, cfg.reg_repeats, is_reg=True))
    lines = [
        "# Written by spyke-lora for sd-scripts' --dataset_config. Resolution, batch size, bucketing and caption",
        "# options come from the command line (see the run's arguments).",
        "[[datasets]]",
    ]
    if cfg.validation_split:  # sd-scripts' own split of train_dir (regularisation images are never held out)
        seed = cfg.seed if cfg.validation_seed is None else cfg.validation_seed
        lines += [f"validation_split = {json.dumps(cfg.validation_split)}", f"validation_seed = {seed}"]
    for subset in subsets:
        lines += ["", "[[datasets.subsets]]"]
        lines += [f"{k} = {json.dumps(v)}" for k, v in subset.items()]
    return "\n".join(lines) + "\n"


def tensorboard_dir(cfg: TrainConfig) -> Path:
    """Where ``tensorboard = true`` writes (one subfolder per run): ``tensorboard --logdir`` this folder."""
    return cfg.output_dir / "tensorboard"


def sample_prompts_path(cfg: TrainConfig) -> Path:
    """Where ``train()`` writes the prompt file of sd-scripts' sampler (next to the dataset TOML)."""
    return cfg.output_dir / f"{cfg.output_name}_sample_prompts.txt"


def sample_prompts_text(cfg: TrainConfig) -> str | None:
    """sd-scripts' prompt file: one line per prompt x CFG scale, in that order (line ``i`` is prompt
    ``i // len(sample_cfg_scales)`` at scale ``i % len(sample_cfg_scales)``), all with the same seed, steps and size.
    None when sampling is off."""
    if not cfg.sample_prompts:
        return None
    size = cfg.sample_size or cfg.resolution
    negative = f" --n {cfg.sample_negative_prompt}" if cfg.sample_negative_prompt.strip() else ""
    lines = [
        f"{prompt}{negative} --w {size} --h {size} --d {cfg.sample_seed} --l {_text(float(scale))} "
        f"--s {cfg.sample_steps}"
        for prompt in cfg.sample_prompts
        for scale in cfg.sample_cfg_scales
    ]
    return "# Written by spyke-lora for sd-scripts' --sample_prompts\n" + "\n".join(lines) + "\n"


def _subset(folder: Path, repeats: int | None, *, is_reg: bool) -> dict[str, Any]:
    parsed = repeats_from_folder_name(folder)
    # kohya's folder convention: '10_spyke_plasma_v1' -> the caption used for images without a caption file
    class_tokens = parsed[1] if parsed else folder.name
    return {"image_dir": str(folder), "num_repeats": repeats, "is_reg": is_reg, "class_tokens": class_tokens}


class _Run(NamedTuple):
    """What an option's value is read from: the config, the device choice, the state folder a resume continues."""

    cfg: TrainConfig
    device: DeviceChoice
    resume_from: Path | None


def _when(condition: Callable[[TrainConfig], Any], value: Callable[[TrainConfig], Any]) -> Callable[[_Run], Any]:
    """An option written only when ``condition(cfg)`` holds (None, which writes nothing, otherwise)."""
    return lambda run: value(run.cfg) if condition(run.cfg) else None


def _tensorboard(value: Callable[[TrainConfig], Any]) -> Callable[[_Run], Any]:
    return _when(lambda cfg: cfg.tensorboard, value)


def _sampling(value: Callable[[TrainConfig], Any]) -> Callable[[_Run], Any]:
    return _when(lambda cfg: cfg.sample_prompts, value)


# sd-scripts' options, in the order they are written: (flag, where the value comes from). A config field's name is a
# one-to-one option; a function of the run (_Run) is an option spyke-lora decides. Every value is written the same
# way (_words): nothing for None or False, the flag alone for True, each item of a list, repr() of a float, str() of
# the rest (a path as its text). extra_args follow, in their order.
_OPTIONS: tuple[tuple[str, str | Callable[[_Run], Any]], ...] = (
    ("pretrained_model_name_or_path", "base_model"),
    ("v2", lambda run: _is_sd2(run.cfg.base_model)),  # SD2.x checkpoints need sd-scripts' v2 model and tokenizer
    ("dataset_config", lambda run: dataset_toml_path(run.cfg)),
    ("output_dir", "output_dir"),
    ("output_name", "output_name"),
    ("save_model_as", lambda run: "safetensors"),
    ("resolution", "resolution"),
    ("train_batch_size", "train_batch_size"),
    ("enable_bucket", "enable_bucket"),
    ("caption_extension", "caption_extension"),
    ("shuffle_caption", "shuffle_caption"),
    ("keep_tokens", "keep_tokens"),
    ("flip_aug", "flip_aug"),
    ("prior_loss_weight", "prior_loss_weight"),
    ("network_module", "network_module"),
    ("network_dim", "network_dim"),
    ("network_alpha", "network_alpha"),
    ("optimizer_type", "optimizer_type"),
    ("learning_rate", "learning_rate"),
    ("unet_lr", "unet_lr"),
    ("text_encoder_lr", "text_encoder_lr"),
    ("lr_scheduler", "lr_scheduler"),
    ("lr_warmup_steps", "lr_warmup_steps"),
    ("max_train_steps", "max_train_steps"),
    ("max_train_epochs", _when(lambda cfg: cfg.max_train_steps is None, lambda cfg: cfg.max_train_epochs)),  # steps win
    ("save_every_n_steps", "save_every_n_steps"),
    ("save_precision", "save_precision"),
    ("save_state", "save_state"),
    # tensorboard: sd-scripts appends the start time: OUTPUT_DIR/tensorboard/NAME-20261124120000/
    ("logging_dir", _tensorboard(tensorboard_dir)),
    ("log_with", _tensorboard(lambda cfg: "tensorboard")),
    ("log_prefix", _tensorboard(lambda cfg: f"{cfg.output_name}-")),
    # sampling: when to sample is spyke-lora's choice (every saved file), so no sample_every_n_*
    ("sample_prompts", _sampling(sample_prompts_path)),
    ("sample_sampler", _sampling(lambda cfg: cfg.sample_sampler)),
    ("sample_at_first", _sampling(lambda cfg: cfg.sample_at_first)),
    # a resume continues the state's step count and skips the batches of the resumed epoch already trained (without
    # --skip_until_initial_step sd-scripts restarts the resumed epoch from its first batch)
    ("resume", lambda run: run.resume_from),
    ("skip_until_initial_step", lambda run: run.resume_from is not None),
    # the device policy
    ("mixed_precision", lambda run: run.device.mixed_precision),
    ("no_half_vae", lambda run: run.device.full_precision_vae),
    ("sdpa", lambda run: run.device.attention == "sdpa"),
    ("xformers", lambda run: run.device.attention == "xformers"),
    ("max_data_loader_n_workers", lambda run: run.device.data_loader_workers),
    ("clip_skip", "clip_skip"),
    # "auto" is resolved by the memory plan before a run (plan(), sd_scripts_argv); left as it is, it means on
    ("gradient_checkpointing", lambda run: run.cfg.gradient_checkpointing is not False),
    ("cache_latents", "cache_latents"),
    ("cache_latents_to_disk", "cache_latents_to_disk"),
    ("seed", "seed"),
    # sd-scripts splits train_dir (the dataset TOML's validation_split) and would validate at every epoch end with its
    # own loop; spyke-lora validates the held-out part itself (see _held_out), so that loop never runs
    ("validate_every_n_epochs", _when(lambda cfg: cfg.validation_split, lambda cfg: _NEVER)),
    ("tokenizer_cache_dir", "tokenizer_cache_dir"),
    # plain log lines: rich's rendering draws from Python's global `random` (link ids), the generator sd-scripts
    # shuffles captions with, so with rich the LoRA would depend on how (and how often) logs were rendered
    ("console_log_simple", lambda run: True),
)


def build_argv(cfg: TrainConfig, device: DeviceChoice, resume_from: Path | None = None) -> list[str]:
    """The ``train_network.py`` arguments for ``cfg`` on ``device``. Pure: no file is read or written (but the
    base model's header, for ``--v2``).

    Args:
        cfg: The run's config.
        device: The device policy's choice for the run.
        resume_from: The state folder a resumed run continues.

    Returns:
        The arguments: :data:`_OPTIONS` in order, then ``extra_args`` (but what the device policy decided).

    Raises:
        ConfigError: ``extra_args`` sets an option spyke-lora manages, or one this device or config excludes.
        DeviceError: ``extra_args`` sets a CUDA-only option and the run is not on CUDA.
    """
    _check_extra_args(cfg, device)
    run = _Run(cfg, device, resume_from)
    argv: list[str] = []
    for flag, source in _OPTIONS:
        argv += _words(flag, getattr(cfg, source) if isinstance(source, str) else source(run))
    for key, value in cfg.extra_args.items():
        if key == "xformers" or (key == "no_half_vae" and device.full_precision_vae):
            continue  # already decided by the device policy
        argv += _words(key, value)
    return argv


def _check_extra_args(cfg: TrainConfig, device: DeviceChoice) -> None:
    """``extra_args`` may not set what spyke-lora sets itself, nor what the device or the config rules out."""
    problems = []
    for key in cfg.extra_args:
        if key in _MANAGED:
            problems.append(f"`extra_args.{key}` cannot be set: {_MANAGED[key]}")
        if key in _CUDA_ONLY and cfg.extra_args[key] and device.device != "cuda":
            raise DeviceError(f"`extra_args.{key}` needs CUDA and this run is on {device.device!r}; remove it")
        if key in _FP8 and cfg.extra_args[key] and device.mixed_precision not in ("fp16", "bf16"):
            problems.append(
                f"`extra_args.{key}` needs fp16 or bf16 mixed precision (sd-scripts asserts it once the model is "
                f"loaded), and `mixed_precision` is {device.mixed_precision!r}; set mixed_precision = 'bf16' (or "
                f"'fp16'), or remove {key}"
            )
    if device.device == "mps" and "max_data_loader_n_workers" in cfg.extra_args:
        problems.append(
            "`extra_args.max_data_loader_n_workers` cannot be set on mps: workers start with `spawn` there, which "
            "breaks in notebooks, so spyke-lora loads data in the main process"
        )
    if cfg.tensorboard:
        problems += [
            f"`extra_args.{key}` cannot be combined with `tensorboard = true`, which sets it; remove one"
            for key in ("logging_dir", "log_with", "log_prefix")
            if key in cfg.extra_args
        ]
    if problems:
        raise ConfigError(problems)


def _words(flag: str, value: Any) -> list[str]:
    """One option as words: none for None or False, ``--flag`` for True, ``--flag`` and each item of a list."""
    if value is None or value is False:
        return []
    if value is True:
        return [f"--{flag}"]
    if isinstance(value, (list, tuple)):
        return [f"--{flag}", *(_text(v) for v in value)]
    return [f"--{flag}", _text(value)]


def _is_sd2(path: Path) -> bool:
    """From the safetensors header only; a file that cannot be read is left to the preflight to report."""
    try:
        return inspect_model(path).family == "sd2"
    except ConfigError:
        return False


def _text(value: Any) -> str:
    return repr(value) if isinstance(value, float) else str(value)


class _ParserError(Exception):
    pass


def parse_argv(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """Parse with sd-scripts' own parser, turning its ``exit()`` into an :class:`EngineError` that names the
    offending option and suggests the closest real one."""

    def error(message: str) -> None:
        raise _ParserError(message)

    parser.error = error  # type: ignore[method-assign]  # this parser instance only
    try:
        return parser.parse_args(list(argv))
    except _ParserError as e:
        message = str(e)
        if message.startswith("unrecognized arguments:"):
            options = [s[2:] for action in parser._actions for s in action.option_strings if s.startswith("--")]
            fixes = []
            for token in message.split(":", 1)[1].split():
                if token.startswith("--"):
                    close = difflib.get_close_matches(token[2:], options, n=1)
                    fixes.append(
                        f"`extra_args.{token[2:]}` is not an sd-scripts train_network.py option"
                        + (f"; did you mean `{close[0]}`?" if close else "")
                    )
            if fixes:
                raise ConfigError(fixes) from None
        raise EngineError(f"sd-scripts rejected the arguments: {message}") from None
    except SystemExit as e:  # pragma: no cover - --help or a version flag in extra_args
        raise EngineError(f"sd-scripts' argument parser exited (code {e.code}); check extra_args") from None


def device_choice(cfg: TrainConfig, device: str | None = None) -> DeviceChoice:
    """The device policy for ``cfg``: on ``device`` when given (no hardware check), else on what ``cfg.device``
    resolves to on this machine."""
    if device is None:
        cuda, mps = available_devices()
        device = resolve_device(cfg.device, cuda_available=cuda, mps_available=mps)
    elif device not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"device must be 'cpu', 'cuda' or 'mps', got {device!r}")
    xformers = bool(cfg.extra_args.get("xformers", False))
    return choose_device(
        device, mixed_precision=cfg.mixed_precision, optimizer_type=cfg.optimizer_type, xformers=xformers
    )


def sd_scripts_argv(cfg: TrainConfig, device: str | None = None) -> list[str]:
    """Exactly the ``train_network.py`` arguments :func:`spyke_lora.train` runs for ``cfg``, checked by sd-scripts'
    own parser. Corrections of the device policy (e.g. fp16 on MPS) are issued as :class:`SpykeLoraWarning`.

    Args:
        cfg: The run's config.
        device: ``"cpu"``, ``"cuda"`` or ``"mps"``: that device's policy, without needing the hardware
            (``gradient_checkpointing = "auto"`` is then on, unless the device is this machine's). By default the
            device ``cfg.device`` resolves to here.

    Returns:
        The arguments, ``"auto"`` gradient checkpointing resolved as the run resolves it.

    Raises:
        ConfigError: ``extra_args`` sets a managed option, or one sd-scripts does not know (with the closest one).
        DeviceError: The device cannot run ``cfg``, or ``device`` is not one of the three.
        EngineError: sd-scripts is missing, or its parser rejected the arguments.
    """
    choice = device_choice(cfg, device)
    for note in choice.corrections:
        warnings.warn(note, SpykeLoraWarning, stacklevel=2)
    if cfg.gradient_checkpointing == "auto":  # this machine's budget, unless `device` is not what runs here
        try:
            here = device is None or device == device_choice(cfg).device
        except DeviceError:  # this machine cannot run cfg at all: the device asked for is another machine's
            here = False
        cfg = cfg.replace(gradient_checkpointing=resolve_checkpointing(cfg, choice, here=here))
    argv = build_argv(cfg, choice)
    host = host_for(cfg.sd_scripts_dir)
    with host.active():
        parse_argv(host.train_network().setup_parser(), argv)
    return argv


def resolve_checkpointing(cfg: TrainConfig, device: DeviceChoice, *, here: bool = True) -> bool:
    """``gradient_checkpointing = "auto"`` on ``device``: the memory plan's choice against this machine's
    budget (``here``), or on, the safe setting, for a device that is not this machine's."""
    from .._header import HeaderError
    from .._memory import MemoryBudget, memory_plan

    budget = None if here else MemoryBudget(None, f"another machine's {device.device}")
    try:
        chosen = memory_plan(cfg, device.device, device.mixed_precision, _image_count(cfg), budget=budget)
    except (OSError, HeaderError):  # no readable base model: plan() says what is wrong with it; the safe setting here
        return True
    return chosen.gradient_checkpointing


def _image_count(cfg: TrainConfig) -> int:
    """The images whose latents a run caches, for the memory plan (their latents are a few kB each)."""
    folders = [f for f in (cfg.train_dir, cfg.reg_dir, cfg.validation_dir) if f is not None and f.is_dir()]
    try:
        return sum(
            1 for folder in folders for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp")
        )
    except OSError:  # an unreadable folder: the preflight names it; the latents' few kB do not decide the plan
        return 0


def command_line(
    cfg: TrainConfig,
    device: DeviceChoice,
    resume_from: Path | None = None,
    launcher: Callable[[list[str]], list[str]] | None = None,
) -> str:
    """The shell command that runs ``cfg`` with the sd-scripts command line.

    Args:
        cfg: The run's config.
        device: The device choice the run trains with.
        resume_from: The state folder a resumed run continues.
        launcher: For a multi-process run: turns the script and its arguments into the ``accelerate launch``
            command the run's launcher gets (``_launch.launch_command``).

    Returns:
        The environment, this Python, the engine's ``train_network.py`` and :func:`build_argv`'s arguments (the
        files they read are written by the run), as one shell line.
    """
    env = [f"{k}={v}" for k, v in run_environment(device).items()]
    script = locate_engine(cfg.sd_scripts_dir) / "train_network.py"
    command = [sys.executable, str(script), *build_argv(cfg, device, resume_from)]
    if launcher is not None:
        command = launcher(command[1:])
    return " ".join(env + [shlex.join(command)])


def run_environment(device: DeviceChoice) -> dict[str, str]:
    """Environment variables a run on ``device`` needs (set for the run in-process; print them with the
    command line): MPS's CPU fallback for missing operations; CPU forced even where a GPU exists."""
    if device.device == "mps":
        return {"PYTORCH_ENABLE_MPS_FALLBACK": "1"}
    if device.device == "cpu":
        return {"ACCELERATE_USE_CPU": "true"}
    return {}
