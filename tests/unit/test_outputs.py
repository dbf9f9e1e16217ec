from spyke_lora import TrainConfig
from spyke_lora._engine import existing_outputs


def test_existing_outputs_match_sd_scripts_names_only(tmp_path):
    names = [
        "spyke.safetensors",
        "spyke-step00000200.safetensors",
        "spyke-000002.safetensors",  # final, step, epoch
        "spyke_2.safetensors",
        "spyke-old.safetensors",
        "spykey.safetensors",
        "spyke-step.safetensors",
        "spyke_dataset.toml",
    ]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    cfg = TrainConfig(base_model=tmp_path / "m", train_dir=tmp_path / "1_x", output_dir=tmp_path, output_name="spyke")
    assert [p.name for p in existing_outputs(cfg)] == [
        "spyke-000002.safetensors",
        "spyke-step00000200.safetensors",
        "spyke.safetensors",
    ]
    assert existing_outputs(cfg.replace(output_dir=tmp_path / "missing")) == []
