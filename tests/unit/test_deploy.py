"""deploy(): checks a LoRA file, installs it into a fake ComfyUI folder atomically, never loses the file it replaces."""

import json
import os
import re
import struct
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from spyke_lora import SpykeLoraWarning, TrainConfig
from spyke_lora._cli import main
from spyke_lora._deploy import BACKUP_DIR, DeployResult, deploy
from spyke_lora._errors import DeployError

MODULE = "lora_unet_down_blocks_0_attentions_0_proj_in"
TE_MODULE = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
META = {
    "ss_output_name": "spyke_plasma_v1",
    "ss_steps": "600",
    "ss_epoch": "3",
    "ss_sd_model_name": "base.safetensors",
    "ss_new_sd_model_hash": "ab" * 32,
    "ss_sd_model_hash": "12345678",
    "ss_network_dim": "4",
    "ss_network_alpha": "2.0",
    "ss_network_module": "networks.lora",
    "ss_training_comment": "None",
    "ss_training_finished_at": "1700000000.5",
    "sshs_model_hash": "cd" * 32,
}

# ComfyUI folder_paths.supported_pt_extensions; get_filename_list("loras") walks every subfolder (hidden ones too,
# only ".git" is skipped) and keeps the files whose os.path.splitext extension, lower-cased, is one of these.
COMFYUI_EXTENSIONS = {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}


def comfyui_lists(loras: Path) -> list[str]:
    """What ComfyUI's LoRA loader would offer from ``loras`` (its recursive_search + filter_files_extensions)."""
    found = []
    for folder, dirs, files in os.walk(loras, followlinks=True):
        dirs[:] = [d for d in dirs if d != ".git"]
        found += [os.path.relpath(os.path.join(folder, f), loras) for f in files]
    return sorted(f for f in found if os.path.splitext(f)[-1].lower() in COMFYUI_EXTENSIONS)


def write_lora(path: Path, *, scale: float = 1.0, metadata=None, extra=None, drop=()) -> Path:
    tensors = {
        f"{MODULE}.lora_down.weight": torch.full((4, 8), 0.01 * scale),
        f"{MODULE}.lora_up.weight": torch.full((8, 4), 0.02 * scale),
        f"{MODULE}.alpha": torch.tensor(2.0),
        f"{TE_MODULE}.lora_down.weight": torch.full((4, 8), 0.03 * scale),
        f"{TE_MODULE}.lora_up.weight": torch.zeros((8, 4)),
        f"{TE_MODULE}.alpha": torch.tensor(2.0),
        **(extra or {}),
    }
    for key in drop:
        del tensors[key]
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=dict(META if metadata is None else metadata))
    return path


@pytest.fixture
def comfy(tmp_path):
    root = tmp_path / "ComfyUI"
    (root / "models" / "checkpoints").mkdir(parents=True)
    (root / "main.py").write_text("# ComfyUI\n")
    return root


@pytest.fixture
def lora(tmp_path):
    return write_lora(tmp_path / "runs" / "spyke" / "spyke_plasma_v1-step00000600.safetensors")


def loras_files(comfy: Path) -> list[str]:
    return sorted(str(p.relative_to(comfy / "models" / "loras")) for p in (comfy / "models" / "loras").rglob("*"))


def test_installs_the_file_with_its_sidecar(comfy, lora):
    result = deploy(lora, comfy)
    final = comfy / "models" / "loras" / "spyke_plasma_v1.safetensors"
    assert isinstance(result, DeployResult)
    assert (result.path, result.status, result.step, result.backup) == (final, "installed", 600, None)
    assert final.read_bytes() == lora.read_bytes()
    assert loras_files(comfy) == ["spyke_plasma_v1.safetensors", "spyke_plasma_v1.spyke-lora.json"]  # no temp left
    assert comfyui_lists(comfy / "models" / "loras") == ["spyke_plasma_v1.safetensors"]
    record = json.loads(result.sidecar.read_text())
    assert record["name"] == "spyke_plasma_v1" and record["source"] == str(lora)
    assert record["sha256"] == result.sha256 and len(result.sha256) == 64
    assert record["size"] == lora.stat().st_size and (record["step"], record["epoch"]) == (600, 3)
    assert record["base_model"] == {"name": "base.safetensors", "hash": "ab" * 32, "path": None}
    assert record["network"] == {"module": "networks.lora", "dim": 4, "alpha": 2.0}
    assert record["training_comment"] is None and record["training_finished_at"] == "2023-11-14T22:13:20+00:00"
    assert record["config"] is None and record["config_path"] is None and record["backup"] is None
    assert record["installed_at"].endswith("+00:00") and record["spyke_lora_version"]
    assert str(result) == f"installed {final.name} (step 600, sha256 {result.sha256[:8]}) in {final.parent}"


def test_the_same_file_again_is_unchanged(comfy, lora):
    first = deploy(lora, comfy)
    sidecar_before = first.sidecar.read_text()
    again = deploy(lora, comfy)
    assert (again.status, again.sha256, again.backup) == ("unchanged", first.sha256, None)
    assert again.sidecar.read_text() == sidecar_before  # same provenance: not rewritten, install time kept
    assert "is already installed" in str(again) and "nothing copied" in str(again)


def test_unchanged_refreshes_a_stale_sidecar(comfy, lora, tmp_path):
    first = deploy(lora, comfy)
    installed_at = json.loads(first.sidecar.read_text())["installed_at"]
    TrainConfig(
        base_model=tmp_path / "base.safetensors",
        train_dir=tmp_path / "10_x",
        output_dir=lora.parent,
        output_name="spyke_plasma_v1",
    ).to_toml(lora.parent / "spyke_plasma_v1.config.toml")
    again = deploy(lora, comfy)
    record = json.loads(again.sidecar.read_text())
    assert again.status == "unchanged" and record["config"]["output_name"] == "spyke_plasma_v1"
    assert record["installed_at"] == installed_at


def test_a_different_file_is_refused_without_overwrite(comfy, lora, tmp_path):
    first = deploy(lora, comfy)
    installed = first.path.read_bytes()
    other = write_lora(
        tmp_path / "other" / "spyke_plasma_v1-step00000800.safetensors", scale=2.0, metadata={**META, "ss_steps": "800"}
    )
    with pytest.raises(DeployError) as e:
        deploy(other, comfy)
    text = str(e.value)
    assert "already exists and is a different file" in text
    assert f"sha256 {first.sha256[:8]}, step 600" in text and "step 800" in text
    assert "overwrite=True (--overwrite)" in text
    assert first.path.read_bytes() == installed
    assert loras_files(comfy) == ["spyke_plasma_v1.safetensors", "spyke_plasma_v1.spyke-lora.json"]


def test_overwrite_keeps_the_old_file_as_a_backup_comfyui_does_not_list(comfy, lora, tmp_path):
    first = deploy(lora, comfy)
    old = first.path.read_bytes()
    other = write_lora(tmp_path / "other.safetensors", scale=2.0, metadata={**META, "ss_steps": "800"})
    result = deploy(other, comfy, overwrite=True)
    assert (result.status, result.step, result.path) == ("replaced", 800, first.path)
    assert result.path.read_bytes() == other.read_bytes()
    assert result.backup is not None and result.backup.read_bytes() == old
    assert result.backup.parent == comfy / "models" / "loras" / BACKUP_DIR
    assert result.backup.name.startswith("spyke_plasma_v1.") and result.backup.name.endswith(
        f".{first.sha256[:8]}.safetensors.bak"
    )
    assert comfyui_lists(comfy / "models" / "loras") == ["spyke_plasma_v1.safetensors"]  # the backup is not offered
    assert json.loads(result.sidecar.read_text())["backup"] == str(result.backup)
    old_sidecar = result.backup.with_name(result.backup.name.replace(".safetensors.bak", ".spyke-lora.json"))
    assert json.loads(old_sidecar.read_text())["sha256"] == first.sha256  # the old provenance went with it
    assert "replaced spyke_plasma_v1.safetensors (step 800" in str(result) and str(result.backup) in str(result)


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_a_failed_copy_leaves_no_temp_file(comfy, lora, monkeypatch, failing):
    real = getattr(os, failing)

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, failing, boom)
    with pytest.raises(DeployError, match="could not install .*No space left on device.*no partial file remains"):
        deploy(lora, comfy)
    monkeypatch.setattr(os, failing, real)
    assert loras_files(comfy) == []  # models/loras was made, nothing is in it


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_a_failed_overwrite_keeps_the_old_file(comfy, lora, tmp_path, monkeypatch, failing):
    first = deploy(lora, comfy)
    old = first.path.read_bytes()
    other = write_lora(tmp_path / "other.safetensors", scale=3.0)
    calls = {"n": 0}
    real = getattr(os, failing)

    def fail_late(*args, **kwargs):  # the last call of the install (replace: temp -> final; fsync: of the new copy)
        calls["n"] += 1
        if failing == "fsync" or calls["n"] >= 3:  # replace: 1 = backup temp -> backup, 2 = sidecar copy, 3 = final
            raise OSError(5, "Input/output error")
        return real(*args, **kwargs)

    monkeypatch.setattr(os, failing, fail_late)
    with pytest.raises(DeployError, match="could not install"):
        deploy(other, comfy, overwrite=True)
    monkeypatch.setattr(os, failing, real)
    assert first.path.read_bytes() == old  # still in place
    leftovers = [f for f in loras_files(comfy) if f.endswith(".partial")]
    assert leftovers == []
    assert comfyui_lists(comfy / "models" / "loras") == ["spyke_plasma_v1.safetensors"]


def test_not_a_comfyui_folder(tmp_path, lora):
    (tmp_path / "stuff").mkdir()
    with pytest.raises(DeployError) as e:
        deploy(lora, tmp_path / "stuff")
    assert "must be a ComfyUI folder, but it has no models/ folder" in str(e.value)
    with pytest.raises(DeployError, match="but it does not exist"):
        deploy(lora, tmp_path / "nowhere")
    (tmp_path / "stuff" / "models").mkdir()
    with pytest.raises(DeployError, match=r"it has models/ but none of main.py, comfy/, custom_nodes/"):
        deploy(lora, tmp_path / "stuff")
    assert not (tmp_path / "stuff" / "models" / "loras").exists()


def test_a_portable_install_or_the_models_folder_gets_a_hint(tmp_path, lora, comfy):
    portable = tmp_path / "portable"
    (portable / "ComfyUI").mkdir(parents=True)
    (portable / "ComfyUI" / "models").mkdir()
    (portable / "ComfyUI" / "comfy").mkdir()
    with pytest.raises(DeployError, match=f"try --comfyui {portable / 'ComfyUI'}"):
        deploy(lora, portable)
    with pytest.raises(DeployError, match=f"try --comfyui {comfy}$"):
        deploy(lora, comfy / "models")


def test_custom_nodes_alone_is_enough(tmp_path, lora):
    root = tmp_path / "c"
    (root / "models").mkdir(parents=True)
    (root / "custom_nodes").mkdir()
    assert deploy(lora, root).status == "installed"
    assert (root / "models" / "loras" / "spyke_plasma_v1.safetensors").is_file()


def test_missing_file(comfy, tmp_path):
    with pytest.raises(DeployError, match=r"`checkpoint` '.*nope.safetensors' does not exist; check the path"):
        deploy(tmp_path / "nope.safetensors", comfy)


@pytest.mark.parametrize(
    "content, message",
    [
        # a PNG: its signature read as a little-endian length is 0x0a1a0a0d474e5089, far over the 100 MiB limit
        (
            b"\x89PNG\r\n\x1a\n" + bytes(range(56)),
            re.escape(f"got a header length of {0x0A1A0A0D474E5089} in a 64-byte file (not safetensors, or cut short)"),
        ),
        # a plausible length, but the file ends before the header does
        (
            struct.pack("<Q", 100) + b'{"a": ' + b" " * 50,
            re.escape("got a header length of 100 in a 64-byte file (not safetensors, or cut short)"),
        ),
        # a pickle starts with its protocol opcode 0x80 (what os.urandom(64) gave one time in 256)
        (b"\x80\x02}q\x00.", "must be a .safetensors file, got a pickle checkpoint"),
        (b"abc", "must be a .safetensors file, got 3 bytes"),
        (struct.pack("<Q", 4) + b"{{{{", "got a header that is not JSON"),
    ],
    ids=["png", "cut-short-header", "pickle", "3-bytes", "not-json"],
)
def test_not_safetensors(comfy, tmp_path, content, message):
    path = tmp_path / "x.safetensors"
    path.write_bytes(content)
    with pytest.raises(DeployError, match=message):
        deploy(path, comfy)
    assert not (comfy / "models" / "loras").exists()


def test_truncated(comfy, lora):
    data = lora.read_bytes()
    lora.write_bytes(data[:-10])
    with pytest.raises(DeployError, match=r"is truncated or corrupt: its header promises \d+ bytes, got \d+"):
        deploy(lora, comfy)


def test_a_base_model_is_not_a_lora(comfy, tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"model.diffusion_model.x": torch.zeros(2), f"{MODULE}.lora_down.weight": torch.zeros(4, 8)}, str(path))
    with pytest.raises(DeployError) as e:
        deploy(path, comfy)
    assert "must be a kohya-format LoRA" in str(e.value) and "'model.diffusion_model.x'" in str(e.value)


def test_a_down_without_its_up_is_refused(comfy, tmp_path):
    path = write_lora(tmp_path / "x.safetensors", drop=[f"{TE_MODULE}.lora_up.weight"])
    with pytest.raises(DeployError, match=f"got 1 module.s. with only one: {TE_MODULE}"):
        deploy(path, comfy)
    path = tmp_path / "alphas.safetensors"
    save_file({f"{MODULE}.alpha": torch.tensor(1.0)}, str(path))
    with pytest.raises(DeployError, match="at least one lora_down/lora_up weight pair, got only alpha"):
        deploy(path, comfy)


def test_dora_scale_and_te1_keys_are_accepted(comfy, tmp_path):
    extra = {
        "lora_te1_text_model_x.lora_down.weight": torch.ones(2, 2),
        "lora_te1_text_model_x.lora_up.weight": torch.ones(2, 2),
        f"{MODULE}.dora_scale": torch.ones(1, 8),
    }
    assert deploy(write_lora(tmp_path / "d.safetensors", extra=extra), comfy).status == "installed"


def test_nan_weights_are_refused(comfy, tmp_path):
    nan = torch.full((4, 8), 0.01)
    nan[0, 0] = float("nan")
    path = write_lora(tmp_path / "x.safetensors", extra={f"{MODULE}.lora_down.weight": nan.half()})
    with pytest.raises(DeployError, match=f"NaN or infinite values in 1 tensor.s.: {MODULE}.lora_down.weight; .*"):
        deploy(path, comfy)
    assert not (comfy / "models" / "loras").exists()


@pytest.mark.parametrize("bad", ["", "a/b", "..\\x", ".hidden", "  ", ".safetensors"])
def test_bad_names_are_refused(comfy, lora, bad):
    with pytest.raises(DeployError, match="`name` must be a plain file stem"):
        deploy(lora, comfy, bad)


def test_name_and_its_suffix(comfy, lora, tmp_path):
    assert deploy(lora, comfy, "spyke_v2.safetensors").path.name == "spyke_v2.safetensors"
    bare = write_lora(tmp_path / "bare" / "plain_file.safetensors", metadata={"format": "pt"})
    with pytest.warns(SpykeLoraWarning, match="no sd-scripts metadata"):
        result = deploy(bare, comfy)
    assert result.path.name == "plain_file.safetensors" and result.step is None
    assert "(sha256 " in str(result)
    assert json.loads(result.sidecar.read_text())["base_model"] == {"name": None, "hash": None, "path": None}


def test_the_run_config_next_to_the_checkpoint_is_recorded(comfy, lora, tmp_path):
    cfg = TrainConfig(
        base_model=tmp_path / "base.safetensors",
        train_dir=tmp_path / "10_spyke_plasma_v1",
        output_dir=lora.parent,
        output_name="spyke_plasma_v1",
        network_dim=4,
    )
    toml = cfg.to_toml(lora.parent / "spyke_plasma_v1.config.toml")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = deploy(lora, comfy)
    record = json.loads(result.sidecar.read_text())
    assert record["config_path"] == str(toml)
    assert record["config"] == cfg.to_dict() and record["config"]["network_dim"] == 4
    assert record["base_model"]["path"] == str(tmp_path / "base.safetensors")


def test_an_explicit_config(comfy, lora, tmp_path):
    cfg = TrainConfig(
        base_model=tmp_path / "b.safetensors", train_dir=tmp_path / "10_x", output_dir=tmp_path, output_name="x"
    )
    record = json.loads(deploy(lora, comfy, config=cfg).sidecar.read_text())
    assert record["config"]["output_name"] == "x" and record["config_path"] is None
    with pytest.raises(DeployError, match="`config` .* does not exist"):
        deploy(lora, comfy, config=tmp_path / "missing.toml")


def test_cli(comfy, lora, tmp_path, capsys, monkeypatch):
    assert main(["deploy", str(lora), "--comfyui", str(comfy), "--name", "spyke_plasma_v1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("installed spyke_plasma_v1.safetensors (step 600, sha256 ")

    other = write_lora(tmp_path / "o.safetensors", scale=5.0)
    assert main(["deploy", str(other), "--comfyui", str(comfy)]) == 2  # refused: nothing was installed
    err = capsys.readouterr().err
    assert err.startswith("spyke-lora: error: ") and "--overwrite" in err
    monkeypatch.setenv("COMFYUI_DIR", str(comfy))  # the default folder
    assert main(["deploy", str(other), "--overwrite"]) == 0
    assert capsys.readouterr().out.startswith("replaced spyke_plasma_v1.safetensors")


def test_cli_needs_comfyui_without_the_environment(monkeypatch, lora, capsys):
    monkeypatch.delenv("COMFYUI_DIR", raising=False)
    with pytest.raises(SystemExit):
        main(["deploy", str(lora)])
    assert "--comfyui" in capsys.readouterr().err


def test_importing_deploy_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, spyke_lora._deploy; print('torch' in sys.modules, 'safetensors' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
