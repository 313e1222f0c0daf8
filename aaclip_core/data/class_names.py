"""Descriptive class names for text prompts.

CLIP text prompts work better with natural object names than with folder ids: "pcb3" means
nothing to the text encoder while "infrared sensor pcb module" does. Unknown datasets or
classes fall back to the folder name with underscores turned into spaces.
"""

from __future__ import annotations

_MVTEC = {
    "bottle": "bottle",
    "cable": "cable",
    "capsule": "capsule",
    "carpet": "carpet",
    "grid": "grid",
    "hazelnut": "hazelnut",
    "leather": "leather",
    "metal_nut": "metal nut",
    "pill": "pill",
    "screw": "screw",
    "tile": "tile",
    "toothbrush": "toothbrush",
    "transistor": "transistor",
    "wood": "wood",
    "zipper": "zipper",
}

# VisA folder ids are opaque (pcb1..pcb4, macaroni1/2), so name what is actually pictured.
_VISA = {
    "candle": "candle",
    "capsules": "capsules",
    "cashew": "cashew",
    "chewinggum": "chewing gum",
    "fryum": "fryum",
    "macaroni1": "macaroni",
    "macaroni2": "macaroni on textured background",
    "pcb1": "printed circuit board",
    "pcb2": "printed circuit board with chips",
    "pcb3": "infrared sensor pcb module",
    "pcb4": "printed circuit board with components",
    "pipe_fryum": "pipe fryum",
}

_MPDD = {
    "bracket_black": "black metal bracket",
    "bracket_brown": "brown metal bracket",
    "bracket_white": "white metal bracket",
    "connector": "connector",
    "metal_plate": "metal plate",
    "tubes": "metal tubes",
}

# Classes of the built-in procedural demo dataset (see `synthetic`).
_SYNTHETIC = {
    "plank": "wooden plank",
    "fabric": "woven fabric",
    "disc": "metal disc",
}

_TABLES = {
    "mvtec": _MVTEC,
    "mvtec_ad": _MVTEC,
    "visa": _VISA,
    "mpdd": _MPDD,
    "synthetic": _SYNTHETIC,
    "demo": _SYNTHETIC,
}


def descriptive_name(dataset: str, class_name: str) -> str:
    """Prompt-friendly name of ``class_name`` in ``dataset`` (dataset name is case-insensitive)."""
    table = _TABLES.get(dataset.strip().lower().replace("-", "_"), {})
    return table.get(class_name, class_name.replace("_", " "))
