"""Train the Spyke LoRA from Python: print the device, the loss and the checkpoints; stop cleanly when a time budget
is used up (the LoRA of the last step is saved as spyke_plasma_v1.safetensors).

    .venv/bin/python examples/train_spyke.py examples/spyke.toml
"""

import sys

from spyke_lora import CheckpointSaved, StepEnded, Stop, TrainConfig, TrainStarted, train

BUDGET_S = 60 * 60  # one hour


def watch(event):
    if isinstance(event, TrainStarted):
        # LORA-04: the device and precision, shown before the first step
        print(f"{event.total_steps} steps on {event.device}, mixed precision {event.mixed_precision}")
    elif isinstance(event, StepEnded):
        print(f"step {event.step}/{event.total_steps}  loss {event.loss:.4f}  avg {event.avg_loss:.4f}")
        if event.elapsed_s > BUDGET_S:
            return Stop(f"time budget of {BUDGET_S / 60:.0f} minutes used")
    elif isinstance(event, CheckpointSaved):
        print(f"saved {event.path}")
    return None


if __name__ == "__main__":
    config = TrainConfig.from_toml(sys.argv[1] if len(sys.argv) > 1 else "examples/spyke.toml")
    result = train(config, callbacks=watch)
    print(f"{result.status} after {result.steps} steps: {result.final_path}")
