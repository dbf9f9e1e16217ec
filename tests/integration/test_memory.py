"""The memory model against a real run (issue 14): one measuring process (what `spyke-lora calibrate` and
benchmarks/memory_model.py run at each point), and the prediction of its peak from the built-in CPU constants."""

import json
import subprocess
import sys

import pytest

from spyke_lora._memory import CPU, predict, training_residual
from spyke_lora._memory import point_shape as _shape
from spyke_lora._memory._predict import read_model_size
from spyke_lora.tiny_world import build_tiny_world


def test_a_measured_point_is_within_15_percent_of_the_prediction(tmp_path):
    out = tmp_path / "point.json"
    subprocess.run(
        [sys.executable, "-m", "spyke_lora._calibrate_point", str(tmp_path), "64", "off", "2", str(out)],
        check=True,
        capture_output=True,
    )
    point = json.loads(out.read_text())
    assert point["resolution"] == 64 and point["gradient_checkpointing"] is False and len(point["step_s"]) == 1
    # the phases in order: the runtime, the loading peak (state dict and fp32 models at once), then training on the
    # loaded model, and the process's own peak (getrusage) is the highest of them
    assert point["runtime_bytes"] < point["loaded_bytes"] < point["load_peak_bytes"] <= point["peak_bytes"]
    assert point["train_peak_bytes"] <= point["peak_bytes"]
    model = read_model_size(build_tiny_world(tmp_path / "world64", resolution=64).base_model)
    predicted = predict(_shape(point, 5), model, CPU)
    assert predicted.phase == "loading"
    assert predicted.peak_bytes == pytest.approx(point["peak_bytes"], rel=0.15)
    assert predicted.phases["training"] == pytest.approx(point["train_peak_bytes"], rel=0.15)
    # what the fit sees of this point: the training peak less runtime, weights, LoRA and latents, i.e. the fixed
    # overhead plus 64 latent pixels of activations: a few hundred MB, as the built-in constants say
    residual = training_residual(point, model, CPU, 5)
    assert residual == pytest.approx(CPU.train_overhead_bytes + 64 * CPU.activation_bytes[False][0], abs=300e6)
