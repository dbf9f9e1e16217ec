"""plan() on what sd-scripts does with each image's content (issue 22, groups 1 and 2).

sd-scripts' ``load_image`` (library/train_util.py l.2948) opens each image with Pillow and converts it to RGB (RGBA with
``alpha_mask``), nothing more: no EXIF orientation, no scaling of 16-bit values, no background under transparency.
Its listing is ``glob_images`` (l.2847): a case-sensitive glob per extension in ``IMAGE_EXTENSIONS``, which skips
dot-files. Each test builds small files in tmp_path and asserts the message's content: the file, what was found,
the fix.
"""

from __future__ import annotations

import io
import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spyke_lora import ConfigError, TrainConfig, plan

from .conftest import write_images


def refused(cfg: TrainConfig) -> str:
    """The ConfigError's message of a plan that must be refused."""
    with pytest.raises(ConfigError) as info:
        plan(cfg)
    return str(info.value)


def pixels(mode: str = "RGB", size: int = 64) -> np.ndarray:
    rng = np.random.default_rng(3)
    return rng.integers(0, 256, (size, size, len(mode)) if len(mode) > 1 else (size, size), np.uint8)


def replace_image(cfg: TrainConfig, name: str, folder: Path | None = None) -> Path:
    """img001.png of the folder (train_dir by default) removed; the path of its replacement ``name`` (same stem, so
    its caption still fits)."""
    folder = folder or cfg.train_dir
    (folder / "img001.png").unlink()
    return folder / name


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))


def png_file(width: int, height: int, depth: int, color: int, row: bytes, before=(), after=()) -> bytes:
    """A PNG of ``height`` identical rows (filter 0), with extra chunks before IDAT and after it."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0)
    idat = zlib.compress((b"\0" + row) * height)
    chunks = [png_chunk(b"IHDR", ihdr), *before, png_chunk(b"IDAT", idat), *after, png_chunk(b"IEND", b"")]
    return b"\x89PNG\r\n\x1a\n" + b"".join(chunks)


def exif_bytes(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


# --- 1. EXIF orientation: sd-scripts trains the pixels as stored ------------------------------------------------------


@pytest.mark.parametrize(
    "orientation, words",
    [(6, "rotated 90 degrees clockwise"), (8, "rotated 90 degrees counter-clockwise"), (3, "rotated 180 degrees"),
     (2, "mirrored left to right"), (4, "mirrored top to bottom"), (5, "mirrored"), (7, "mirrored")],
)  # fmt: skip
def test_a_jpeg_with_an_exif_orientation_is_refused(good, orientation, words):
    image = replace_image(good, "img001.jpg")
    Image.fromarray(pixels()).save(image, "JPEG", exif=exif_bytes(orientation))
    message = refused(good)
    assert str(image) in message and f"EXIF orientation {orientation}" in message and words in message
    assert "sideways or mirrored" in message and "exif_transpose" in message  # what happens, and the fix


def test_a_jpeg_with_orientation_1_or_none_plans(good):
    Image.fromarray(pixels()).save(replace_image(good, "img001.jpg"), "JPEG", exif=exif_bytes(1))
    Image.fromarray(pixels()).save(good.train_dir / "img000.png")  # no EXIF at all
    assert plan(good).warnings == ()


def test_a_png_exif_chunk_before_or_after_the_image_data_is_read(good):
    row = pixels()[0].tobytes()
    early = png_file(64, 64, 8, 2, row, before=[png_chunk(b"eXIf", exif_bytes(6))])
    late = png_file(64, 64, 8, 2, row, after=[png_chunk(b"eXIf", exif_bytes(8))])
    (good.train_dir / "img000.png").write_bytes(early)
    (good.train_dir / "img002.png").write_bytes(late)
    message = refused(good)
    assert f"{good.train_dir / 'img000.png'} (EXIF orientation 6: rotated 90 degrees clockwise)" in message
    assert f"{good.train_dir / 'img002.png'} (EXIF orientation 8: rotated 90 degrees counter-clockwise)" in message


def test_a_webp_with_an_exif_orientation_is_refused(good):
    image = replace_image(good, "img001.webp")
    Image.fromarray(pixels()).save(image, "WEBP", exif=exif_bytes(3))
    message = refused(good)
    assert str(image) in message and "EXIF orientation 3: rotated 180 degrees" in message


def test_an_orientation_in_the_reg_folder_is_refused_naming_it(good):
    image = replace_image(good, "img001.jpg", good.reg_dir)
    Image.fromarray(pixels()).save(image, "JPEG", exif=exif_bytes(6))
    message = refused(good)
    assert "`reg_dir`" in message and str(image) in message


# --- 1. bit depth: Pillow's convert("RGB") clips 16-bit values to 255 --------------------------------------------------


def test_a_16_bit_grayscale_png_is_refused(good):
    image = good.train_dir / "img001.png"
    Image.fromarray(np.full((64, 64), 20000, np.uint16)).save(image)
    message = refused(good)
    assert str(image) in message and "I;16" in message and "16-bit grayscale" in message
    assert "white" in message and "8 bits" in message  # what sd-scripts trains, and the fix


def test_a_16_bit_big_endian_grayscale_png_is_refused(good):
    image = good.train_dir / "img001.png"
    image.write_bytes(png_file(64, 64, 16, 0, struct.pack(">H", 30000) * 64))
    message = refused(good)
    assert str(image) in message and "16-bit grayscale" in message


@pytest.mark.parametrize(
    "depth, color, sample",
    [(16, 2, struct.pack(">HHH", 60000, 30000, 100)), (16, 6, struct.pack(">HHHH", 1, 2, 3, 65535)),
     (16, 4, struct.pack(">HH", 30000, 65535)), (1, 0, b"\xaa" * 8), (4, 0, b"\x12" * 32)],
)  # fmt: skip
def test_pngs_that_open_as_8_bit_plan(good, depth, color, sample):
    """16-bit RGB, RGBA and gray+alpha PNGs open in Pillow as 8-bit RGB/RGBA/LA; 1- and 4-bit gray as 1/L: all
    convert to RGB correctly, so none is refused."""
    image = good.train_dir / "img001.png"
    image.write_bytes(png_file(64, 64, depth, color, sample * (64 if depth == 16 else 1)))
    assert plan(good).warnings == ()


# --- 1. transparency: sd-scripts' RGB conversion drops the alpha ------------------------------------------------------


def transparent_warning(p) -> str:
    [warning] = [w for w in p.warnings if "transparent" in w]
    return warning


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_a_cutout_with_transparent_pixels_warns(good, mode):
    array = pixels(mode)
    array[:10, :, -1] = 0  # a transparent band at the top
    image = good.train_dir / "img001.png"
    Image.fromarray(array, mode).save(image)
    warning = transparent_warning(plan(good))
    assert str(image) in warning and "`train_dir`" in warning
    assert "alpha_mask = true" in warning and "flatten" in warning and "black" in warning


def test_a_webp_cutout_warns(good):
    array = pixels("RGBA")
    array[5, 5, 3] = 40
    image = replace_image(good, "img001.webp")
    Image.fromarray(array, "RGBA").save(image, "WEBP", lossless=True)
    assert str(image) in transparent_warning(plan(good))


def test_a_palette_image_with_a_used_transparent_index_warns(good):
    image = good.train_dir / "img001.png"
    palette = Image.fromarray(np.arange(64 * 64, dtype=np.uint8).reshape(64, 64) % 4, "L").convert("P")
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 756)
    palette.save(image, transparency=0)  # index 0 (in use) transparent
    assert str(image) in transparent_warning(plan(good))


def test_a_palette_or_rgb_image_with_a_transparency_key_that_no_pixel_has_plans_quietly(good):
    palette = Image.fromarray(np.full((64, 64), 1, np.uint8), "L").convert("P")
    palette.save(good.train_dir / "img001.png", transparency=7)  # no pixel uses index 7
    Image.fromarray(np.full((64, 64, 3), 9, np.uint8)).save(good.train_dir / "img000.png", transparency=(1, 2, 3))
    assert plan(good).warnings == ()


def test_an_rgb_png_with_a_transparency_key_its_pixels_use_warns(good):
    image = good.train_dir / "img000.png"
    Image.fromarray(np.full((64, 64, 3), 9, np.uint8)).save(image, transparency=(9, 9, 9))
    assert str(image) in transparent_warning(plan(good))


def test_a_fully_opaque_alpha_plans_quietly(good):
    Image.fromarray(pixels("RGBA")[..., :3]).convert("RGBA").save(good.train_dir / "img001.png")
    assert plan(good).warnings == ()


def test_no_transparency_warning_with_alpha_mask_on(good):
    array = pixels("RGBA")
    array[:10, :, 3] = 0
    Image.fromarray(array, "RGBA").save(good.train_dir / "img001.png")
    assert not [w for w in plan(good.replace(extra_args={"alpha_mask": True})).warnings if "transparent" in w]


def test_no_transparency_warning_with_alpha_mask_in_the_dataset_toml(good, tmp_path):
    array = pixels("RGBA")
    array[:10, :, 3] = 0
    Image.fromarray(array, "RGBA").save(good.train_dir / "img001.png")
    toml_path = tmp_path / "dataset.toml"
    subset = f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{good.train_dir}"\nnum_repeats = 2\nclass_tokens = "spyke_plasma_v1"\n'
    toml_path.write_text(subset + "alpha_mask = true\n")
    cfg = good.replace(dataset_config=toml_path, train_dir=None, reg_dir=None)
    assert not [w for w in plan(cfg).warnings if "transparent" in w]
    toml_path.write_text(subset)  # without it: the warning names the subset and the key to set there
    warning = transparent_warning(plan(cfg))
    assert "dataset.toml datasets[0].subsets[0]" in warning and "alpha_mask = true" in warning


def test_opaque_images_are_not_decoded_for_their_alpha(good, monkeypatch):
    from PIL import ImageFile

    Image.fromarray(pixels()).save(good.train_dir / "img001.png")
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail(f"{self.format} {self.mode} decoded"))
    assert plan(good).warnings == ()


# --- 1. huge images, links and files that cannot be read ---------------------------------------------------------------


def test_a_20000_px_image_is_refused_not_raised(good):
    image = good.train_dir / "img001.png"
    image.write_bytes(png_file(20000, 20000, 1, 0, b"\0" * 2500))
    message = refused(good)
    assert str(image) in message and "20000x20000" in message and "downscale" in message


def test_an_image_over_the_bomb_limit_is_refused(good, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64x64 = 4096 > 2 x 1000
    message = refused(good)
    assert "64x64" in message and str(good.train_dir / "img000.png") in message and "MAX_IMAGE_PIXELS" in message


def test_an_image_over_the_bomb_warning_threshold_warns_once(good, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # 4096: over the limit, under twice it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        p = plan(good)
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    [warning] = [w for w in p.warnings if "megapixels" in w and "`train_dir`" in w]
    assert str(good.train_dir / "img000.png") in warning and "downscale" in warning


def test_a_dangling_symlink_is_refused(good, tmp_path):
    link = replace_image(good, "img001.png")
    link.symlink_to(tmp_path / "gone.png")
    message = refused(good)
    assert str(link) in message and "symbolic link" in message and str(tmp_path / "gone.png") in message
    assert "does not exist" in message


def test_a_symlink_loop_is_refused(good):
    link = replace_image(good, "img001.png")
    link.symlink_to(link)
    message = refused(good)
    assert str(link) in message and "symbolic link loop" in message


def test_a_symlink_to_a_good_image_plans(good, tmp_path):
    target = tmp_path / "elsewhere.png"
    Image.fromarray(pixels()).save(target)
    replace_image(good, "img001.png").symlink_to(target)
    assert plan(good).subsets[0].images == 3


def test_a_folder_named_like_an_image_is_refused(good):
    folder = good.train_dir / "extra.png"
    folder.mkdir()
    message = refused(good)
    assert str(folder) in message and "is a folder" in message


def test_an_empty_image_file_is_refused(good):
    image = good.train_dir / "img001.png"
    image.write_bytes(b"")
    message = refused(good)
    assert f"{image} is empty (0 bytes)" in message and "truncated" not in message


def test_an_unreadable_image_is_refused(good, monkeypatch):
    image = good.train_dir / "img001.png"
    if os.geteuid() == 0:  # root reads a chmod 000 file: make the open fail as it would for a user
        real = Image.open

        def denied(fp, *args, **kwargs):
            if Path(fp) == image:
                raise PermissionError(13, "Permission denied", str(image))
            return real(fp, *args, **kwargs)

        monkeypatch.setattr(Image, "open", denied)
        monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != image)
    else:
        image.chmod(0)
    message = refused(good)
    assert str(image) in message and "permission" in message and "chmod" in message


# --- 2. files sd-scripts will not see, or cannot read -------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".Png", ".pNG", ".jPeg", ".Jpg", ".Webp"])
def test_a_mixed_case_extension_is_refused(good, suffix):
    image = replace_image(good, "img001" + suffix)
    fmt = {".png": "PNG", ".jpeg": "JPEG", ".jpg": "JPEG", ".webp": "WEBP"}[suffix.lower()]
    Image.fromarray(pixels()).save(image, fmt)
    message = refused(good)
    assert str(image) in message and f"rename it to img001{suffix.lower()}" in message
    assert "sd-scripts" in message and "skip" in message


def test_mixed_case_files_are_each_named(good):
    (good.train_dir / "img001.png").rename(good.train_dir / "img001.Png")
    Image.open(good.train_dir / "img002.png").convert("RGB").save(good.train_dir / "img002.JPeg", "JPEG")
    (good.train_dir / "img002.png").unlink()
    message = refused(good)
    assert "2 image(s)" in message and "img001.Png" in message and "img002.JPeg" in message
    assert "rename it to img001.png" in message and "rename it to img002.jpeg" in message


def test_uppercase_extensions_are_seen_and_counted(good):
    (good.train_dir / "img001.png").rename(good.train_dir / "img001.PNG")
    Image.open(good.train_dir / "img002.png").convert("RGB").save(good.train_dir / "img002.JPG", "JPEG")
    (good.train_dir / "img002.png").unlink()
    p = plan(good)
    assert p.subsets[0].images == 3 and p.warnings == ()


APPLE_DOUBLE = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(60)


@pytest.mark.parametrize("name", ["._img000.png", "._img001.JPG", ".hidden.png"])
def test_dot_files_are_ignored_as_sd_scripts_ignores_them(good, name):
    (good.train_dir / name).write_bytes(APPLE_DOUBLE)
    (good.reg_dir / name).write_bytes(APPLE_DOUBLE)
    p = plan(good)
    assert [s.images for s in p.subsets] == [3, 2] and p.warnings == ()


HEIF = {
    "heic": b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic",
    "heix": b"\x00\x00\x00\x18ftypheix\x00\x00\x00\x00mif1heix",
    "mif1": b"\x00\x00\x00\x18ftypmif1\x00\x00\x00\x00mif1heic",
}


@pytest.mark.parametrize("brand", sorted(HEIF))
@pytest.mark.parametrize("name", ["img001.jpg", "img001.png", "img001.JPG"])
def test_heic_content_is_named_for_what_it_is(good, brand, name):
    image = replace_image(good, name)
    image.write_bytes(HEIF[brand] + bytes(200) + b"mdat" + os.urandom(500))
    message = refused(good)
    assert str(image) in message and "HEIC" in message and f"'{brand}'" in message
    assert "sd-scripts cannot read" in message and "convert" in message and "JPEG or PNG" in message
    assert "truncated" not in message
    if brand == "heic":
        assert "iPhone" in message


@pytest.mark.parametrize(
    "content, words",
    [(b"just some text, not an image", "starts with"), (b"%PDF-1.7\n" + bytes(100), "a PDF document"),
     (b"<svg xmlns='http://www.w3.org/2000/svg'/>", "an SVG drawing"),
     (b"\x00\x00\x00\x20ftypisom\x00\x00\x00\x00isomiso2mp41", "an MP4/MOV video")],
)  # fmt: skip
def test_a_file_pillow_cannot_identify_is_not_called_truncated(good, content, words):
    image = good.train_dir / "img001.png"
    image.write_bytes(content)
    message = refused(good)
    assert f"{image} is not an image Pillow can read" in message and words in message
    assert "truncated" not in message


def test_an_avif_named_jpg_is_told_to_convert_not_rename(good):
    from PIL import features

    if not features.check("avif"):
        pytest.skip("this Pillow has no AVIF")
    image = replace_image(good, "img001.jpg")
    Image.fromarray(pixels()).save(image, "AVIF")
    message = refused(good)
    assert str(image) in message and "is AVIF" in message and "convert it to JPEG or PNG" in message


def test_the_held_out_folder_gets_the_same_checks(good, tmp_path):
    held = tmp_path / "val" / "1_spyke_plasma_v1"
    write_images(held, 3, "spyke_plasma_v1, held", start=50)
    (held / "img050.png").rename(held / "img050.Png")
    (held / "img051.png").write_bytes(HEIF["heic"] + bytes(300))
    (held / "._img052.png").write_bytes(APPLE_DOUBLE)
    message = refused(good.replace(validation_dir=held))
    assert "`validation_dir`" in message and str(held / "img050.Png") in message
    assert str(held / "img051.png") in message and "HEIC" in message and "._img052" not in message


def test_the_held_out_count_is_sd_scripts_listing(good, tmp_path):
    held = tmp_path / "val" / "1_spyke_plasma_v1"
    write_images(held, 2, "spyke_plasma_v1, held", start=50)
    (held / "._img050.png").write_bytes(APPLE_DOUBLE)
    p = plan(good.replace(validation_dir=held))
    assert p.validation.images == 2 and p.warnings == ()


def test_no_raw_exception_leaves_plan_for_any_of_these(good, tmp_path):
    """Every case above at once: one ConfigError listing them, each naming its file."""
    (good.train_dir / "img000.png").write_bytes(png_file(20000, 20000, 1, 0, b"\0" * 2500))
    (good.train_dir / "img001.png").unlink()
    (good.train_dir / "img001.png").symlink_to(tmp_path / "nowhere.png")
    (good.train_dir / "img002.png").write_bytes(HEIF["heic"] + bytes(50))
    (good.reg_dir / "img000.png").rename(good.reg_dir / "img000.Png")
    buffer = io.BytesIO()
    Image.fromarray(np.full((64, 64), 40000, np.uint16)).save(buffer, "PNG")
    (good.reg_dir / "img001.png").write_bytes(buffer.getvalue())
    with pytest.raises(ConfigError) as info:
        plan(good)
    message = str(info.value)
    for name in ("img000.png", "img001.png", "img002.png", "img000.Png"):
        assert name in message
    assert len(info.value.problems) >= 5


def test_an_unchanged_image_is_scanned_once_per_process_and_a_changed_one_again(tmp_path, monkeypatch):
    from spyke_lora._preflight import _images

    image = tmp_path / "cut.png"
    pixels = np.zeros((8, 8, 4), np.uint8)
    pixels[..., 3] = 255
    Image.fromarray(pixels, "RGBA").save(image)
    scanned = []
    real = _images._scan
    monkeypatch.setattr(_images, "_scan", lambda path, alpha_mask=False: scanned.append(path) or real(path, alpha_mask))
    assert not _images.cached_scan(image).transparent
    assert not _images.cached_scan(image).transparent and len(scanned) == 1  # the same file: its scan kept
    assert _images.cached_scan(image, alpha_mask=True) is not None and len(scanned) == 2  # another question
    pixels[0, 0, 3] = 0
    Image.fromarray(pixels, "RGBA").save(image)  # rewritten: another size or mtime
    os.utime(image, ns=(1, 1))
    assert _images.cached_scan(image).transparent and len(scanned) == 3
