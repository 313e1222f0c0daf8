"""What the exporter and the scorer agree on: tensor names, the sidecar's name and schema.
Standard library only, so the torch-free scorer can import it."""

from __future__ import annotations

from pathlib import Path

INPUT_NAMES = ("image", "class_index")
# raw_map/raw_det: as `test` scores them (`predict --save-maps` writes raw_map); map/score: on the
# calibrated scale (`predict`'s image score; the overlay's heat map is ``map`` clipped to [0, 1]).
OUTPUT_NAMES = ("raw_map", "raw_det", "map", "score")
SIDECAR_SCHEMA = 1
REQUIRED_KEYS = ("schema", "format", "classes", "image_size", "mean", "std", "domain")


def sidecar_of(model_file: Path) -> Path:
    """``detector.onnx`` -> ``detector.onnx.json``: the one place the two names are tied (the
    full name, so an .onnx and a .pt export can share a folder)."""
    p = Path(model_file)
    return p.with_name(p.name + ".json")
