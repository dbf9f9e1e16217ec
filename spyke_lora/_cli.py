"""The ``spyke-lora`` command (:func:`main`), every subcommand in one table (:data:`COMMANDS`).

Subcommands: ``train``, ``plan``, ``sample``, ``validate``, ``argv``, ``runs``, ``diff``, ``doctor``, ``calibrate``,
``compare``, ``deploy`` and ``demo``. Exit codes: 0 done, 1 a run started and failed, 2 refused before anything
ran, 130 interrupted.

A subcommand is a row of :data:`COMMANDS`: its name, its help line, the function that adds its arguments and the
function that runs it (``args`` in, the exit code out). A new one: write those two functions here, add the row.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

from ._config import TrainConfig, tomllib
from ._errors import ConfigError, SpykeLoraError, SpykeLoraWarning, TrainingError
from ._version import __version__
from .callbacks import Progress, describe  # noqa: F401  (describe: the event lines, tested from here)
from .events import Event

__all__ = ["COMMANDS", "Command", "main"]

_RESUME_HELP = (
    "continue a run saved with save_state = true: from its latest state (no value) or the NAME-step...-state folder "
    "given"
)
_ENGINE_LOG_HELP = "write sd-scripts' own output to this file instead"
_CHECKPOINTS_HELP = "LoRA files, or a run folder (its files, in step order)"


def _printer(stream: IO[str]) -> Callable[[Event], None]:
    return Progress(stream)


def _load(args: argparse.Namespace) -> TrainConfig:
    """The config file, with ``--set key=value`` changes (values in TOML syntax; a bare word is a string)."""
    cfg = TrainConfig.from_toml(args.config)
    changes = {}
    for item in getattr(args, "set", None) or ():
        key, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r} is not key=value; e.g. --set learning_rate=5e-5")
        if text.strip().lower() == "none":  # unset an optional field, as "none" does in a TOML file
            changes[key.strip()] = None
            continue
        try:
            changes[key.strip()] = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            changes[key.strip()] = text  # a bare word: a string (paths, names)
    if getattr(args, "overwrite", False):
        changes["overwrite"] = True
    return cfg.replace(**changes) if changes else cfg


def _launch(args: argparse.Namespace):
    """The run's :class:`~spyke_lora.Launch` from the command's launcher options."""
    from ._launch import Launch

    return Launch(
        processes=args.processes,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        main_process_ip=args.main_process_ip,
        main_process_port=args.main_process_port,
        config_file=args.accelerate_config,
    )


def _launch_options(p: argparse.ArgumentParser) -> None:
    """accelerate launch's options for a multi-process run (docs/scaling.md)."""
    group = p.add_argument_group("several processes or machines (accelerate launch; docs/scaling.md)")
    group.add_argument(
        "--processes",
        type=int,
        metavar="N",
        help="train in N processes over every machine (e.g. one per GPU); default 1, in-process",
    )
    group.add_argument("--num-machines", type=int, metavar="M", help="machines in the run (default 1)")
    group.add_argument("--machine-rank", type=int, metavar="R", help="this machine's rank, 0 to M-1 (0: the main one)")
    group.add_argument("--main-process-ip", metavar="IP", help="the address of machine rank 0")
    group.add_argument(
        "--main-process-port",
        type=int,
        metavar="PORT",
        help="its rendezvous port (default: 29500 with several machines, a free one with one)",
    )
    group.add_argument(
        "--accelerate-config",
        type=Path,
        metavar="FILE",
        help="an accelerate config file (`accelerate config`); the options above override it",
    )


def _set_option(p: argparse.ArgumentParser, text: str = "change a config field") -> None:
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help=text)


def _resume_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resume", nargs="?", const="latest", metavar="STATE", help=_RESUME_HELP)


# --- the subcommands: each one's arguments, then what it does ------------------------------------------------------


def _train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", type=Path)
    p.add_argument("--overwrite", action="store_true", help="replace existing LoRA files of the same output_name")
    p.add_argument("--engine-log", type=Path, help=_ENGINE_LOG_HELP)
    _set_option(p, "change a config field for this run")
    _resume_option(p)
    _launch_options(p)


def _train(args: argparse.Namespace) -> int:
    from ._train import train

    cfg = _load(args)
    train(cfg, callbacks=_printer(sys.stdout), resume=args.resume, engine_log=args.engine_log, launch=_launch(args))
    return 0


def _plan_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", type=Path)
    _set_option(p)
    _resume_option(p)
    _launch_options(p)


def _plan(args: argparse.Namespace) -> int:
    from ._plan import plan

    print(plan(_load(args), resume=args.resume, launch=_launch(args)))
    return 0


def _sample_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", type=Path)
    p.add_argument("checkpoints", nargs="+", type=Path, help=_CHECKPOINTS_HELP)
    _set_option(p, "change a config field (e.g. sample_steps=30)")
    p.add_argument("--engine-log", type=Path, help=_ENGINE_LOG_HELP)


def _sample(args: argparse.Namespace) -> int:
    from ._sample import sample

    cfg = _load(args)
    made = sample(args.checkpoints, cfg, callbacks=_printer(sys.stdout), engine_log=args.engine_log)
    print(f"{len(made)} images in {cfg.output_dir / 'sample'}")
    return 0


def _validate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", type=Path)
    p.add_argument("checkpoints", nargs="*", type=Path, help=_CHECKPOINTS_HELP)
    p.add_argument("--base", action="store_true", help="also measure the base model alone (step 0, the reference)")
    p.add_argument(
        "--folder",
        type=Path,
        help="measure on these captioned images instead of the config's held-out ones (class images: the class drift)",
    )
    _set_option(p)
    p.add_argument("--engine-log", type=Path, help=_ENGINE_LOG_HELP)


def _validate(args: argparse.Namespace) -> int:
    from ._validation_loss import validation_loss

    cfg = _load(args)
    files = ([None] if args.base else []) + list(args.checkpoints)
    figures = validation_loss(files, cfg, folder=args.folder, engine_log=args.engine_log)
    if not figures:
        return 0
    print(f"held-out loss on {figures[0].images} images in {figures[0].folder} (lower is better):")
    base = figures[0].loss if figures[0].checkpoint is None else None
    for figure in figures:
        name = "base model" if figure.checkpoint is None else figure.checkpoint.name
        versus = f"  {figure.loss - base:+.4f} vs the base model" if base is not None and figure.checkpoint else ""
        print(f"  step {figure.step:>6}  {figure.loss:.4f}{versus}  {name}")
    return 0


def _argv_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", type=Path)
    text = "apply this device's policy (default: this machine's)"
    p.add_argument("--device", choices=["cpu", "cuda", "mps"], help=text)


def _argv(args: argparse.Namespace) -> int:
    """Print the command line, and on stderr the files it reads that a run writes: their paths and text. Printing
    writes nothing (not even ``output_dir``): ``spyke-lora train`` writes those files, or save the text shown."""
    from ._engine import (
        command_line,
        dataset_toml_path,
        dataset_toml_text,
        device_choice,
        sample_prompts_path,
        sample_prompts_text,
        sd_scripts_argv,
    )

    cfg = TrainConfig.from_toml(args.config)
    sd_scripts_argv(cfg, device=args.device)  # checked by sd-scripts' parser; corrections warned about
    files = (
        ("the dataset TOML", dataset_toml_path(cfg), dataset_toml_text(cfg)),
        ("the sample prompts", sample_prompts_path(cfg), sample_prompts_text(cfg)),
    )
    for what, path, text in files:
        if text is not None:
            print(f"# {what} it reads, {path} (not written: `spyke-lora train` writes it):", file=sys.stderr)
            print("\n".join(f"#   {line}" for line in text.splitlines()), file=sys.stderr)
    print(command_line(cfg, device_choice(cfg, args.device)))
    return 0


def _runs_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", type=Path, help="an output_dir, or a folder of them")


def _runs(args: argparse.Namespace) -> int:
    from ._records import RunRecord, runs

    with warnings.catch_warnings(record=True) as said:  # what could not be read, one line each
        warnings.simplefilter("always", SpykeLoraWarning)
        try:
            found = runs(args.folder)
        except ConfigError as e:  # not a folder: said as it is, not as an "invalid configuration"
            raise SpykeLoraError("; ".join(e.problems)) from None
    for warning in said:
        print(f"warning: {warning.message}", file=sys.stderr)
    if not found:
        print(f"no spyke-lora runs in {args.folder}")
        return 0
    print(RunRecord.HEADER)
    for record in found:
        print(record)
    return 0


def _diff_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)


def _diff(args: argparse.Namespace) -> int:
    from ._records import config_diff

    changes = config_diff(args.a, args.b)
    print("\n".join(changes) if changes else "the configs are the same")
    return 0


def _doctor_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", type=Path, nargs="?", help="check for this config (default: the recipe's settings)")


def _doctor(args: argparse.Namespace) -> int:
    from ._doctor import doctor

    report = doctor(TrainConfig.from_toml(args.config) if args.config else None)
    print(report)
    return 0 if report.ok else 1


def _calibrate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    p.add_argument("--resolutions", default="64,128,256,512", metavar="PX,PX,...")
    p.add_argument("--steps", type=int, default=3, help="training steps per point (default 3)")
    p.add_argument("--dir", help="where to build the tiny world and keep the points (default: a temporary folder)")


def _calibrate(args: argparse.Namespace) -> int:
    """Measure this machine's device at each resolution, gradient checkpointing on and off, and keep the fitted
    memory constants for plan() (see docs/memory.md)."""
    from ._calibrate import calibrate
    from ._device import available_devices, resolve_device

    resolutions = _resolutions(args.resolutions)
    if args.steps < 1:
        raise ConfigError(f"--steps must be at least 1, got {args.steps}; the default is 3")
    cuda, mps = available_devices()
    device = resolve_device(args.device, cuda_available=cuda, mps_available=mps)
    with tempfile.TemporaryDirectory(prefix="spyke-lora-calibrate-") as tmp:
        work = Path(args.dir or tmp).expanduser()
        try:
            work.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(
                f"--dir {str(work)!r} cannot be made: {e.strerror or e}; give a writable folder"
            ) from None
        try:
            constants, _ = calibrate(device, work, resolutions=resolutions, steps=args.steps)
        except RuntimeError as e:  # a measuring process failed: its last output is in the message
            raise TrainingError(f"calibration failed: {e}") from e
    on, off = constants.activation_bytes[True], constants.activation_bytes[False]
    print(
        f"{device}: activations {on[0] / 1e3:.1f} kB per latent pixel with gradient checkpointing, "
        f"{off[0] / 1e3:.1f} kB without; plan() uses these figures from now on"
    )
    return 0


def _resolutions(text: str) -> tuple[int, ...]:
    """``--resolutions 64,128,256``: each a multiple of 64, at least 64."""
    try:
        resolutions = tuple(int(r) for r in text.split(","))
    except ValueError:
        resolutions = ()
    if not resolutions or any(r < 64 or r % 64 for r in resolutions):
        raise ConfigError(
            f"--resolutions must be pixel sizes, multiples of 64 separated by commas, got {text!r}; "
            "e.g. --resolutions 64,128,256,512"
        )
    return resolutions


def _compare_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", type=Path, help="the run's output_dir (or its NAME.samples.jsonl)")
    p.add_argument("--name", help="the run's output_name, when the folder holds several runs")
    p.add_argument("--out", type=Path, help="where to write the PNG (default: RUN_DIR/NAME.contact-sheet.png)")
    p.add_argument("--cell", type=int, default=256, metavar="PX", help="size of one sample on the sheet (default 256)")
    text = "training images to find copies of (default: the run's train_dir)"
    p.add_argument("--train-images", type=Path, metavar="DIR", help=text)
    text = "also rank the checkpoints by colour palette (a weak signal; see docs/choosing.md)"
    p.add_argument("--rank", action="store_true", help=text)
    text = "also score every checkpoint for likeness (DINO, CLIP-I, CLIP-T, copies) and recommend one file"
    p.add_argument("--likeness", action="store_true", help=text)
    p.add_argument("--dino", metavar="MODEL", help="DINO model folder or hub id (implies --likeness)")
    p.add_argument("--clip", metavar="MODEL", help="CLIP model folder or hub id (implies --likeness)")
    text = "the word the trigger stands for in the CLIP-T prompt (default: the run's class folder's name)"
    p.add_argument("--class-word", metavar="WORD", help=text)


def _compare(args: argparse.Namespace) -> int:
    """Write the sheet, print its path, every warning, the ranking, and the held-out figures with the recommended
    checkpoint when the run has them. Exit status 0 even with warnings: they are for a person to look at (errors,
    such as no samples, exit 2)."""
    from ._compare import ColourHistogramScorer, check_sheet_folder, review, sheet_layout, write_sheet

    try:
        sheet_layout(1, 1, args.cell)  # a bad --cell is refused before the samples are read
        check_sheet_folder(args.run_dir, args.out)  # and a folder the sheet cannot be written to
        scorer = ColourHistogramScorer() if args.rank else None
        found = _likeness(args)  # first: a missing model is refused before the sheet, the base samples made for it
        rv = review(args.run_dir, args.name, train_images=args.train_images, scorer=scorer)
        path = write_sheet(rv, args.out, args.cell, likeness=found) if rv.columns else None
        chart = _likeness_chart(found) if found is not None else None
    except ConfigError as e:  # no samples, a bad folder: said as it is, not as an "invalid configuration"
        raise SpykeLoraError("; ".join(e.problems)) from None
    if path is not None:
        print(f"contact sheet: {path}")
    else:
        print("contact sheet: none (the run has held-out figures and no samples; see the table below)")
    images, checked = sum(s.images for s in rv.steps), len(rv.train_images)
    print(
        f"{len(rv.steps)} steps x {len(rv.columns)} prompt/CFG columns, {images} images, {checked} training images checked for copies"
    )
    for line in rv.warnings:
        print(f"warning: {line}")
    if rv.ranking is not None:
        print(f"ranking by {rv.scorer} (best first; broken steps last):")
        broken = {s.step for s in rv.steps if s.broken}
        for step, score in rv.ranking:
            print(f"  step {step}: {score:.3f}{'  (broken samples)' if step in broken else ''}")
    table = rv.table()  # the run's held-out figures (NAME.validation.jsonl), when it has them
    if table:
        print(table)
    if rv.recommendation:
        print(rv.recommendation)
    if found is not None:
        print(f"likeness chart: {chart}")
        print(f"likeness (DINO {found.dino_model}, CLIP {found.clip_model}; docs/choosing.md):")
        print(found.table())
    return 0


def _likeness(args: argparse.Namespace) -> Any:
    """``--likeness`` (or ``--dino``/``--clip``): the run scored (:func:`~spyke_lora.likeness`); else None."""
    if not (args.likeness or args.dino or args.clip):
        return None
    from ._likeness import DEFAULT_CLIP, DEFAULT_DINO, LikenessEncoders, likeness, load_clip, load_dino

    encoders = LikenessEncoders(load_dino(args.dino or DEFAULT_DINO), load_clip(args.clip or DEFAULT_CLIP))
    return likeness(
        args.run_dir, name=args.name, train_images=args.train_images, class_word=args.class_word, encoders=encoders
    )


def _likeness_chart(found: Any) -> Path:
    from ._likeness import likeness_chart

    return likeness_chart(found)


def _deploy_arguments(p: argparse.ArgumentParser) -> None:
    comfyui = os.environ.get("COMFYUI_DIR") or None
    p.add_argument("checkpoint", type=Path, help="the LoRA file, e.g. runs/x/NAME-step00000600.safetensors")
    text = "the ComfyUI folder (holds main.py and models/); default: $COMFYUI_DIR"
    p.add_argument("--comfyui", type=Path, default=comfyui, required=comfyui is None, metavar="DIR", help=text)
    p.add_argument("--name", help="the file name in ComfyUI, without .safetensors (default: the run's output_name)")
    p.add_argument("--overwrite", action="store_true", help="replace a different file of that name (kept as a backup)")
    p.add_argument("--config", type=Path, help="the run's config TOML to record (default: NAME.config.toml beside it)")


def _deploy(args: argparse.Namespace) -> int:
    from ._deploy import deploy

    print(deploy(args.checkpoint, args.comfyui, args.name, overwrite=args.overwrite, config=args.config))
    return 0


def _demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", help="where to build the demo (default: a new temporary folder)")
    p.add_argument("--steps", type=int, default=5)


def _demo(args: argparse.Namespace) -> int:
    from ._train import train
    from .tiny_world import build_tiny_world

    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="spyke-lora-demo-"))
    print(f"building the tiny world in {root} (the first time: a random SD1.5 model, about 30 s and 2.1 GB)")
    world = build_tiny_world(root)
    output = root / f"run-{time.strftime('%Y%m%d-%H%M%S')}"
    cfg = world.config(output_dir=output, max_train_steps=args.steps)
    log = output / "sd-scripts.log"
    print(f"training {args.steps} steps; sd-scripts' own output goes to {log}")
    result = train(cfg, callbacks=_printer(sys.stdout), engine_log=log)
    print(f"device {result.device}, mixed precision {result.mixed_precision}")
    print("losses: " + ", ".join(f"{loss:.4f}" for loss in result.losses))
    print("checkpoints:")
    for saved in result.checkpoints:
        print(f"  step {saved.step}: {saved.path}")
    return 0


# --- the table ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Command:
    """One subcommand: ``spyke-lora NAME ...``."""

    name: str
    help: str  # its line in ``spyke-lora --help``
    arguments: Callable[[argparse.ArgumentParser], None]  # adds its arguments to its parser
    run: Callable[[argparse.Namespace], int]  # does it: the parsed arguments in, the exit code out


COMMANDS: tuple[Command, ...] = (
    Command("train", "train the LoRA a TOML config describes", _train_arguments, _train),
    Command("plan", "check a config and show what its run will do, without loading a model", _plan_arguments, _plan),
    Command(
        "sample",
        "sample LoRA files on disk with a config's prompts, CFG scales and seed (as training does)",
        _sample_arguments,
        _sample,
    ),
    Command(
        "validate",
        "the held-out validation loss of LoRA files on disk, as a training run measures it",
        _validate_arguments,
        _validate,
    ),
    Command(
        "argv",
        "print the equivalent sd-scripts command line (and the files it reads, which it does not write)",
        _argv_arguments,
        _argv,
    ),
    Command("runs", "list the runs recorded in a folder: status, steps, loss, duration", _runs_arguments, _runs),
    Command("diff", "what changed between two configs (e.g. two runs' NAME.config.toml)", _diff_arguments, _diff),
    Command(
        "doctor",
        "check this machine: device, precision, engine, disk (exit 1 if it cannot train)",
        _doctor_arguments,
        _doctor,
    ),
    Command(
        "calibrate",
        "measure this machine's memory use per resolution (a few minutes) so plan() predicts it",
        _calibrate_arguments,
        _calibrate,
    ),
    Command(
        "compare",
        "draw a run's samples as a contact sheet (a row per checkpoint) and warn about broken ones",
        _compare_arguments,
        _compare,
    ),
    Command(
        "deploy",
        "check a LoRA file and install it into ComfyUI's models/loras (atomic; backups on --overwrite)",
        _deploy_arguments,
        _deploy,
    ),
    Command("demo", "train a few steps on a tiny, locally generated model and dataset", _demo_arguments, _demo),
)


def _parser() -> argparse.ArgumentParser:
    """``spyke-lora``'s parser: ``--version``, and a subparser per row of :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(prog="spyke-lora", description="Train SD1.5 LoRAs with sd-scripts, in-process.")
    parser.add_argument("--version", action="version", version=f"spyke-lora {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        p = sub.add_parser(command.name, help=command.help)
        command.arguments(p)
        p.set_defaults(run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``spyke-lora`` command.

    Args:
        argv: The command's arguments (default ``sys.argv[1:]``).

    Returns:
        The exit code: 0 done, 1 a run started and failed (or an internal error: an exception that is not a
        :class:`SpykeLoraError`, a bug, printed as one line naming its type; ``SPYKE_LORA_TRACEBACK=1`` raises it
        instead), 2 refused before anything ran (config, dataset, device, engine), 130 interrupted. Errors are
        printed as one line on stderr.
    """
    args = _parser().parse_args(argv)
    try:
        return int(args.run(args))
    except TrainingError as e:  # the run started and failed
        print(f"spyke-lora: error: {e}", file=sys.stderr)
        return 1
    except SpykeLoraError as e:  # refused before anything ran: config, dataset, device, engine
        print(f"spyke-lora: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("spyke-lora: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug: no check foresaw it (every known cause is a SpykeLoraError with its fix)
        if os.environ.get("SPYKE_LORA_TRACEBACK"):
            raise
        text = " ".join(str(e).split()) or "(no message)"
        print(
            f"spyke-lora: internal error: {type(e).__name__}: {text} (a bug in spyke-lora {__version__}: please "
            f"report it, with the command you ran and this line; SPYKE_LORA_TRACEBACK=1 shows the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
