"""doctor(): the device, precision and engine a run would use, found without loading a model (LORA-04)."""

from spyke_lora import DeviceReport, TrainConfig, doctor
from spyke_lora._cli import main
from spyke_lora._engine._host import PINNED_COMMIT, VENDORED

from .conftest import CUDA_BOX, MPS_MAC


def config(tmp_path, **changes):
    return TrainConfig(
        base_model=tmp_path / "m.safetensors",
        train_dir=tmp_path / "10_spyke_plasma_v1",
        output_dir=tmp_path / "out",
        output_name="spyke_plasma_v1",
        **changes,
    )


def test_a_cpu_only_machine_can_train_on_the_cpu(tmp_path):
    report = doctor(config(tmp_path))  # the conftest's CPU-only machine, whatever this one has
    assert isinstance(report, DeviceReport) and report.ok
    assert (report.device, report.mixed_precision) == ("cpu", "no")
    assert (report.sd_scripts_dir, report.sd_scripts_commit, report.sd_scripts_pinned) == (
        VENDORED,
        PINNED_COMMIT,
        True,
    )
    assert report.mps_fallback_set  # the test process imported spyke_lora before torch
    assert report.free_disk_bytes > 0 and report.total_memory_bytes > 2**30
    assert report.output_dir == tmp_path / "out"  # not created: its nearest existing parent was measured
    assert not (tmp_path / "out").exists()
    text = str(report)
    assert "device          cpu" in text and "mixed precision no" in text and text.endswith("ready to train")


def test_corrections_are_warnings(tmp_path):
    report = doctor(config(tmp_path, mixed_precision="fp16"))
    assert report.ok and report.mixed_precision == "no"
    assert report.warnings == ("mixed_precision 'fp16' changed to 'no' on cpu: mixed precision gains nothing on CPU",)


def test_what_stops_a_run_is_a_problem(tmp_path):
    report = doctor(config(tmp_path, device="mps", sd_scripts_dir=tmp_path))
    assert not report.ok
    assert any("`device` is 'mps' but torch reports MPS unavailable" in p for p in report.problems)
    assert any("`sd_scripts_dir`" in p and "not an sd-scripts checkout" in p for p in report.problems)
    assert str(report).endswith("cannot train: fix the problems above")
    report = doctor(config(tmp_path, optimizer_type="AdamW8bit"))
    assert (report.device, report.mixed_precision) == ("cpu", None)  # the device is known; what it runs is refused
    assert report.problems == (
        "`optimizer_type` 'AdamW8bit' needs bitsandbytes, which runs on CUDA only, and this run is on 'cpu'; "
        "use optimizer_type = 'AdamW'",
    )


def test_doctor_command_exit_codes(tmp_path, capsys):
    assert main(["doctor"]) == 0
    assert "ready to train" in capsys.readouterr().out
    path = config(tmp_path, device="cuda").to_toml(tmp_path / "c.toml")
    assert main(["doctor", str(path)]) == 1
    out = capsys.readouterr().out
    assert "problem: `device` is 'cuda' but torch sees no CUDA GPU" in out


def test_an_mps_mac_trains_on_mps_without_mixed_precision(tmp_path, machine):
    """LORA-04 before a run: on an Apple Silicon Mac, `auto` is mps and the recipe's precision is 'no'."""
    machine(MPS_MAC)
    report = doctor(config(tmp_path, mixed_precision="fp16"))
    assert report.ok and (report.device, report.mixed_precision) == ("mps", "no")
    assert (report.mps_built, report.mps_available, report.cuda_available) == (True, True, False)
    assert report.warnings[0] == ("mixed_precision 'fp16' changed to 'no' on mps: fp16 mixed precision requires a GPU")
    assert "mps             built yes, available yes" in str(report) and "device          mps" in str(report)


def test_an_uncalibrated_mac_is_told_to_calibrate(tmp_path, machine, monkeypatch):
    machine(MPS_MAC)
    monkeypatch.setenv("SPYKE_LORA_CACHE", str(tmp_path / "cache"))
    report = doctor(config(tmp_path))
    assert report.ok and "plan()'s memory figures for mps are estimates" in report.warnings[-1]
    assert "`spyke-lora calibrate` measures this machine" in report.warnings[-1]
    assert "memory model    an estimate from the CPU's measurements: MPS has not been calibrated" in str(report)
    machine(CUDA_BOX.__class__("2.14.1", False, False, False, None))  # a CPU-only machine: measured constants
    cpu = doctor(config(tmp_path))
    assert "memory model    measured on a Linux CPU" in str(cpu) and not any("estimates" in w for w in cpu.warnings)


def test_a_cuda_machine_keeps_fp16(tmp_path, machine):
    machine(CUDA_BOX)
    report = doctor(config(tmp_path))
    assert report.ok and (report.device, report.mixed_precision) == ("cuda", "fp16")
    assert "cuda            NVIDIA H100 80GB HBM3" in str(report)
    assert doctor(config(tmp_path, device="mps")).problems[0].startswith("`device` is 'mps' but torch reports MPS")
