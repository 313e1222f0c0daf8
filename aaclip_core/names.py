"""Names the library and the CLI share, in one place and with no heavy imports (the CLI builds its
help from them without loading torch): metrics and their labels, dataset layouts, export formats."""

from __future__ import annotations

# Every metric a test reports (raw floats in [0, 1]); the names are also the keys of reports, params
# (feedback.selection_metric) and MLflow metrics, so everything else uses these constants.
PIXEL_AUROC = "pixel_auroc"
PIXEL_AP = "pixel_ap"
IMAGE_AUROC = "image_auroc"
IMAGE_AP = "image_ap"
AUPRO = "aupro"
PIXEL_F1_MAX = "pixel_f1_max"
IMAGE_F1_MAX = "image_f1_max"
# In report order.
METRIC_NAMES = (PIXEL_AUROC, PIXEL_AP, IMAGE_AUROC, IMAGE_AP, AUPRO, PIXEL_F1_MAX, IMAGE_F1_MAX)
# How tables label them; * marks metrics beyond the reference protocol.
METRIC_LABELS = {
    PIXEL_AUROC: "pixel AUROC",
    PIXEL_AP: "pixel AP",
    IMAGE_AUROC: "image AUROC",
    IMAGE_AP: "image AP",
    AUPRO: "AUPRO*",
    PIXEL_F1_MAX: "pixel F1-max*",
    IMAGE_F1_MAX: "image F1-max*",
}

# Dataset layouts an indexer reads (aaclip_core.data.layouts describes each), plus "auto" (detect
# one) and, for recipes only, "synthetic" (the built-in demo data, generated on first use).
INDEX_LAYOUTS = ("mvtec", "mpdd", "visa", "btad", "folder", "jsonl")
LAYOUTS = (*INDEX_LAYOUTS, "auto")
RECIPE_LAYOUTS = (*LAYOUTS, "synthetic")

# `aaclip export --format`: aaclip_core.jobs.export.EXPORT_FORMATS holds one exporter per name.
EXPORT_FORMATS = ("reference", "aaclip", "onnx", "torchscript")
