"""Issue 22, group 3: captions as sd-scripts reads them (its own ``read_caption`` and ``process_caption``).

Each case builds a small dataset (conftest's ``good``: 3 training images captioned "spyke_plasma_v1, red disc", 2
regularisation images captioned "person"), changes one caption file, and asserts what ``plan()`` says: the file,
what was found, and the fix; a caption sd-scripts cannot read never gets past ``plan()`` as a raw exception.
"""

from __future__ import annotations

import pytest

from spyke_lora import ConfigError, plan
from spyke_lora._cli import main

TRAINS = "spyke_plasma_v1, red disc"


def problems(cfg) -> tuple[str, ...]:
    with pytest.raises(ConfigError) as info:
        plan(cfg)
    return info.value.problems


def caption_messages(messages) -> list[str]:
    return [m for m in messages if "caption" in m]


# --- captions sd-scripts cannot read (it raises UnicodeDecodeError / AssertionError) ----------------------------
@pytest.mark.parametrize(
    ("data", "found"),
    [
        (TRAINS.encode("utf-16"), "UTF-16 LE, with a byte-order mark"),
        (TRAINS.encode("utf-16-le"), "UTF-16 LE, without a byte-order mark"),
        (TRAINS.encode("utf-16-be"), "UTF-16 BE, without a byte-order mark"),
        (b"\xfe\xff" + TRAINS.encode("utf-16-be"), "UTF-16 BE, with a byte-order mark"),
        (TRAINS.encode("utf-32"), "UTF-32"),
        ("spyke_plasma_v1, café".encode("latin-1"), "byte 0xe9 at offset 20"),
        ("spyke_plasma_v1, \u201cred\u201d disc".encode("cp1252"), "byte 0x93 at offset 17"),
    ],
)
def test_a_caption_that_is_not_utf8_is_refused(good, data, found):
    bad = good.train_dir / "img001.txt"
    bad.write_bytes(data)
    (message,) = caption_messages(problems(good))
    assert f"{bad} ({found}" in message
    assert message.startswith("1 caption file(s) in `train_dir` are not UTF-8")
    assert ("UnicodeDecodeError" if "without" not in found else "NUL byte after every letter") in message
    assert "fix: save them as UTF-8" in message


def test_latin1_names_the_encoding_it_decodes_as(good):
    (good.train_dir / "img000.txt").write_bytes("spyke_plasma_v1, caf\xe9".encode("latin-1"))
    (message,) = caption_messages(problems(good))
    assert "Latin-1 or Windows-1252 (cp1252)?" in message


def test_every_unreadable_caption_is_named_training_and_regularisation(good):
    (good.train_dir / "img000.txt").write_bytes(TRAINS.encode("utf-16"))
    (good.train_dir / "img002.txt").write_bytes(b"caf\xe9")
    (good.reg_dir / "img001.txt").write_bytes("person".encode("utf-16"))
    train, reg = caption_messages(problems(good))
    assert train.startswith("2 caption file(s) in `train_dir` are not UTF-8")
    assert str(good.train_dir / "img000.txt") in train and str(good.train_dir / "img002.txt") in train
    assert reg.startswith("1 caption file(s) in `reg_dir` are not UTF-8") and str(good.reg_dir / "img001.txt") in reg


def test_the_cli_reports_an_unreadable_caption_without_a_traceback(good, tmp_path, capsys):
    (good.train_dir / "img000.txt").write_bytes(TRAINS.encode("utf-16"))
    config = tmp_path / "run.toml"
    good.to_toml(config)
    assert main(["plan", str(config)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "are not UTF-8" in err and "img000.txt" in err


@pytest.mark.parametrize("folder", ["train_dir", "reg_dir"])
def test_a_zero_byte_caption_is_refused_training_or_regularisation(good, folder):
    path = getattr(good, folder) / "img001.txt"
    path.write_bytes(b"")
    (message,) = caption_messages(problems(good))
    token = "spyke_plasma_v1" if folder == "train_dir" else "person"
    assert message == (
        f"1 caption file(s) in `{folder}` are empty (0 bytes), which stops sd-scripts (AssertionError: caption file "
        f"is empty): {path}; fix: write the caption, or delete the file to train the image on the folder's class "
        f"token {token!r}"
    )


# --- captions that train as something else than what was written ------------------------------------------------
@pytest.mark.parametrize("text", ["  \n", "\n", "\n\n\n", "\t \r\n  \r\n", "\ufeff", "\ufeff \n"])
def test_a_caption_with_no_text_trains_on_an_empty_caption_not_the_class_token(good, text):
    path = good.train_dir / "img000.txt"
    path.write_text(text, encoding="utf-8", newline="")
    (message,) = caption_messages(problems(good))
    assert message.startswith(f"1 caption file(s) in `train_dir` have no text (only whitespace or blank lines): {path}")
    assert "sd-scripts trains these images on an empty caption ''" in message
    assert "not on the folder's class token 'spyke_plasma_v1'" in message
    assert "fix: write the caption, or delete the file" in message


def test_a_regularisation_caption_with_no_text_is_a_warning_that_says_empty_caption(good):
    path = good.reg_dir / "img001.txt"
    path.write_text("   \n")
    warnings = caption_messages(plan(good).warnings)
    assert warnings == [
        f"1 caption file(s) in `reg_dir` have no text (only whitespace or blank lines): {path}; sd-scripts trains "
        f"these images on an empty caption '', not on the folder's class token 'person'; fix: write the caption, "
        f"or delete the file to train on the class token"
    ]


@pytest.mark.parametrize("text", ["\n" + TRAINS, "  \n" + TRAINS + "\n", "\r\n\r\n" + TRAINS, "\t\n\n" + TRAINS])
@pytest.mark.parametrize("folder", ["train_dir", "reg_dir"])
def test_a_blank_first_line_trains_as_empty_and_is_refused(good, text, folder):
    path = getattr(good, folder) / "img002.txt" if folder == "train_dir" else good.reg_dir / "img001.txt"
    path.write_text(text, encoding="utf-8", newline="")
    (message,) = caption_messages(problems(good))
    assert message.startswith(f"1 caption(s) in `{folder}` start with a blank line: {path}")
    assert (
        f"sd-scripts trains only a caption's first line, so they train on an empty caption '' instead of {TRAINS!r}"
        in message
    )
    assert "fix: remove the blank line(s) at the start" in message


@pytest.mark.parametrize(
    "text",
    [
        "spyke_plasma_v1\nred disc\nwhite cloak",
        "spyke_plasma_v1\r\nred disc\r\nwhite cloak\r\n",
        "spyke_plasma_v1\rred disc\rwhite cloak",  # old Mac line ends: Python's universal newlines split them too
        "spyke_plasma_v1\n\nred disc\n\nwhite cloak\n",
        "spyke_plasma_v1, red disc\nwhite cloak",
    ],
)
def test_a_tag_per_line_caption_trains_its_first_line_only_and_is_refused(good, text):
    path = good.train_dir / "img001.txt"
    path.write_text(text, encoding="utf-8", newline="")
    (message,) = caption_messages(problems(good))
    first = text.replace("\r", "\n").split("\n")[0]
    assert message.startswith(f"1 caption(s) in `train_dir` have several lines (a tag per line?): {path}")
    assert f"sd-scripts trains only the first line ({first!r} for img001.txt)" in message
    assert "fix: put the tags on one line separated by commas ('spyke_plasma_v1, red disc, white cloak')" in message
    assert "or set `extra_args.enable_wildcard = true`" in message
    assert "do not start with the trigger" not in " ".join(caption_messages(problems(good)))


def test_a_tag_per_line_regularisation_caption_is_refused(good):
    path = good.reg_dir / "img000.txt"
    path.write_text("person\nstanding\n")
    (message,) = caption_messages(problems(good))
    assert message.startswith(f"1 caption(s) in `reg_dir` have several lines (a tag per line?): {path}")


def test_with_enable_wildcard_several_lines_train_one_per_step_a_warning_for_tag_lines(good):
    path = good.train_dir / "img001.txt"
    path.write_text("\nspyke_plasma_v1\nred disc\n")  # a blank first line is skipped with enable_wildcard
    cfg = good.replace(extra_args={"enable_wildcard": True})
    warnings = caption_messages(plan(cfg).warnings)
    assert warnings == [
        f"1 caption(s) in `train_dir` have several lines and enable_wildcard is on: each step trains one line chosen "
        f"at random ('spyke_plasma_v1' or 'red disc' for img001.txt), not all of them: {path}; if each line is a "
        f"tag, put them on one line separated by commas"
    ]


def test_with_enable_wildcard_whole_captions_per_line_are_what_it_is_for(good):
    (good.train_dir / "img001.txt").write_text("spyke_plasma_v1, red disc\nspyke_plasma_v1, white cloak\n")
    assert caption_messages(plan(good.replace(extra_args={"enable_wildcard": True})).warnings) == []


@pytest.mark.parametrize("text", [TRAINS + "\r\n", TRAINS + "\n", TRAINS + "\n\n", TRAINS + "\r\n\r\n", "  " + TRAINS])
def test_line_ends_and_trailing_blank_lines_are_harmless(good, text):
    for image in ("img000", "img001", "img002"):
        (good.train_dir / f"{image}.txt").write_text(text, encoding="utf-8", newline="")
    assert caption_messages(plan(good).warnings) == []


# --- the trigger check compares what is trained ------------------------------------------------------------------
def test_a_utf8_bom_gets_no_trigger_warning(good):
    """sd-scripts keeps U+FEFF (it reads with encoding="utf-8" and str.strip() keeps it), but sd-scripts' CLIP
    tokenizer drops it (ftfy's fix_text, or BasicTokenizer's control-character cleaning): training is unchanged."""
    for image in ("img000", "img001", "img002"):
        (good.train_dir / f"{image}.txt").write_text("\ufeff" + TRAINS, encoding="utf-8")
    assert caption_messages(plan(good).warnings) == []


def test_a_bom_caption_that_really_lacks_the_trigger_still_warns(good):
    path = good.train_dir / "img000.txt"
    path.write_text("\ufeffred disc, spyke_plasma_v1", encoding="utf-8")
    (warning,) = caption_messages(plan(good).warnings)
    assert warning.startswith("1 caption(s) in `train_dir` do not start with the trigger 'spyke_plasma_v1'")
    assert str(path) in warning


@pytest.mark.parametrize("prefix", ["spyke_plasma_v1,", "spyke_plasma_v1 ,"])
def test_a_caption_prefix_that_puts_the_trigger_first_gets_no_trigger_warning(good, prefix):
    for image in ("img000", "img001", "img002"):
        (good.train_dir / f"{image}.txt").write_text("red disc, white cloak")
    assert caption_messages(plan(good.replace(extra_args={"caption_prefix": prefix})).warnings) == []


def test_the_trigger_check_uses_the_caption_separator(good):
    for image in ("img000", "img001", "img002"):
        (good.train_dir / f"{image}.txt").write_text("spyke_plasma_v1; red disc; white cloak")
    assert caption_messages(plan(good.replace(extra_args={"caption_separator": ";"})).warnings) == []
    (warning,) = caption_messages(plan(good).warnings)  # with "," the first tag is the whole line
    assert "do not start with the trigger" in warning


# --- the plan's counts and what one caption trains as ------------------------------------------------------------
def test_count_captions_counts_the_captions_of_the_images_sd_scripts_reads(good):
    (good.train_dir / "notes.txt").write_text("a file next to the images")
    (good.train_dir / "old_img.txt").write_text("spyke_plasma_v1, an image deleted since")
    (good.reg_dir / "img001.txt").write_text("  \n")  # trains on '' (a warning)
    subsets = {s.folder.name: (s.images, s.captions) for s in plan(good).subsets}
    assert subsets == {"10_spyke_plasma_v1": (3, 3), "1_person": (2, 1)}


def test_count_captions_reads_with_sd_scripts(good):
    from spyke_lora import _engine
    from spyke_lora._preflight import count_captions

    folder = _engine.dataset_folders(good)[0]
    (good.train_dir / "img000.txt").unlink()
    (good.train_dir / "stray.txt").write_text("no image")
    assert count_captions(folder, good) == 2
    assert count_captions(folder) == 2  # without the config: the vendored sd-scripts and its defaults


def test_the_plan_shows_what_one_caption_per_folder_trains_as(good):
    from spyke_lora import _engine
    from spyke_lora._preflight import caption_example

    train, reg = _engine.dataset_folders(good)
    assert caption_example(train, good) == f"caption  img000.txt trains as {TRAINS!r}"
    assert caption_example(reg, good) == "caption  img000.txt trains as 'person'"
    (good.train_dir / "img000.txt").unlink()
    assert caption_example(train, good) == "caption  img000.png has no caption file: trains as 'spyke_plasma_v1'"
    cfg = good.replace(extra_args={"caption_prefix": "masterpiece,", "caption_suffix": ", best quality"})
    unshuffled = "caption  img000.txt trains as 'masterpiece, person , best quality'"  # sd-scripts joins with " "
    assert caption_example(reg, cfg.replace(shuffle_caption=False)) == unshuffled
    assert caption_example(reg, cfg).endswith(
        "(one step's order: the tags after the first 1 are shuffled at every step)"
    )


def test_the_shown_caption_marks_the_shuffle(good):
    from spyke_lora import _engine
    from spyke_lora._preflight import caption_example

    (good.train_dir / "img000.txt").write_text("spyke_plasma_v1, red disc, white cloak, smile")
    train = _engine.dataset_folders(good)[0]
    shown = caption_example(train, good.replace(keep_tokens=1))
    assert shown.startswith("caption  img000.txt trains as 'spyke_plasma_v1, ")
    assert shown.endswith("(one step's order: the tags after the first 1 are shuffled at every step)")
    assert caption_example(train, good.replace(shuffle_caption=False)) == (
        "caption  img000.txt trains as 'spyke_plasma_v1, red disc, white cloak, smile'"
    )


def test_the_plan_text_has_the_caption_line_under_its_folder(good):
    p = plan(good)
    lines = str(p).splitlines()
    at = lines.index(f"  train {good.train_dir}: 3 images, 3 captions, x10")
    assert lines[at + 1] == f"    caption  img000.txt trains as {TRAINS!r}"


def test_subset_plan_text_shows_its_caption_line():
    from pathlib import Path

    from spyke_lora._plan import SubsetPlan

    subset = SubsetPlan(Path("/d/10_x"), 3, 3, 10, False, "caption  a.txt trains as 'x, y'")
    assert subset.lines() == ["  train /d/10_x: 3 images, 3 captions, x10", "    caption  a.txt trains as 'x, y'"]
    assert SubsetPlan(Path("/d/1_p"), 2, 2, 1, True).lines() == ["  reg   /d/1_p: 2 images, 2 captions, x1"]
