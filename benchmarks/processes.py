"""One process against two (issue 15): the same number of training samples, in-process or in 2 CPU processes started
by accelerate's launcher (``train(cfg, processes=2)``), on the tiny world.

    python benchmarks/processes.py --work /tmp/bench-processes [--samples 8] [--reps 2] [--write report.md]

Each run is a fresh Python process (``_one`` mode); the runs alternate (1, 2, 2, 1, ...) so that whatever drifts on the
machine hits both sides alike. Per run: wall time from the process's start, the time to ``TrainStarted`` (models
loaded: with 2 processes, the launcher's start and two loads sharing the cores), the time to the first step, and
the training throughput in samples per second from the first step to the last (so loading is left out). The
launcher's overhead is the difference in time to ``TrainStarted``; the throughput ratio is what 2 processes buy.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path


def one(processes: int, samples: int, work: Path, out: Path) -> None:
    """One run, in this process: ``samples`` training samples in ``processes`` processes; timings to ``out``."""
    import psutil

    started = psutil.Process().create_time()
    from spyke_lora import StepEnded, TrainStarted, train
    from spyke_lora.tiny_world import build_tiny_world

    world = build_tiny_world(work / "world")
    steps = samples // processes
    cfg = world.config(
        output_dir=work / f"out-{processes}-{time.time_ns()}", max_train_steps=steps, save_every_n_steps=None
    )
    marks: dict[str, float] = {}
    step_times: list[float] = []

    def clock(event):
        if isinstance(event, TrainStarted):
            marks["ready"] = time.time()
        elif isinstance(event, StepEnded):
            step_times.append(time.time())

    result = train(cfg, clock, processes=processes)
    ended = time.time()
    timed = len(step_times) - 1  # steps after the first one
    out.write_text(
        json.dumps(
            {
                "processes": processes,
                "steps": result.steps,
                "samples": result.steps * processes,
                "wall_s": ended - started,
                "ready_s": marks["ready"] - started,
                "first_step_s": step_times[0] - started,
                "samples_per_s": timed * processes / (step_times[-1] - step_times[0]) if timed else None,
                "peak_rank0_mb": (result.peak_memory_bytes or 0) / 2**20,
            }
        )
    )


_PROBE = """from accelerate import PartialState
state = PartialState()  # joins the gloo group when launched
print(state.process_index, state.num_processes)
"""


def launcher_overhead(work: Path, reps: int) -> list[str]:
    """The launcher alone: ``accelerate launch --multi_gpu --num_processes 2`` of two trivial workers (import
    accelerate, join the gloo group) against one such process run directly; alternating."""
    from spyke_lora import Launch
    from spyke_lora._launch import launch_command

    probe = work / "launcher_probe.py"
    probe.write_text(_PROBE)
    env = dict(__import__("os").environ, ACCELERATE_USE_CPU="true")
    direct, launched = [], []
    for _ in range(reps):
        t = time.perf_counter()
        subprocess.run([sys.executable, str(probe)], check=True, env=env, capture_output=True)
        direct.append(time.perf_counter() - t)
        t = time.perf_counter()
        subprocess.run(
            launch_command(Launch(processes=2), "no", [str(probe)]), check=True, env=env, capture_output=True
        )
        launched.append(time.perf_counter() - t)
    return [
        f"\nThe launcher alone ({reps} alternating repetitions): two trivial workers through `accelerate launch "
        f"--multi_gpu --num_processes 2` took {', '.join(f'{x:.1f}' for x in launched)} s; one such process run "
        f"directly {', '.join(f'{x:.1f}' for x in direct)} s (medians {statistics.median(launched):.1f} against "
        f"{statistics.median(direct):.1f} s)."
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--samples", type=int, default=8, help="training samples per run (default 8)")
    parser.add_argument("--reps", type=int, default=2, help="repetitions of each side (default 2)")
    parser.add_argument("--write", type=Path, help="write the Markdown report here too")
    parser.add_argument("--launcher-only", action="store_true", help="only time the launcher with trivial workers")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.launcher_only:
        print("\n".join(launcher_overhead(args.work, max(3, args.reps))))
        return
    rows: dict[int, list[dict]] = {1: [], 2: []}
    for rep in range(args.reps):
        for processes in (1, 2) if rep % 2 == 0 else (2, 1):
            out = args.work / f"run-{rep}-{processes}.json"
            subprocess.run(
                [sys.executable, __file__, "_one", str(processes), str(args.samples), str(args.work), str(out)],
                check=True,
                stdout=subprocess.DEVNULL,
            )
            rows[processes].append(json.loads(out.read_text()))
            print(f"rep {rep + 1}, {processes} process(es): {rows[processes][-1]}", file=sys.stderr, flush=True)
    lines = [
        f"### {args.samples} samples at 64 px, 1 process against 2 (CPU, gloo), {args.reps} repetition(s)\n",
        "| metric | 1 process (median) | 2 processes (median) | 2 / 1 (median of paired ratios) |",
        "|---|---|---|---|",
    ]
    for key, title in (
        ("wall_s", "wall time, s"),
        ("ready_s", "time to TrainStarted, s"),
        ("first_step_s", "time to first step, s"),
        ("samples_per_s", "training samples per s"),
        ("peak_rank0_mb", "peak memory of rank 0, MB"),
    ):
        a, b = [r[key] for r in rows[1]], [r[key] for r in rows[2]]
        paired = [y / x for x, y in zip(a, b) if x and y]
        lines.append(
            f"| {title} | {statistics.median(a):.2f} | {statistics.median(b):.2f} | {statistics.median(paired):.3f} |"
        )
    overhead = [y["ready_s"] - x["ready_s"] for x, y in zip(rows[1], rows[2])]
    lines.append(
        f"\nLauncher overhead (time to TrainStarted, 2 processes minus 1): {', '.join(f'{o:+.1f} s' for o in overhead)}"
    )
    lines += launcher_overhead(args.work, max(3, args.reps))
    report = "\n".join(lines) + "\n"
    print(report)
    if args.write:
        args.write.write_text(report)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_one":
        one(int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]), Path(sys.argv[5]))
    else:
        main()
