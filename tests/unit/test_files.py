"""Writing files whole (spyke_lora._files): the one helper every writer uses."""

import pytest

from spyke_lora import TrainConfig
from spyke_lora._engine._outputs import remove_partial_files
from spyke_lora._files import atomic_path, temporary_name, write_atomically


def test_a_file_is_written_whole_then_renamed(tmp_path):
    final = tmp_path / "sub" / "NAME.config.toml"
    assert write_atomically(final, "a = 1\n") == final
    assert final.read_text() == "a = 1\n"
    write_atomically(final, b"b = 2\n")  # replaces the old file in one rename
    assert final.read_bytes() == b"b = 2\n"
    assert [p.name for p in final.parent.iterdir()] == ["NAME.config.toml"]  # no temporary left


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    final = tmp_path / "sheet.png"
    final.write_bytes(b"the old sheet")
    with pytest.raises(OSError, match="disk full"):
        with atomic_path(final, keep_suffix=True) as temp:
            assert temp.parent == final.parent and temp.name.startswith(".sheet.") and temp.suffix == ".png"
            temp.write_bytes(b"half a she")
            raise OSError("disk full")
    assert final.read_bytes() == b"the old sheet"
    assert [p.name for p in tmp_path.iterdir()] == ["sheet.png"]


def test_temporaries_are_hidden_unique_and_not_listed_as_their_final_type(tmp_path):
    final = tmp_path / "spyke_plasma_v1.safetensors"
    names = {temporary_name(final).name for _ in range(3)}
    assert len(names) == 3  # two threads writing one file never share a temporary
    assert all(n.startswith(".spyke_plasma_v1.safetensors.") and n.endswith(".partial") for n in names)
    assert temporary_name(final, keep_suffix=True).name.endswith(".partial.safetensors")  # sd-scripts needs it


def test_a_killed_runs_temporaries_of_its_output_name_are_cleaned_up_and_no_others(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    cfg = TrainConfig(
        base_model=tmp_path / "m.safetensors", train_dir=tmp_path / "1_x", output_dir=out, output_name="spyke"
    )
    ours = [
        temporary_name(out / "spyke-step00000002.safetensors", keep_suffix=True),
        temporary_name(out / "spyke.safetensors", keep_suffix=True),
        out / ".spyke.4242.partial.safetensors",  # the name earlier versions gave
    ]
    others = [temporary_name(out / "other.safetensors", keep_suffix=True), out / "spyke.safetensors"]
    for path in ours + others:
        path.write_bytes(b"x")
    remove_partial_files(cfg)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in others)
