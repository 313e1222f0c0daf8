"""Names the library and the CLI share, in one place and with no heavy imports (the CLI builds its
help from them without loading torch): metrics and their labels, dataset layouts, export formats."""

from __future__ import annotations

# Every metric a test reports, in report order (raw floats in [0, 1]).
METRIC_NAMES = ("pixel_auroc", "pixel_ap", "image_auroc", "image_ap", "aupro", "pixel_f1_max", "image_f1_max")
# How tables label them; * marks metrics beyond the reference protocol.
METRIC_LABELS = {
    "pixel_auroc": "pixel AUROC",
    "pixel_ap": "pixel AP",
    "image_auroc": "image AUROC",
    "image_ap": "image AP",
    "aupro": "AUPRO*",
    "pixel_f1_max": "pixel F1-max*",
    "image_f1_max": "image F1-max*",
}

# Dataset layouts an indexer reads (aaclip_core.data.layouts describes each), plus "auto" (detect
# one) and, for recipes only, "synthetic" (the built-in demo data, generated on first use).
INDEX_LAYOUTS = ("mvtec", "mpdd", "visa", "btad", "folder", "jsonl")
LAYOUTS = (*INDEX_LAYOUTS, "auto")
RECIPE_LAYOUTS = (*LAYOUTS, "synthetic")

# `aaclip export --format`: aaclip_core.jobs.export.EXPORT_FORMATS holds one exporter per name.
EXPORT_FORMATS = ("reference", "aaclip", "onnx", "torchscript")
