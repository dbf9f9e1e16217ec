"""The memory model, the device's budget, gradient_checkpointing = "auto" and memory_limit: pure logic, with the
budget and the calibrations injected (no run, no device)."""

import dataclasses
import json
import struct

import pytest

from spyke_lora import ConfigError, TrainConfig, plan
from spyke_lora._config import parse_size
from spyke_lora._memory import (
    AUTO_MARGIN,
    CPU,
    ESTIMATE_MARGIN,
    SD15_FP16,
    MemoryBudget,
    RunShape,
    constants_for,
    device_budget,
    fit,
    load_calibrations,
    memory_plan,
    predict,
    read_model_size,
)

GB = 10**9


def write_sd15_sized(path):
    """A header-valid safetensors file with SD1.5's parameter counts (fp16): sparse, so it takes no disk."""
    tensors, offset = {}, 0
    for name, count in (
        ("model.diffusion_model.input_blocks.0.0.weight", 320 * 4 * 3 * 3),
        ("model.diffusion_model.rest", SD15_FP16.unet - 320 * 4 * 3 * 3),
        ("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight", SD15_FP16.text_encoder),
        ("first_stage_model.all", SD15_FP16.vae),
    ):
        shape = [320, 4, 3, 3] if name.endswith("0.0.weight") else [count]
        tensors[name] = {"dtype": "F16", "shape": shape, "data_offsets": [offset, offset + 2 * count]}
        offset += 2 * count
    header = json.dumps(tensors).encode()
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + offset)
    return path


@pytest.fixture
def sd15(good, tmp_path):
    return good.replace(base_model=write_sd15_sized(tmp_path / "sd15.safetensors"), sample_prompts=())


def shape(**changes):
    base = RunShape(
        resolution=512,
        batch_size=1,
        gradient_checkpointing=True,
        mixed_precision="no",
        cache_latents=True,
        images=123,
        network_dim=32,
        optimizer="AdamW",
    )
    return dataclasses.replace(base, **changes)


def test_sizes_are_read_as_bytes():
    assert parse_size("12GB") == 12 * GB
    assert parse_size("11.5GiB") == int(11.5 * 2**30)
    assert parse_size("800 MB") == 800 * 10**6
    assert parse_size(123) == 123
    assert parse_size("twelve") is None and parse_size(True) is None


def test_config_memory_fields(good):
    assert TrainConfig.__dataclass_fields__["gradient_checkpointing"].default == "auto"
    assert good.replace(memory_limit="12GB").memory_limit == 12 * GB
    with pytest.raises(ConfigError, match=r"`memory_limit` must be a number of bytes or a size such as '12GB'.*'lots'"):
        good.replace(memory_limit="lots")
    with pytest.raises(ConfigError, match=r"`gradient_checkpointing` must be true, false or 'auto', got 'yes'"):
        good.replace(gradient_checkpointing="yes")


def test_the_model_size_comes_from_the_header(sd15):
    size = read_model_size(sd15.base_model)
    assert (size.unet, size.text_encoder, size.vae, size.unet_channels) == (
        SD15_FP16.unet,
        SD15_FP16.text_encoder,
        SD15_FP16.vae,
        320,
    )
    assert size.file_tensor_bytes == 2 * (SD15_FP16.unet + SD15_FP16.text_encoder + SD15_FP16.vae)


def test_the_peak_is_the_highest_phase_and_its_parts_add_up():
    p = predict(shape(), SD15_FP16, CPU)
    parts = p.parts
    assert p.phases["loading"] == parts["runtime"] + parts["loading"]
    assert p.phases["training"] == (
        parts["runtime"]
        + parts["weights"]
        + parts["lora_and_optimizer"]
        + parts["latents"]
        + parts["activations"]
        + parts["overhead"]
    )
    assert p.peak_bytes == max(p.phases.values())
    assert parts["weights"] == 4 * (SD15_FP16.unet + SD15_FP16.text_encoder + SD15_FP16.vae)
    assert parts["latents"] == 123 * 4 * 64 * 64 * 4
    assert parts["sampling"] == 0 and p.phases["sampling"] == 0


def test_what_each_setting_does_to_the_prediction():
    on, off = predict(shape(), SD15_FP16, CPU), predict(shape(gradient_checkpointing=False), SD15_FP16, CPU)
    assert off.parts["activations"] > on.parts["activations"]
    batch4 = predict(shape(batch_size=4), SD15_FP16, CPU)
    assert batch4.parts["activations"] == pytest.approx(4 * on.parts["activations"], rel=1e-6)
    low = predict(shape(resolution=256), SD15_FP16, CPU)
    assert low.parts["activations"] < on.parts["activations"] / 3
    cuda = constants_for("cuda", {})
    fp16 = predict(shape(mixed_precision="fp16", full_precision_vae=False), SD15_FP16, cuda)
    assert fp16.parts["weights"] == 2 * (SD15_FP16.unet + SD15_FP16.text_encoder)  # the VAE is back on the CPU
    assert fp16.parts["runtime"] == 0
    sampled = predict(shape(sample_size=512), SD15_FP16, CPU)
    assert sampled.parts["sampling"] > 0 and sampled.phases["sampling"] > 0


def test_mps_and_cuda_figures_are_estimates_until_calibrated():
    mps = constants_for("mps", {})
    assert not mps.calibrated and "spyke-lora calibrate" in mps.source and not mps.resident
    measured = dataclasses.replace(mps, calibrated=True, source="calibrated")
    assert constants_for("mps", {"mps": measured}) is measured
    assert constants_for("cpu", {}) is CPU and CPU.calibrated


def test_the_budget_of_each_device_is_read_from_its_own_reader():
    readers = dict(
        available_ram=lambda: 9 * GB,
        total_ram=lambda: 16 * GB,
        mps_recommended=lambda: 11 * GB,
        cuda_free=lambda: 70 * GB,
        resident=lambda: 2 * GB,
    )
    # the CPU: what is available, plus what this process holds (the run's figures count the whole process)
    assert device_budget("cpu", **readers) == MemoryBudget(
        11 * GB, "available RAM plus this process's own (psutil)", 16 * GB
    )
    assert device_budget("mps", **readers).bytes == 11 * GB
    assert "recommended_max_memory" in device_budget("mps", **readers).source
    assert device_budget("cuda", **readers).bytes == 70 * GB
    limited = device_budget("mps", **readers).limited(8 * GB)
    assert limited.bytes == 8 * GB and "memory_limit" in limited.source
    assert device_budget("mps", **readers).limited(20 * GB).bytes == 11 * GB


def test_auto_turns_checkpointing_off_when_the_run_fits(sd15):
    cfg = sd15.replace(resolution=512)
    without = memory_plan(
        cfg.replace(gradient_checkpointing=False),
        "cpu",
        "no",
        5,
        budget=MemoryBudget(10**15, "x"),
        calibrated={},
        resident=0,
    )
    budget = int(without.peak_bytes * AUTO_MARGIN) + 1
    chosen = memory_plan(cfg, "cpu", "no", 5, budget=MemoryBudget(budget, "injected"), calibrated={}, resident=0)
    assert chosen.gradient_checkpointing is False
    assert chosen.reason.startswith("auto: off (faster)") and chosen.peak_bytes == without.peak_bytes


def test_auto_turns_checkpointing_on_when_the_run_does_not_fit(sd15):
    cfg = sd15.replace(resolution=512)
    without = memory_plan(
        cfg.replace(gradient_checkpointing=False),
        "cpu",
        "no",
        5,
        budget=MemoryBudget(10**15, "x"),
        calibrated={},
        resident=0,
    )
    budget = int(without.peak_bytes * AUTO_MARGIN) - 1
    chosen = memory_plan(cfg, "cpu", "no", 5, budget=MemoryBudget(budget, "injected"), calibrated={}, resident=0)
    assert chosen.gradient_checkpointing is True
    assert chosen.reason.startswith("auto: on: without it the peak would be")
    assert chosen.phases["training"] < without.phases["training"]
    unknown = memory_plan(cfg, "cpu", "no", 5, budget=MemoryBudget(None, "nothing"), calibrated={}, resident=0)
    assert unknown.gradient_checkpointing is True and "cannot be read" in unknown.reason


def test_an_explicit_setting_is_kept_whatever_the_budget(sd15):
    on = memory_plan(sd15.replace(gradient_checkpointing=True), "cpu", "no", 5, budget=MemoryBudget(10**15, "x"))
    assert on.gradient_checkpointing is True and on.reason == "set in the config (gradient_checkpointing = true)"


def test_plan_reports_memory_and_the_argv_follows_the_choice(sd15):
    roomy = plan(sd15, memory_budget=MemoryBudget(10**15, "injected"))
    assert roomy.gradient_checkpointing is False and "--gradient_checkpointing" not in roomy.argv
    assert roomy.memory.budget_bytes == 10**15 and roomy.memory.peak_bytes > 6 * GB
    text = str(roomy)
    assert "memory          peak" in text and "gradient checkpointing off: auto: off (faster)" in text
    tight = plan(sd15, memory_budget=MemoryBudget(int(roomy.memory.peak_bytes * 1.1), "injected"))
    assert tight.gradient_checkpointing is True and "--gradient_checkpointing" in tight.argv


def test_a_run_over_the_budget_is_a_warning_with_fixes(sd15):
    cfg = sd15.replace(gradient_checkpointing=False, train_batch_size=8, resolution=512, enable_bucket=True)
    roomy = plan(cfg, memory_budget=MemoryBudget(10**15, "injected"))
    training = roomy.memory.phases["training"]
    planned = plan(cfg, memory_budget=MemoryBudget(training - 1, "injected"))
    (warning,) = [w for w in planned.warnings if "predicted peak memory" in w]
    assert "may swap" in warning and "fix: gradient_checkpointing = true (peak" in warning
    assert "fix: train_batch_size = " in warning
    assert planned.memory.fixes and not planned.memory.fits
    assert planned.memory.phases["training"] > planned.memory.phases["loading"]
    loading = plan(sd15, memory_budget=MemoryBudget(roomy.memory.phases["loading"] - 1, "injected"))
    assert loading.memory.fixes == (
        f"loading the base model alone needs {loading.memory.phases['loading'] / 2**30:.2f} GiB: use an fp16 "
        f"checkpoint without EMA weights (about 2 GB for SD1.5), or free memory (close other programs)",
    )


def test_memory_limit_refuses_before_anything_is_loaded(sd15):
    cfg = sd15.replace(gradient_checkpointing=False, memory_limit="5GB", output_dir=sd15.output_dir / "new")
    with pytest.raises(ConfigError, match=r"predicted peak memory .* is above `memory_limit` 4.66 GiB.*fix: "):
        plan(cfg, memory_budget=MemoryBudget(10**15, "injected"))
    assert not cfg.output_dir.exists()


def test_fit_recovers_the_constants_that_made_the_points():
    truth = dataclasses.replace(
        CPU, train_overhead_bytes=250_000_000, activation_bytes={True: (30_000.0, 0.0), False: (120_000.0, 0.0)}
    )
    points = []
    for resolution in (64, 128, 256, 512):
        for gc in (True, False):
            p = predict(shape(resolution=resolution, gradient_checkpointing=gc, images=5), SD15_FP16, truth)
            points.append(
                {
                    "resolution": resolution,
                    "gradient_checkpointing": gc,
                    "runtime_bytes": truth.runtime_bytes,
                    "load_peak_bytes": p.phases["loading"],
                    "train_peak_bytes": p.phases["training"],
                }
            )
    fitted = fit(points, SD15_FP16, "cpu")
    assert fitted.train_overhead_bytes == pytest.approx(250_000_000, rel=1e-3)
    assert fitted.activation_bytes[True][0] == pytest.approx(30_000, rel=1e-3)
    assert fitted.activation_bytes[False][0] == pytest.approx(120_000, rel=1e-3)
    assert fitted.load_overhead_bytes == pytest.approx(truth.load_overhead_bytes, abs=2)


def test_a_calibration_file_is_what_plan_uses(tmp_path, monkeypatch):
    monkeypatch.setenv("SPYKE_LORA_CACHE", str(tmp_path))
    measured = dataclasses.replace(constants_for("mps", {}), calibrated=True, source="calibrated on this Mac")
    (tmp_path / "memory-mps.json").write_text(json.dumps({"constants": measured.to_json(), "points": []}))
    (tmp_path / "memory-cuda.json").write_text("not json")
    assert load_calibrations() == {"mps": measured}


def test_an_uncalibrated_mac_keeps_checkpointing_on_until_it_is_measured(sd15):
    cfg = sd15.replace(resolution=512)
    mac = MemoryBudget(int(10.67 * 2**30), "torch.mps.recommended_max_memory()", 16 * 2**30)
    estimated = memory_plan(cfg, "mps", "no", 123, budget=mac, calibrated={})
    assert estimated.estimate and estimated.gradient_checkpointing is True
    assert "(an estimate: MPS is not calibrated)" in estimated.reason and "spyke-lora calibrate" in estimated.reason
    assert estimated.parts["runtime"] == 0 and estimated.host_loading_bytes > 6 * GB
    measured = dataclasses.replace(constants_for("mps", {}), calibrated=True, source="calibrated on this Mac")
    calibrated = memory_plan(cfg, "mps", "no", 123, budget=mac, calibrated={"mps": measured})
    assert not calibrated.estimate
    assert calibrated.gradient_checkpointing is not (
        memory_plan(
            cfg.replace(gradient_checkpointing=False), "mps", "no", 123, budget=mac, calibrated={"mps": measured}
        ).peak_bytes
        * AUTO_MARGIN
        <= mac.bytes
    )
    text = "\n".join(estimated.lines())
    assert "(estimate)" in text and "has not been calibrated on this machine" in text


def test_on_the_cpu_what_the_process_holds_is_the_runs_runtime(sd15):
    fresh = memory_plan(sd15, "cpu", "no", 5, budget=MemoryBudget(10**15, "x"), calibrated={}, resident=0)
    assert fresh.parts["runtime"] == CPU.runtime_bytes
    kernel = memory_plan(sd15, "cpu", "no", 5, budget=MemoryBudget(10**15, "x"), calibrated={}, resident=3 * GB)
    assert kernel.parts["runtime"] == 3 * GB and kernel.peak_bytes == fresh.peak_bytes + 3 * GB - CPU.runtime_bytes
    mps = memory_plan(sd15, "mps", "no", 5, budget=MemoryBudget(10**15, "x"), calibrated={}, resident=3 * GB)
    assert mps.parts["runtime"] == 0  # the allocator's figures: the host process is not on the GPU


def test_calibrate_measures_each_point_fits_and_writes_what_plan_reads(tmp_path, monkeypatch):
    """The orchestration of `spyke-lora calibrate` with the measuring process replaced by one that writes the figures
    a known model gives (the real measuring process runs in tests/integration/test_memory.py)."""
    from spyke_lora import _calibrate

    monkeypatch.setenv("SPYKE_LORA_CACHE", str(tmp_path / "cache"))
    truth = dataclasses.replace(
        constants_for("mps", {}),
        calibrated=True,
        train_overhead_bytes=123_000_000,
        load_overhead_bytes=10_000_000,
        activation_bytes={True: (50_000.0, 0.0), False: (200_000.0, 0.0)},
    )
    commands = []

    def fake_run(cmd):
        commands.append(cmd)
        resolution, gc, out = int(cmd[4]), cmd[5] == "on", cmd[7]
        p = predict(shape(resolution=resolution, gradient_checkpointing=gc, images=5), SD15_FP16, truth)
        figures = {
            "resolution": resolution,
            "gradient_checkpointing": gc,
            "runtime_bytes": 600_000_000,
            "device_load_peak_bytes": p.phases["loading"],
            "device_peak_bytes": p.phases["training"],
            "peak_bytes": 7 * GB,
        }
        if "--sample" in cmd:  # the sampling phase of that point, as the true constants make it
            sampled = predict(shape(resolution=resolution, images=5, sample_size=resolution), SD15_FP16, truth)
            figures["device_sample_peak_bytes"] = sampled.phases["sampling"]
        open(out, "w").write(json.dumps(figures))

    monkeypatch.setattr(
        "spyke_lora._calibrate.build_tiny_world",
        lambda root, resolution: type("W", (), {"base_model": tmp_path / "unused"})(),
    )
    monkeypatch.setattr("spyke_lora._calibrate.read_model_size", lambda path: SD15_FP16)
    said = []
    constants, points = _calibrate.calibrate(
        "mps", tmp_path / "work", resolutions=(128, 512), steps=2, report=said.append, run=fake_run
    )
    assert [(c[4], c[5], c[6]) for c in commands] == [
        ("128", "on", "2"),
        ("128", "off", "2"),
        ("512", "on", "2"),
        ("512", "off", "2"),
    ]
    assert [c[8:10] for c in commands] == [["--device", "mps"]] * 4
    assert [("--sample" in c) for c in commands] == [False, False, True, False]  # the largest, checkpointed point
    assert constants.sampling_bytes_per_latent_pixel == pytest.approx(truth.sampling_bytes_per_latent_pixel, rel=1e-3)
    assert constants.calibrated and not constants.resident and constants.runtime_bytes == 0
    assert constants.activation_bytes[False][0] == pytest.approx(200_000, rel=1e-3)
    assert constants.train_overhead_bytes == pytest.approx(123_000_000, rel=1e-3)
    assert load_calibrations() == {"mps": constants}
    assert said[0] == "measuring 128 px, gradient checkpointing on ..." and said[-1].startswith("wrote ")


def test_a_calibration_point_marks_the_peak_of_each_phase_of_its_run(tmp_path, monkeypatch):
    """`python -m spyke_lora._calibrate_point`'s figures, with the run replaced by its events (loading ends at
    TrainStarted, training at the final file, sampling after it); the real point runs in tests/integration."""
    from spyke_lora import _calibrate_point
    from spyke_lora.events import CheckpointSaved, StepEnded, TrainStarted

    asked = {}

    class Config:
        def replace(self, **changes):
            asked["sample"] = changes
            return self

    class World:
        def config(self, **changes):
            asked["config"] = changes
            return Config()

    def fake_train(cfg, callback, engine_log):
        asked["engine_log"] = engine_log
        callback(TrainStarted(2, "cpu", "no", tmp_path))
        callback(StepEnded(1, 2, 1, 0.25, 0.25, 1e-4, 5e-5, 1.0))
        callback(StepEnded(2, 2, 1, 0.25, 0.25, 1e-4, 5e-5, 2.0))
        callback(CheckpointSaved(2, 1, tmp_path / "spyke_plasma_v1.safetensors", True))

    monkeypatch.setattr(_calibrate_point, "build_tiny_world", lambda root, resolution: World())
    monkeypatch.setattr(_calibrate_point, "train", fake_train)
    figures = _calibrate_point.measure(tmp_path, 64, True, 2, sample=True)
    assert asked["config"]["max_train_steps"] == 2 and asked["config"]["gradient_checkpointing"] is True
    assert asked["sample"]["sample_steps"] == 2 and asked["engine_log"] is None
    assert set(figures) == {
        "resolution",
        "gradient_checkpointing",
        "steps",
        "batch_size",
        "device",
        "runtime_bytes",
        "load_peak_bytes",
        "loaded_bytes",
        "train_peak_bytes",
        "device_train_peak_bytes",
        "sample_peak_bytes",
        "device_sample_peak_bytes",
        "peak_bytes",
        "step_s",
    }
    phases = (figures["load_peak_bytes"], figures["train_peak_bytes"], figures["sample_peak_bytes"])
    assert all(p > 0 for p in phases) and figures["peak_bytes"] >= max(phases)
    assert len(figures["step_s"]) == 1 and figures["step_s"][0] >= 0


def _points_as_a_mac_measures_them(truth, keep_training_peak=True):
    """The figures `python -m spyke_lora._calibrate_point` writes on MPS for calibrate's points, made by ``truth``:
    the run's ``device_peak_bytes`` is the larger of training and (for the sampled point) sampling."""
    points = []
    for resolution in (64, 128, 256, 512):
        for gc in (True, False):
            trained = predict(shape(resolution=resolution, gradient_checkpointing=gc, images=5), SD15_FP16, truth)
            point = {
                "resolution": resolution,
                "gradient_checkpointing": gc,
                "runtime_bytes": 600_000_000,
                "device_load_peak_bytes": trained.phases["loading"],
                "device_train_peak_bytes": trained.phases["training"],
                "device_peak_bytes": trained.phases["training"],
            }
            if resolution == 512 and gc:  # calibrate samples the largest checkpointed point's final file
                sampled = predict(
                    shape(resolution=resolution, gradient_checkpointing=gc, images=5, sample_size=resolution),
                    SD15_FP16,
                    truth,
                )
                point["device_sample_peak_bytes"] = sampled.phases["sampling"]
                point["device_peak_bytes"] = max(trained.phases["training"], sampled.phases["sampling"])
            if not keep_training_peak:  # a calibration file written before the training phase's peak was kept
                del point["device_train_peak_bytes"]
            points.append(point)
    return points


@pytest.mark.parametrize("keep_training_peak", [True, False], ids=["training peak kept", "older file"])
def test_calibrating_a_mac_fits_the_training_phase_not_sampling(keep_training_peak):
    """Points a Mac measures from exactly the built-in estimate fit back to the estimate: the sampled point's
    sampling peak (above its training peak at 512 px with checkpointing on) is not fitted as training. Before the
    fix the checkpointing-on quadratic term came out 57.5 B/px^2 instead of 0, and a 640 px run on a 16 GB Mac was
    told it needs 8.57 GiB instead of 6.74."""
    truth = dataclasses.replace(constants_for("mps", {}), calibrated=True)
    points = _points_as_a_mac_measures_them(truth, keep_training_peak)
    sampled = next(p for p in points if "device_sample_peak_bytes" in p)
    assert sampled["device_sample_peak_bytes"] > sampled.get("device_train_peak_bytes", 0)  # the case that broke
    fitted = fit(points, SD15_FP16, "mps")
    assert fitted.activation_bytes[True][1] == pytest.approx(0.0, abs=1e-3)
    assert fitted.activation_bytes[True][0] == pytest.approx(truth.activation_bytes[True][0], rel=1e-3)
    assert fitted.activation_bytes[False][0] == pytest.approx(truth.activation_bytes[False][0], rel=1e-3)
    assert fitted.sampling_bytes_per_latent_pixel == pytest.approx(truth.sampling_bytes_per_latent_pixel, rel=1e-3)
    for resolution in (384, 640, 768):
        run = shape(resolution=resolution, gradient_checkpointing=True, images=123, sample_size=512)
        assert predict(run, SD15_FP16, fitted).peak_bytes == pytest.approx(
            predict(run, SD15_FP16, truth).peak_bytes, rel=1e-3
        )


def test_a_calibration_point_keeps_the_training_phases_own_device_peak(tmp_path, monkeypatch):
    """On MPS and CUDA the point records the training phase's device peak beside the run's (which sampling may
    set), so the fit can read the phase it models."""
    from spyke_lora import _calibrate_point

    phases = iter([(200, 3_000), (300, 5_000)])  # (resident, device) at the final file, then at the end

    class Poller:
        def mark(self):
            return next(phases)

    figures: dict = {}
    recorder = _calibrate_point._Phases(Poller(), figures, "mps", True, torch=None)
    from spyke_lora.events import CheckpointSaved

    recorder(CheckpointSaved(2, 1, tmp_path / "x.safetensors", True))
    done = recorder.finish()
    assert done["device_train_peak_bytes"] == 3_000 and done["device_sample_peak_bytes"] == 5_000
    assert done["device_peak_bytes"] == 5_000


@pytest.mark.parametrize("resolution", [128, 256, 320, 512, 640])
def test_an_uncalibrated_16gb_mac_keeps_checkpointing_on_at_every_size(sd15, resolution):
    """docs/memory.md: "A 16 GB Mac keeps checkpointing on until `spyke-lora calibrate` has measured it". At 256 px
    the estimate without it (5.32 GiB) is within half the 10.67 GiB budget by 0.3 %: the 2x margin turned it off
    there before; an uncalibrated Mac now keeps it on at every size, and says why."""
    mac = MemoryBudget(int(10.67 * 2**30), "torch.mps.recommended_max_memory()", 16 * 2**30)
    estimated = memory_plan(sd15.replace(resolution=resolution), "mps", "no", 123, budget=mac, calibrated={})
    assert estimated.gradient_checkpointing is True
    assert estimated.reason.startswith("auto: on until this Mac is calibrated: without it the peak would be ")
    assert "swaps" in estimated.reason and "`spyke-lora calibrate`" in estimated.reason


def test_the_estimate_margin_edge_on_an_uncalibrated_gpu(sd15):
    """On an uncalibrated CUDA device `auto` turns checkpointing off exactly when twice the estimate without it fits
    the budget: a byte less and it stays on. A calibrated Mac decides with the 1.25x margin like the CPU."""
    without = memory_plan(
        sd15.replace(gradient_checkpointing=False), "cuda", "no", 123, budget=MemoryBudget(10**15, "x"), calibrated={}
    ).peak_bytes
    edge = int(without * ESTIMATE_MARGIN)
    at_edge = memory_plan(sd15, "cuda", "no", 123, budget=MemoryBudget(edge, "x"), calibrated={})
    below = memory_plan(sd15, "cuda", "no", 123, budget=MemoryBudget(edge - 1, "x"), calibrated={})
    assert at_edge.gradient_checkpointing is False and below.gradient_checkpointing is True
    assert "with the 2x margin" in at_edge.reason and "with the 2x margin" in below.reason
    measured = dataclasses.replace(constants_for("mps", {}), calibrated=True, source="calibrated on this Mac")
    mac_without = memory_plan(
        sd15.replace(gradient_checkpointing=False),
        "mps",
        "no",
        123,
        budget=MemoryBudget(10**15, "x"),
        calibrated={"mps": measured},
    ).peak_bytes
    mac_edge = int(mac_without * AUTO_MARGIN)
    calibrated = memory_plan(sd15, "mps", "no", 123, budget=MemoryBudget(mac_edge, "x"), calibrated={"mps": measured})
    assert calibrated.gradient_checkpointing is False and "with the 1.25x margin" in calibrated.reason
