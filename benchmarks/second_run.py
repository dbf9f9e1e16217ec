"""Two train() runs in one process (a notebook sweep): where the time to the first step goes, run 1 against run 2.

    .venv/bin/python benchmarks/second_run.py WORLD_ROOT WORK RESOLUTION STEPS

Prints a Markdown section. The engine's model loading and latent caching are timed by wrapping sd-scripts'
``NetworkTrainer.load_target_model`` and ``DatasetGroup.new_cache_latents`` for the duration of this script only.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

try:
    import psutil
except ImportError:  # resident memory is then not reported
    psutil = None

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spyke_lora import StepEnded, TrainStarted, train  # noqa: E402
from spyke_lora._engine import host_for  # noqa: E402
from spyke_lora.tiny_world import build_tiny_world  # noqa: E402


def timed(owner, name: str, spent: dict[str, float]):
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            spent[name] = spent.get(name, 0.0) + time.perf_counter() - t

    setattr(owner, name, wrapper)
    return original


def main() -> None:
    world_root, work, resolution, steps = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    world = build_tiny_world(world_root / f"world{resolution}", resolution=resolution)
    host = host_for(None)
    with host.active():
        engine = host.train_network()
    rows = []
    for run in (1, 2):
        spent: dict[str, float] = {}
        marks: dict[str, float] = {}
        trainer, group = engine.NetworkTrainer, engine.train_util.DatasetGroup
        originals = (timed(trainer, "load_target_model", spent), timed(group, "new_cache_latents", spent))

        def watch(event, marks=marks):
            if isinstance(event, TrainStarted):
                marks.setdefault("started", time.perf_counter())
            if isinstance(event, StepEnded):
                marks.setdefault("first_step", time.perf_counter())

        t0 = time.perf_counter()
        cfg = world.config(output_dir=work / f"second-run-{run}", max_train_steps=steps, save_every_n_steps=None)
        result = train(cfg, callbacks=watch, engine_log=work / f"second-run-{run}.engine.log")
        total = time.perf_counter() - t0
        trainer.load_target_model, group.new_cache_latents = originals
        rss = psutil.Process().memory_info().rss / 2**20 if psutil else float("nan")
        rows.append(
            (
                run,
                marks["first_step"] - t0,
                spent.get("load_target_model", 0.0),
                spent.get("new_cache_latents", 0.0),
                marks["started"] - t0,
                total,
                rss,
                result.losses,
            )
        )
    print(f"\n### Two runs in one process ({resolution} px, {steps} steps; `benchmarks/second_run.py`)\n")
    print(
        "| run | time to first step, s | of which: loading the base model | caching latents | "
        "until TrainStarted | whole run, s | resident memory after the run, MB |"
    )
    print("|---|---|---|---|---|---|---|")
    for run, first, load, cache, started, total, rss, _ in rows:
        print(
            f"| {run} | {first:.1f} | {load:.1f} s ({load / first:.0%}) | {cache:.2f} s | {started:.1f} | {total:.1f} "
            f"| {rss:.0f} |"
        )
    same = rows[0][-1] == rows[1][-1]
    print(f"\nThe two runs' losses are {'identical' if same else 'DIFFERENT'} ({len(rows[0][-1])} steps).")


if __name__ == "__main__":
    main()
