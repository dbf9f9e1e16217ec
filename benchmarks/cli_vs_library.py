"""The same tiny run through the sd-scripts command line and through spyke-lora, side by side; then the measured
defaults, before and after; then two runs in one process.

    .venv/bin/python benchmarks/cli_vs_library.py                      # the full set (about 40 min on 2 CPU cores)
    .venv/bin/python benchmarks/cli_vs_library.py --quick              # CI: 1 repetition, 3 steps, 64 px, no extras
    .venv/bin/python benchmarks/cli_vs_library.py --write docs/benchmarks.md

Each run is a fresh process, started by a fresh measuring process (``_measure.py``: wall time, peak RSS of that one
child, and the moment each step ended, read from sd-scripts' own ``steps:`` progress bar, which both sides print),
through the same prelude (``_child.py``: peak device memory on CUDA and MPS). Kinds alternate within every
repetition, in the reverse order at every other repetition (ABBA), so drift on a shared machine, and what a run
inherits from the one before it, hit every side alike; ratios are library / command line of the same repetition.

* ``command line``: ``python vendor/sd-scripts/train_network.py ARGS``, ARGS being ``spyke-lora argv``'s (the
  engine alone, so the step-time ratio measures only what the library adds);
* ``library``: ``python -m spyke_lora train CONFIG.toml`` (``train()``: preflight, records, events, the guard);
* ``accelerate launch``: ``accelerate launch train_network.py ARGS``, what sd-scripts' README tells users to type
  (a launcher process that starts the trainer as a second process).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

KINDS = ("command line", "library", "accelerate launch")


def measure(cmd: list[str], work: Path, label: str) -> dict:
    log, device_json = work / f"{label}.log", work / f"{label}.device.json"
    child = [sys.executable, str(HERE / "_child.py"), str(device_json), *cmd]
    out = subprocess.run(
        [sys.executable, str(HERE / "_measure.py"), str(log), "--", *child], capture_output=True, text=True, check=True
    )
    result = json.loads(out.stdout)
    if result["code"] != 0:
        raise SystemExit(f"{shlex.join(cmd)} failed ({result['code']}); see {log}")
    ready = [t for k, t in result["step_times"] if k == 0]  # the bar appears: models loaded, latents cached
    times = [t for k, t in result["step_times"] if k >= 1]
    device = json.loads(device_json.read_text()) if device_json.exists() else {}
    row = {
        "wall_s": result["wall_s"],
        "ready_s": ready[0] if ready else float("nan"),
        "first_step_s": times[0] if times else float("nan"),
        "s_per_step": statistics.median(b - a for a, b in zip(times, times[1:])) if len(times) > 2 else float("nan"),
        "peak_rss_mb": result["peak_rss_bytes"] / 2**20,
        "steps": len(times),
    }
    for key in ("cuda_max_allocated_bytes", "mps_driver_bytes"):
        if key in device:
            row["peak_device_mb"] = device[key] / 2**20
    return row


def run_kind(kind: str, cfg, work: Path, label: str, argv_change: Callable[[list[str]], list[str]] | None = None):
    from spyke_lora import sd_scripts_argv
    from spyke_lora._engine import locate_engine, write_dataset_toml

    cfg.output_dir.mkdir(parents=True, exist_ok=True)
    script = str(locate_engine(None) / "train_network.py")
    if kind == "library":
        toml = cfg.to_toml(work / f"{label}.toml")
        row = measure(["-m", "spyke_lora", "train", str(toml)], work, label)
        events = [json.loads(line) for line in (cfg.output_dir / f"{cfg.output_name}.events.jsonl").open()]
        elapsed = [e["elapsed_s"] for e in events if e["event"] == "StepEnded"]
        row["s_per_step_events"] = statistics.median(b - a for a, b in zip(elapsed, elapsed[1:]))
        return row
    write_dataset_toml(cfg)
    argv = sd_scripts_argv(cfg)
    if argv_change is not None:
        argv = argv_change(argv)
    if kind == "accelerate launch":
        launcher = str(Path(sys.executable).with_name("accelerate"))
        # the launcher is the measured child; it starts train_network.py as its own child (peak RSS covers both)
        return measure(
            [
                launcher,
                "launch",
                "--num_processes",
                "1",
                "--num_machines",
                "1",
                "--mixed_precision",
                "no",
                "--dynamo_backend",
                "no",
                script,
                *argv,
            ],
            work,
            label,
        )
    return measure([script, *argv], work, label)


def ratios(rows: dict[str, list[dict]], metric: str, kind: str = "library", base: str = "command line"):
    pairs = [(a[metric], b[metric]) for a, b in zip(rows[base], rows[kind]) if metric in a and metric in b]
    return [b / a for a, b in pairs if a == a and b == b and a]


def fmt(values: list[float], digits: int = 2) -> str:
    return f"{statistics.median(values):.{digits}f}" if values else "n/a"


def compare(world_root: Path, work: Path, resolution: int, steps: int, reps: int, kinds: tuple[str, ...], lines):
    from spyke_lora.tiny_world import build_tiny_world

    world = build_tiny_world(world_root / f"world{resolution}", resolution=resolution)
    rows: dict[str, list[dict]] = {k: [] for k in kinds}
    for rep in range(reps):
        # ABBA: the order flips at every repetition, so what a run inherits from the one before it (the machine
        # reclaiming the last process's 7 GB, the page cache) falls on every kind alike
        for kind in kinds if rep % 2 == 0 else tuple(reversed(kinds)):
            label = f"r{resolution}-{kind.split()[0]}-{rep}"
            cfg = world.config(output_dir=work / label, max_train_steps=steps, save_every_n_steps=None)
            rows[kind].append(run_kind(kind, cfg, work, label))
            print(f"{resolution} px, rep {rep + 1}, {kind}: {rows[kind][-1]}", file=sys.stderr, flush=True)
    lines.append(f"\n### {resolution} px, batch 1, {steps} steps, {reps} repetition(s)\n")
    lines.append(
        "| metric | " + " | ".join(f"{k} (median)" for k in kinds) + " | library / command line: min | median | max |"
    )
    lines.append("|---|" + "---|" * len(kinds) + "---|---|---|")
    metrics = [
        ("s_per_step", "seconds per step (progress bar)"),
        ("ready_s", "time to the training loop, s"),
        ("first_step_s", "time to first step, s"),
        ("wall_s", "wall time, s"),
        ("peak_rss_mb", "peak RSS, MB"),
    ]
    if any("peak_device_mb" in r for r in rows["library"]):
        metrics.append(("peak_device_mb", "peak device memory, MB"))
    for metric, title in metrics:
        r = ratios(rows, metric)
        cells = [fmt([x[metric] for x in rows[k] if metric in x]) for k in kinds]
        spread = f"{min(r):.3f} | {statistics.median(r):.3f} | {max(r):.3f}" if r else "n/a | n/a | n/a"
        lines.append(f"| {title} | " + " | ".join(cells) + f" | {spread} |")
    lib_events = [x["s_per_step_events"] for x in rows["library"]]
    lines.append(
        f"| seconds per step (library events) | - | {fmt(lib_events)} |" + " - |" * (len(kinds) - 2) + " | | |"
    )
    lines.append(
        "\nPer run ("
        + ", ".join(kinds)
        + "): "
        + "; ".join(
            "rep {}: {}".format(
                i + 1,
                " / ".join(
                    f"{rows[k][i]['s_per_step']:.2f} s/step, first step {rows[k][i]['first_step_s']:.1f} s, "
                    f"{rows[k][i]['peak_rss_mb']:.0f} MB"
                    for k in kinds
                ),
            )
            for i in range(reps)
        )
        + "."
    )
    return rows


VARIANTS = {
    # name: (what changes in the command line, what it is)
    "no sdpa (sd-scripts' default attention)": lambda argv: [a for a in argv if a != "--sdpa"],
    "no cached latents (the VAE encodes every step)": lambda argv: [a for a in argv if a != "--cache_latents"],
    "2 data-loader workers": lambda argv: _set(argv, "--max_data_loader_n_workers", "2"),
}


def _set(argv: list[str], flag: str, value: str) -> list[str]:
    i = argv.index(flag)
    return argv[: i + 1] + [value] + argv[i + 2 :]


def defaults(world_root: Path, work: Path, resolution: int, steps: int, reps: int, lines) -> None:
    """Each default against the same command line without it (the engine alone, alternating, same machine)."""
    from spyke_lora.tiny_world import build_tiny_world

    world = build_tiny_world(world_root / f"world{resolution}", resolution=resolution)
    names = ["defaults", *VARIANTS]
    rows: dict[str, list[dict]] = {n: [] for n in names}
    for rep in range(reps):
        for i, name in enumerate(names):
            label = f"d{resolution}-{i}-{rep}"
            cfg = world.config(output_dir=work / label, max_train_steps=steps, save_every_n_steps=None)
            rows[name].append(run_kind("command line", cfg, work, label, VARIANTS.get(name)))
            print(f"defaults {resolution} px, rep {rep + 1}, {name}: {rows[name][-1]}", file=sys.stderr, flush=True)
    lines.append(f"\n### Each default, before and after ({resolution} px, {steps} steps, {reps} repetition(s))\n")
    lines.append(
        "| setting | seconds per step | time to first step, s | wall, s | peak RSS, MB | "
        "step time vs defaults (median ratio) |"
    )
    lines.append("|---|---|---|---|---|---|")
    for name in names:
        r = ratios(rows, "s_per_step", kind=name, base="defaults")
        lines.append(
            f"| {name} | {fmt([x['s_per_step'] for x in rows[name]])} | "
            f"{fmt([x['first_step_s'] for x in rows[name]], 1)} | {fmt([x['wall_s'] for x in rows[name]], 1)} | "
            f"{fmt([x['peak_rss_mb'] for x in rows[name]], 0)} | {fmt(r, 3)} |"
        )


def second_run(world_root: Path, work: Path, resolution: int, steps: int, lines) -> None:
    out = subprocess.run(
        [sys.executable, str(HERE / "second_run.py"), str(world_root), str(work), str(resolution), str(steps)],
        capture_output=True,
        text=True,
        check=True,
    )
    lines.append(out.stdout)


def validation_cost(world_root: Path, resolution: int, steps: int, lines) -> None:
    out = subprocess.run(
        [sys.executable, str(HERE / "validation_cost.py"), str(world_root), str(resolution), str(steps)],
        capture_output=True,
        text=True,
        check=True,
    )
    lines.append(out.stdout)


def machine() -> str:
    import torch

    from spyke_lora._engine import PINNED_VERSION

    cpu = platform.processor() or platform.machine()
    device = (
        torch.cuda.get_device_name(0)
        if torch.cuda.is_available()
        else ("Apple MPS" if torch.backends.mps.is_available() else f"CPU only, {os.cpu_count()} cores")
    )
    try:
        import psutil

        memory = f", {psutil.virtual_memory().total / 2**30:.0f} GiB RAM"
    except ImportError:
        memory = ""
    return (
        f"{platform.system()} {platform.machine()} ({cpu}{memory}), {device}; Python {platform.python_version()}, "
        f"torch {torch.__version__}, sd-scripts {PINNED_VERSION}; {time.strftime('%Y-%m-%d')}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--resolutions", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--quick", action="store_true", help="1 repetition, 3 steps, 64 px, no extras (for CI)")
    parser.add_argument("--no-extras", action="store_true", help="skip the defaults and the second-run sections")
    parser.add_argument("--extras-only", action="store_true", help="only the defaults and the second-run sections")
    parser.add_argument("--write", type=Path, help="also write the Markdown report to this file")
    parser.add_argument("--work", type=Path, help="where runs go (default: a new temporary folder)")
    parser.add_argument(
        "--kinds", default=",".join(KINDS), help="which kinds to run, comma-separated (default: all three)"
    )
    args = parser.parse_args(argv)
    kinds = tuple(k.strip() for k in args.kinds.split(","))
    if args.quick:
        args.reps, args.steps, args.resolutions, args.no_extras = 1, 3, [64], True
    work = args.work or Path(tempfile.mkdtemp(prefix="spyke-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Benchmarks: spyke-lora against the sd-scripts command line",
        "",
        f"Machine: {machine()}.",
        "",
        "Command: `.venv/bin/python benchmarks/cli_vs_library.py "
        + " ".join(argv or sys.argv[1:])
        + "` (see `benchmarks/README.md` for how each figure is taken).",
    ]
    for resolution in [] if args.extras_only else args.resolutions:
        compare(work, work, resolution, args.steps, args.reps, kinds, lines)
    if not args.no_extras:
        defaults(work, work, max(args.resolutions), args.steps, max(1, args.reps - 1), lines)
        second_run(work, work, max(args.resolutions), args.steps, lines)
        validation_cost(work, max(args.resolutions), args.steps, lines)
    report = "\n".join(lines) + "\n"
    print(report)
    if args.write:
        args.write.write_text(report, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
