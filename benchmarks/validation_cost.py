"""What held-out validation costs: the time of each validation pass against the time of a training step.

    .venv/bin/python benchmarks/validation_cost.py WORLD_ROOT RESOLUTION STEPS

One ``train()`` with the tiny world's 2 held-out images and a file every 2 steps (so STEPS / 2 passes), in this
process. A pass is timed by wrapping ``HeldOut.loss`` (spyke-lora's validation pass) for the duration of this script
only; the first pass also builds the held-out dataset and caches its latents. Training seconds per step are the gaps
between ``StepEnded`` events that have no pass or save between them. Prints a Markdown section.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spyke_lora import CheckpointSaved, StepEnded, train  # noqa: E402
from spyke_lora._engine import _held_out  # noqa: E402
from spyke_lora.tiny_world import build_tiny_world  # noqa: E402


def main() -> None:
    world_root, resolution, steps = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    world = build_tiny_world(world_root / f"world{resolution}", resolution=resolution)
    passes: list[float] = []
    original = _held_out.HeldOut.loss

    def timed_loss(self, context):
        t = time.perf_counter()
        try:
            return original(self, context)
        finally:
            passes.append(time.perf_counter() - t)

    ends: list[tuple[int, float]] = []
    busy: set[int] = set()  # steps followed by a save and a pass: their gap to the next step is not training alone

    def watch(event):
        if isinstance(event, StepEnded):
            ends.append((event.step, time.perf_counter()))
        elif isinstance(event, CheckpointSaved):
            busy.add(event.step)

    _held_out.HeldOut.loss = timed_loss
    try:
        cfg = world.config(
            output_dir=world_root / f"validation{resolution}",
            max_train_steps=steps,
            save_every_n_steps=2,
            overwrite=True,
            validation_dir=world.validation_dir,
        )
        result = train(cfg, callbacks=watch)
    finally:
        _held_out.HeldOut.loss = original
    gaps = [b - a for (step, a), (_, b) in zip(ends, ends[1:]) if step not in busy]
    step_s = statistics.median(gaps)
    later = passes[1:] or passes
    per_pass = statistics.median(later)
    images = 2
    print(f"\n## What held-out validation costs ({resolution} px)\n")
    print(
        f"One run of {result.steps} steps with {images} held-out images, a pass at every saved file "
        f"({len(passes)} passes: steps {', '.join(str(v.step) for v in result.validations)}).\n"
    )
    print("| | seconds | in training steps |")
    print("|---|---|---|")
    print(f"| a training step (median) | {step_s:.2f} | 1 |")
    print(
        f"| the first pass (builds the held-out dataset, caches its latents) | {passes[0]:.2f} | "
        f"{passes[0] / step_s:.2f} |"
    )
    print(
        f"| a later pass (median of {len(later)}): {images} images x 4 timesteps, no gradients | {per_pass:.2f} | "
        f"{per_pass / step_s:.2f} |"
    )
    print(f"| per held-out image | {per_pass / images:.2f} | {per_pass / images / step_s:.2f} |")


if __name__ == "__main__":
    main()
