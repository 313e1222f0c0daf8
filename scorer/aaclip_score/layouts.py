"""What the dataset layouts say about one image file, without indexing a dataset: which files are
images, which folders hold masks, and the class an image's path names. The home of these facts:
`aaclip_core.data.layouts` (the indexers) imports them from here, so the scorer finds an image's
class exactly as `aaclip predict` does, without the training stack.
"""

from __future__ import annotations

from pathlib import Path

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})
SPLITS = ("train", "test")
# Folders of masks (MVTec AD / MPDD / BTAD ground_truth, VisA Masks, the folder layout's masks).
MASK_FOLDERS = frozenset({"ground_truth", "Masks", "masks"})


def class_of_image(path: Path) -> str | None:
    """The class an image belongs to, read from where it sits in one of the indexed layouts; None
    when the path follows none of them. Each pattern is matched exactly (folder depth included), so
    a plain folder that happens to be called ``test`` is not mistaken for a layout:

    * MVTec AD, MPDD, BTAD: ``<class>/train|test/<defect, good, ok or ko>/<image>``
    * VisA: ``<class>/Data/Images/Normal|Anomaly/<image>``
    * plain folder layout: ``<class>/normal|anomaly/<image>``
    """
    parts = Path(path).parts[:-1]
    n = len(parts)
    if n >= 3 and parts[-2] in SPLITS:
        return parts[-3]
    if n >= 4 and parts[-3] == "Data" and parts[-2] == "Images" and parts[-1] in ("Normal", "Anomaly"):
        return parts[-4]
    if n >= 2 and parts[-1] in ("normal", "anomaly"):
        return parts[-2]
    return None
