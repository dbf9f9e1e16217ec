"""The same tiny run through the sd-scripts command line and through spyke-lora, side by side.

    .venv/bin/python benchmarks/cli_vs_library.py [--reps 2] [--steps 5] [--resolution 64]

Runs alternate (command line, library, command line, library, ...), each in a fresh process, and report wall time,
peak resident memory and sd-scripts' own seconds per step (its tqdm rate, parsed from the same kind of output for
both), then the ratios library / command line (min, median, max). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MEASURE = """
import resource, subprocess, sys, time
t = time.perf_counter()
code = subprocess.run(sys.argv[2:], stdout=open(sys.argv[1], "w"), stderr=subprocess.STDOUT).returncode
wall = time.perf_counter() - t
rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(code, wall, rss * (1 if sys.platform == "darwin" else 1024))
"""


def measure(cmd: list[str], log: Path) -> dict[str, float]:
    """Run ``cmd`` as the only child of a fresh measuring process: exact wall time and peak RSS of that child."""
    out = subprocess.run([sys.executable, "-c", MEASURE, str(log), *cmd], capture_output=True, text=True, check=True)
    code, wall, rss = out.stdout.split()
    if int(code) != 0:
        raise SystemExit(f"{shlex.join(cmd)} failed ({code}); see {log}")
    rates = re.findall(r"([\d.]+)s/it", log.read_text(errors="replace"))
    return {"wall_s": float(wall), "peak_rss_mb": int(rss) / 2**20, "s_per_step": float(rates[-1]) if rates else float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--resolution", type=int, default=64)
    args = parser.parse_args()

    from spyke_lora import sd_scripts_argv
    from spyke_lora._engine import locate_engine, write_dataset_toml
    from spyke_lora.tiny_world import build_tiny_world

    work = Path(tempfile.mkdtemp(prefix="spyke-bench-"))
    world = build_tiny_world(work / "world", resolution=args.resolution)
    rows: dict[str, list[dict[str, float]]] = {"command line": [], "library": []}
    for rep in range(args.reps):
        for kind in rows:
            cfg = world.config(output_dir=work / f"{kind[:3]}{rep}", max_train_steps=args.steps, save_every_n_steps=None)
            if kind == "command line":
                write_dataset_toml(cfg)
                cmd = [sys.executable, str(locate_engine(None) / "train_network.py"), *sd_scripts_argv(cfg)]
                log = cfg.output_dir / "run.log"
            else:
                toml = cfg.to_toml(work / f"lib{rep}.toml")
                cmd = [str(Path(sys.executable).with_name("spyke-lora")), "train", str(toml)]
                cmd += ["--engine-log", str(cfg.output_dir / "engine.log")]
                log = work / f"lib{rep}.out"
            cfg.output_dir.mkdir(parents=True, exist_ok=True)
            result = measure(cmd, log)
            if kind == "library":
                result["s_per_step"] = measure_rate(cfg.output_dir / "engine.log")
            rows[kind].append(result)
            print(f"rep {rep + 1} {kind}: {result}", file=sys.stderr, flush=True)

    print(f"Tiny SD1.5 LoRA, {args.resolution} px, batch 1, {args.steps} steps, CPU; "
          f"{platform.machine()} {platform.system()}, Python {platform.python_version()}, {time.strftime('%Y-%m-%d')}\n")  # fmt: skip
    print("| metric | command line (median) | library (median) | ratio min | ratio median | ratio max |")
    print("|---|---|---|---|---|---|")
    for metric in ("wall_s", "peak_rss_mb", "s_per_step"):
        cli = [r[metric] for r in rows["command line"]]
        lib = [r[metric] for r in rows["library"]]
        ratios = [b / a for a, b in zip(cli, lib)]
        print(f"| {metric} | {statistics.median(cli):.2f} | {statistics.median(lib):.2f} | {min(ratios):.3f} | "
              f"{statistics.median(ratios):.3f} | {max(ratios):.3f} |")  # fmt: skip


def measure_rate(log: Path) -> float:
    rates = re.findall(r"([\d.]+)s/it", log.read_text(errors="replace"))
    return float(rates[-1]) if rates else float("nan")


if __name__ == "__main__":
    main()
