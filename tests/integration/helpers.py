"""Helpers for the integration tests."""

import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

from safetensors import safe_open

NAME = "spyke_plasma_v1"
# 3 images x 1 repeat, no regularisation: 3 steps per epoch, so 6 steps are epochs 1 and 2; a cosine schedule
# gives every step its own learning rate.
PROMPTS = ("spyke_plasma_v1, standing in a forest", "spyke_plasma_v1, crouching, looking up")
SHORT = dict(num_repeats=1, reg_dir=None, max_train_steps=6, save_every_n_steps=2)


def read_lora(path):
    """(tensors, metadata) of a LoRA file."""
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def assert_same_tensors(a, b):
    ta, _ = read_lora(a)
    tb, _ = read_lora(b)
    assert ta.keys() == tb.keys()
    for key in ta:
        assert ta[key].dtype == tb[key].dtype, key
        assert (ta[key] == tb[key]).all(), f"{key} differs"


def kill_while_saving(world, out, work):
    """A process training into ``out``, SIGKILLed in the middle of writing step 2's file (its save is made to write
    half a file, then wait). Returns the half-written file's path, and what the folder held right after the kill: the
    temporary file still there, and the LoRA files under a final name (none, if saves are atomic)."""
    config = world.config(output_dir=out).to_toml(work / "run.toml")
    script = work / "slow_save.py"
    script.write_text(
        "import sys, time\n"
        "import safetensors.torch\n"
        "from spyke_lora import TrainConfig, train\n"
        "real = safetensors.torch.save_file\n"
        "def slow(tensors, filename, metadata=None):\n"
        "    real(tensors, filename, metadata)\n"
        "    size = len(open(filename, 'rb').read())\n"
        "    open(filename, 'r+b').truncate(size // 2)  # half written, as a kill mid-write leaves it\n"
        "    print('SAVING', filename, flush=True)\n"
        "    time.sleep(120)\n"
        "safetensors.torch.save_file = slow\n"
        f"train(TrainConfig.from_toml({str(config)!r}))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    child = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env
    )
    partial = None
    try:
        for line in child.stdout:
            if line.startswith("SAVING"):
                partial = Path(line.split(maxsplit=1)[1].strip())
                break
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    return SimpleNamespace(
        partial=partial,
        existed=partial is not None and partial.exists(),
        final_names=sorted(p.name for p in out.glob(f"{NAME}*.safetensors")),
    )
