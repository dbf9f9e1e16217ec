"""What sd-scripts trains from each image's content: its EXIF orientation, its bit depth, its transparency, its size
against Pillow's decompression-bomb warning.

sd-scripts' ``load_image`` (library/train_util.py l.2948) is ``Image.open`` then ``convert("RGB")`` (``"RGBA"``
with ``alpha_mask``) and ``np.array``; its image size comes from ``imagesize`` (l.1482). So:

- the EXIF orientation tag is never applied (no ``ImageOps.exif_transpose`` anywhere in sd-scripts): a phone photo
  tagged "rotate 90" trains sideways (refused);
- a mode wider than 8 bits (a 16-bit grayscale PNG opens as ``I;16``) is clipped to 0-255 by ``convert``, not
  scaled: almost every pixel of a 16-bit image turns white (refused; a 16-bit RGB or RGBA PNG opens as 8-bit
  ``RGB``/``RGBA`` and converts correctly);
- ``convert("RGB")`` drops the alpha band: a transparent pixel trains as the colour stored under it (black in most
  cut-outs). ``alpha_mask`` makes sd-scripts load RGBA and weight the loss by the alpha (train_util l.1663,
  train_network.py l.471), so the background is left out of the loss (a warning, none with ``alpha_mask`` set);
- an image over ``Image.MAX_IMAGE_PIXELS`` makes Pillow warn on every load, and sd-scripts decodes it in full only to
  resize it to its bucket (a warning; over twice the limit Pillow refuses it: ``check_unreadable_images``).

Each reads :func:`~._images.scan_images`, so no image is opened twice, and only images with alpha are decoded.
"""

from __future__ import annotations

from ._context import Findings, FolderContext, names
from ._images import readable_images, wide_mode

__all__ = ["ORIENTATIONS", "check_bit_depth", "check_large_images", "check_orientation", "check_transparency"]

# What a viewer does to show the stored pixels of each EXIF orientation (1: nothing); sd-scripts does none of it.
ORIENTATIONS = {
    2: "mirrored left to right",
    3: "rotated 180 degrees",
    4: "mirrored top to bottom",
    5: "mirrored along its diagonal (rotated 90 degrees clockwise and mirrored)",
    6: "rotated 90 degrees clockwise",
    7: "mirrored along its other diagonal (rotated 90 degrees counter-clockwise and mirrored)",
    8: "rotated 90 degrees counter-clockwise",
}

# What each wide Pillow mode is, for the message.
_MODES = {
    "I;16": "16-bit grayscale",
    "I;16B": "16-bit grayscale",
    "I;16L": "16-bit grayscale",
    "I;16N": "16-bit grayscale",
    "I": "32-bit integer grayscale",
    "F": "32-bit float grayscale",
}


def check_orientation(folder: FolderContext, found: Findings) -> None:
    """An EXIF orientation tag other than 1: viewers rotate or mirror the picture, sd-scripts trains the pixels as
    stored."""
    turned = [
        f"{scan.path} (EXIF orientation {scan.orientation}: {ORIENTATIONS[scan.orientation]})"
        for scan in readable_images(folder)
        if scan.orientation in ORIENTATIONS
    ]
    if turned:
        found.problem(
            f"{len(turned)} image(s) in {folder.where} carry an EXIF orientation tag, which viewers apply and "
            f"sd-scripts does not, so they would train sideways or mirrored: {names(turned)}; rotate the pixels and "
            f"drop the tag, e.g. `ImageOps.exif_transpose(im).save(path)` with Pillow, or `magick mogrify "
            f"-auto-orient FILE`"
        )


def check_bit_depth(folder: FolderContext, found: Findings) -> None:
    """A mode wider than 8 bits per band: sd-scripts' ``convert("RGB")`` clips its values instead of scaling them."""
    wide = [
        f"{scan.path} ({scan.format} mode {scan.mode}: {_MODES.get(scan.mode, 'not 8 bits per channel')})"
        for scan in readable_images(folder)
        if wide_mode(scan.mode)
    ]
    if wide:
        found.problem(
            f"{len(wide)} image(s) in {folder.where} are not 8 bits per channel, and sd-scripts' conversion to RGB "
            f"(Pillow's convert) clips their values to 0-255 instead of scaling them, so almost every pixel of a "
            f"16-bit image trains as white: {names(wide)}; save them with 8 bits per channel (e.g. `magick FILE "
            f"-depth 8 FILE`, or Pillow: `Image.fromarray((np.asarray(im) >> 8).astype('uint8')).save(path)`)"
        )


def check_transparency(folder: FolderContext, found: Findings) -> None:
    """Transparent pixels (an alpha below 255): without ``alpha_mask`` sd-scripts drops the alpha and trains the
    colour stored under them. No message when the alpha is fully opaque, or ``alpha_mask`` is set."""
    transparent = [scan.path for scan in readable_images(folder) if scan.transparent]
    if not transparent:
        return
    key = (
        "`alpha_mask = true` in that subset of the dataset TOML (or in its dataset, or [general])"
        if folder.cfg.dataset_config is not None
        else "`extra_args.alpha_mask = true`"
    )
    found.warning(
        f"{len(transparent)} image(s) in {folder.where} have transparent pixels, which sd-scripts trains as the "
        f"colour stored under them (its RGB conversion drops the alpha; most cut-outs store black there, so the "
        f"character is learnt on a black background): {names(transparent)}; set {key} (sd-scripts then leaves the "
        f"transparent pixels out of the loss), or flatten the images onto a background colour"
    )


def check_large_images(folder: FolderContext, found: Findings) -> None:
    """An image over Pillow's ``Image.MAX_IMAGE_PIXELS`` (but under twice it, which is refused): it trains, but
    Pillow warns of a decompression bomb on every load and sd-scripts decodes it in full to resize it."""
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    if not limit:
        return
    large = [
        f"{scan.path} ({scan.size[0]}x{scan.size[1]}, {scan.megapixels:.1f} megapixels)"
        for scan in readable_images(folder)
        if scan.size[0] * scan.size[1] > limit
    ]
    if large:
        found.warning(
            f"{len(large)} image(s) in {folder.where} are over Pillow's decompression-bomb warning threshold of "
            f"{limit / 1e6:.1f} megapixels (Image.MAX_IMAGE_PIXELS): {names(large)}; sd-scripts decodes each in "
            f"full (3 bytes a pixel) only to resize it to its bucket: downscale them (a few thousand pixels a side "
            f"is plenty)"
        )
