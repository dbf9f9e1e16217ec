"""The images sd-scripts will see in a folder: its own listing, ``glob_images`` (library/train_util.py l.2847).

``DreamBoothDataset`` lists a subset's folder with ``glob_images(subset.image_dir, "*")`` (l.1999): one
``glob.glob`` per entry of ``IMAGE_EXTENSIONS`` (l.104: ``.png``, ``.jpg``, ... and their upper case, ``.avif`` and
``.jxl`` only when their Pillow plugin imports). A glob is case-sensitive on Linux and macOS (``fnmatch`` on POSIX
does not fold case), so ``a.Png`` is not an image to sd-scripts there, and ``*`` does not match a name starting
with a dot, so macOS's ``._a.png`` resource forks are never read. Whatever it lists (a dangling symlink, a folder
named ``x.png``) sd-scripts opens. The preflight uses this listing, not a copy of its rule, so it counts and checks
exactly the files that train.
"""

from __future__ import annotations

from pathlib import Path

from ._host import host_for


def glob_images(folder: Path, sd_scripts_dir: Path | None = None) -> list[Path]:
    """The images sd-scripts' dataset code lists in ``folder``, in its order (sorted).

    Args:
        folder: The dataset folder.
        sd_scripts_dir: ``TrainConfig.sd_scripts_dir`` (None: $SPYKE_LORA_SD_SCRIPTS or the vendored copy).

    Returns:
        The paths ``glob_images(folder, "*")`` returns; [] when ``folder`` is not a folder.
    """
    if not folder.is_dir():
        return []
    host = host_for(sd_scripts_dir)
    with host.active():
        listing = host.train_network().train_util.glob_images
        return [Path(p) for p in listing(str(folder), "*")]
