"""aaclip's own class-name table from before prompt names were recorded on checkpoints.

Only for checkpoints whose manifest records no prompt names: those runs were trained (and tested)
with these names, and keep evaluating with them. Everything else uses the reference's table
(``reference_prompt_names.json``, see ``prompt_names``). Do not edit: changing a name here changes
how those old runs evaluate.
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


def legacy_name(dataset: str, class_name: str) -> str | None:
    """The old table's name of ``class_name`` in ``dataset`` (dataset name is case-insensitive), or
    None where the old table had none (it then used the folder name, as the caller does)."""
    return _TABLES.get(dataset.strip().lower().replace("-", "_"), {}).get(class_name)
