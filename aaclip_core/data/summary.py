"""`aaclip data index`: what a dataset root holds, split by split, class by class, defect by
defect, with every image and mask checked, so a user sees what a run would train and test on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aaclip_core.data.layouts import detect_layout, index_dataset
from aaclip_core.data.samples import ANOMALOUS, NORMAL_DEFECT, Sample, find_problems
from aaclip_core.errors import DataError

# Which split aaclip reads for what: training and testing both use the labelled images.
SPLIT_ROLES = {
    "test": "labelled images: what `train` learns from and `test` scores",
    "train": "defect-free images only (MVTec-style train/good); aaclip does not read them",
}


def _split_summary(samples: list[Sample]) -> dict[str, Any]:
    classes: dict[str, dict[str, Any]] = {}
    for s in samples:
        c = classes.setdefault(s.class_name, {"normal": 0, "anomalous": 0, "masks": 0, "defects": {}})
        c["anomalous" if s.label == ANOMALOUS else "normal"] += 1
        c["masks"] += s.mask_path is not None
        if s.label == ANOMALOUS:
            c["defects"][s.defect] = c["defects"].get(s.defect, 0) + 1
    for c in classes.values():
        c["defects"] = dict(sorted(c["defects"].items()))
    defects = sorted({d for c in classes.values() for d in c["defects"]})
    return {
        "images": len(samples),
        "normal": sum(c["normal"] for c in classes.values()),
        "anomalous": sum(c["anomalous"] for c in classes.values()),
        "classes": dict(sorted(classes.items())),
        "defect_types": [d for d in defects if d != NORMAL_DEFECT],
    }


def dataset_summary(root: Path, layout: str = "auto", check: bool = True) -> dict[str, Any]:
    """Per split: totals, and per class normal / anomalous counts, masks and defect types; with
    ``check``, every image and mask opened (``problems``). A train split that cannot be indexed
    (the layout has none, or no train/good folders) is reported as absent, with why."""
    root = Path(root).expanduser()
    used = detect_layout(root) if layout == "auto" else layout
    out: dict[str, Any] = {"root": str(root.resolve()), "layout": used, "splits": {}}
    for split in ("test", "train"):  # the split runs use first
        try:
            samples = index_dataset(root, layout=used, split=split)
        except DataError as exc:
            if split == "test":  # the split runs use: its problems are the user's to fix
                raise
            out["splits"][split] = {"absent": str(exc), "role": SPLIT_ROLES[split]}
            continue
        entry = {"role": SPLIT_ROLES[split], **_split_summary(samples)}
        if check:
            entry["problems"] = find_problems(samples)
        out["splits"][split] = entry
    return out
