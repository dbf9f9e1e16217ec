"""Measure peak memory and seconds per step at 64, 128, 256 and 512 px with gradient checkpointing on and off, and
fit the memory model's constants (``spyke_lora._memory``) to them.

    .venv/bin/python benchmarks/memory_model.py measure WORK [--reps 64=1,128=1,256=3,512=3] [--steps ...]
    .venv/bin/python benchmarks/memory_model.py report WORK [--write docs/benchmarks.md]

``measure`` runs every point as a fresh process (``python -m spyke_lora._calibrate_point``), gradient
checkpointing on and off alternating within every repetition, and appends one JSON line per run to
``WORK/points.jsonl`` (a run that is interrupted loses only itself). ``report`` fits the model to those lines,
prints the predicted against the measured peak at every point, and the speed gain of turning checkpointing off
(median seconds per step of each run, steps after the first).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # cli_vs_library, _measure

DEFAULT_REPS = "64=1,128=1,256=3,512=3"
DEFAULT_STEPS = "64=4,128=4,256=6,512=4"


def _mapping(text: str) -> dict[int, int]:
    return {int(k): int(v) for k, v in (item.split("=") for item in text.split(","))}


def measure(work: Path, reps: dict[int, int], steps: dict[int, int], device: str) -> None:
    work.mkdir(parents=True, exist_ok=True)
    lines = work / "points.jsonl"
    for resolution, count in reps.items():
        for rep in range(count):
            for gc in ("on", "off"):
                out = work / f"point-{resolution}-{gc}-{rep}.json"
                cmd = [
                    sys.executable,
                    "-m",
                    "spyke_lora._calibrate_point",
                    str(work),
                    str(resolution),
                    gc,
                    str(steps[resolution]),
                    str(out),
                    "--device",
                    device,
                ]
                with (work / f"point-{resolution}-{gc}-{rep}.log").open("w") as log:
                    subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=True)
                figures = json.loads(out.read_text())
                figures["rep"] = rep
                with lines.open("a") as f:
                    f.write(json.dumps(figures) + "\n")
                print(
                    f"{resolution} px, gc {gc}, rep {rep + 1}: peak {figures['peak_bytes'] / 2**30:.2f} GiB, "
                    f"s/step {statistics.median(figures['step_s'][1:] or figures['step_s']):.2f}",
                    file=sys.stderr,
                    flush=True,
                )


def speed(work: Path, resolution: int, steps: int, reps: int) -> list[dict]:
    """The speed target: the library's default config (gradient checkpointing "auto", cached latents) against the
    seed's command (the sd-scripts command line with gradient checkpointing on and no cached latents), alternating,
    each a fresh process measured by ``_measure.py`` (seconds per step from sd-scripts' own progress bar)."""
    from cli_vs_library import run_kind

    from spyke_lora.tiny_world import build_tiny_world

    world = build_tiny_world(work / f"world{resolution}", resolution=resolution)
    rows = []
    for rep in range(reps):
        for kind in ("seed command", "library default"):
            label = f"speed-{resolution}-{kind.split()[0]}-{rep}"
            cfg = world.config(output_dir=work / label, max_train_steps=steps, save_every_n_steps=None)
            if kind == "seed command":
                cfg = cfg.replace(gradient_checkpointing=True, cache_latents=False)
                row = run_kind("command line", cfg, work, label)
            else:
                row = run_kind("library", cfg, work, label)
            row.update(kind=kind, rep=rep, resolution=resolution)
            rows.append(row)
            with (work / "speed.jsonl").open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(
                f"{resolution} px, rep {rep + 1}, {kind}: {row['s_per_step']:.2f} s/step", file=sys.stderr, flush=True
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("measure")
    m.add_argument("work", type=Path)
    m.add_argument("--reps", default=DEFAULT_REPS)
    m.add_argument("--steps", default=DEFAULT_STEPS)
    m.add_argument("--device", default="cpu")
    r = sub.add_parser("report")
    r.add_argument("work", type=Path)
    r.add_argument("--write", type=Path)
    v = sub.add_parser("speed")
    v.add_argument("work", type=Path)
    v.add_argument("--resolution", type=int, default=256)
    v.add_argument("--steps", type=int, default=8)
    v.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    if args.command == "measure":
        measure(args.work, _mapping(args.reps), _mapping(args.steps), args.device)
    elif args.command == "speed":
        speed(args.work, args.resolution, args.steps, args.reps)
    else:
        report(args.work, args.write)


def _gib(value: float) -> str:
    return f"{value / 2**30:.2f}"


def report(work: Path, write: Path | None) -> None:
    """The fit, the predicted against the measured peak at every point, the speed gain of checkpointing off, and the
    speed target (when ``speed`` has run)."""
    from spyke_lora._memory import CPU, fit, predict
    from spyke_lora._memory import point_shape as _shape
    from spyke_lora._memory._predict import SD15_FP16

    points = [json.loads(line) for line in (work / "points.jsonl").open()]
    fitted = fit(points, SD15_FP16, "cpu")
    lines = [
        "### Fitted constants (`spyke_lora/_memory/_predict.py` `CPU`)",
        "",
        f"runtime {fitted.runtime_bytes:,} B, loading overhead {fitted.load_overhead_bytes:,} B, training overhead "
        f"{fitted.train_overhead_bytes:,} B; activations per latent pixel (linear, squared): checkpointing on "
        f"{fitted.activation_bytes[True][0]:.1f}, {fitted.activation_bytes[True][1]:.4f}; off "
        f"{fitted.activation_bytes[False][0]:.1f}, {fitted.activation_bytes[False][1]:.4f}",
        "",
    ]
    lines += [
        "| px | checkpointing | runs | measured peak, GiB (median) | predicted, GiB (built-in constants) | error | "
        "phase | loading peak, GiB | training peak, GiB: measured | predicted | error | s/step (median of runs) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    worst = 0.0
    groups: dict[tuple[int, bool], list[dict]] = {}
    for p in points:
        groups.setdefault((p["resolution"], p["gradient_checkpointing"]), []).append(p)
    speeds: dict[tuple[int, bool], float] = {}
    for (resolution, gc), runs in sorted(groups.items()):
        measured = statistics.median(r["peak_bytes"] for r in runs)
        prediction = predict(_shape(runs[0], 5), SD15_FP16, CPU)
        error = prediction.peak_bytes / measured - 1
        worst = max(worst, abs(error))
        step = statistics.median(statistics.median(r["step_s"][1:] or r["step_s"]) for r in runs)
        training = statistics.median(r["train_peak_bytes"] for r in runs)
        speeds[(resolution, gc)] = step
        lines.append(
            f"| {resolution} | {'on' if gc else 'off'} | {len(runs)} | {_gib(measured)} | {_gib(prediction.peak_bytes)} "
            f"| {error:+.1%} | {prediction.phase} | {_gib(statistics.median(r['load_peak_bytes'] for r in runs))} "
            f"| {_gib(training)} | {_gib(prediction.phases['training'])} "
            f"| {prediction.phases['training'] / training - 1:+.1%} | {step:.2f} |"
        )
    lines += ["", f"Largest error: {worst:.1%} of the measured peak.", ""]
    lines += ["| px | rep | checkpointing on, s/step | off, s/step | on / off |", "|---|---|---|---|---|"]
    for resolution in sorted({r for r, _ in speeds}):
        # the runs in the order they ran: on, off within every repetition (alternating)
        ons = [p for p in points if p["resolution"] == resolution and p["gradient_checkpointing"]]
        offs = [p for p in points if p["resolution"] == resolution and not p["gradient_checkpointing"]]
        ratios = []
        for rep, (on, off) in enumerate(zip(ons, offs)):
            a, b = (statistics.median(x["step_s"][1:] or x["step_s"]) for x in (on, off))
            ratios.append(a / b)
            lines.append(f"| {resolution} | {rep + 1} | {a:.2f} | {b:.2f} | {a / b:.2f}x |")
        lines.append(f"| {resolution} | median | | | **{statistics.median(ratios):.2f}x** |")
    speed_file = work / "speed.jsonl"
    if speed_file.exists():
        rows = [json.loads(line) for line in speed_file.open()]
        seed = [r for r in rows if r["kind"] == "seed command"]
        lib = [r for r in rows if r["kind"] == "library default"]
        ratios = [a["s_per_step"] / b["s_per_step"] for a, b in zip(seed, lib)]
        lines += ["", "| run | seed command, s/step | library default, s/step | speed-up |", "|---|---|---|---|"]
        lines += [
            f"| rep {i + 1} | {a['s_per_step']:.2f} | {b['s_per_step']:.2f} | {a['s_per_step'] / b['s_per_step']:.2f}x |"
            for i, (a, b) in enumerate(zip(seed, lib))
        ]
        lines.append(
            f"| median | {statistics.median(r['s_per_step'] for r in seed):.2f} | "
            f"{statistics.median(r['s_per_step'] for r in lib):.2f} | {statistics.median(ratios):.2f}x |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if write:
        write.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
