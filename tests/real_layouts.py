"""Small datasets written on the fly in the real MVTec AD and VisA layouts (not the demo's own
folders), drawn with the demo renderer so that the images have real texture and real defects."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from aaclip_core.data.synthetic import DEFECTS, render_sample, sample_entropy

SIZE = 64


def _save(array: np.ndarray, path: Path, fmt: str = "PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))


def write_visa(root: Path, classes=("plank", "disc"), n_normal: int = 4, n_anomalous: int = 4, seed: int = 7,
               n_train: int = 2) -> Path:
    """VisA: ``<class>/Data/Images/Normal|Anomaly/NNNN.JPG``, masks ``<class>/Data/Masks/Anomaly/NNNN.png``
    and ``split_csv/1cls.csv`` listing every image with its split and label."""
    rows = ["object,split,label,image,mask"]
    for cls in classes:
        for i in range(n_normal + n_train):
            image, _ = render_sample(cls, None, SIZE, sample_entropy(seed, cls, "test/good", i))
            rel = f"{cls}/Data/Images/Normal/{i:04d}.JPG"
            _save(image, root / rel, "JPEG")
            rows.append(f"{cls},{'train' if i >= n_normal else 'test'},normal,{rel},")
        for i in range(n_anomalous):
            image, mask = render_sample(cls, DEFECTS[i % len(DEFECTS)], SIZE,
                                        sample_entropy(seed, cls, DEFECTS[i % len(DEFECTS)], i))
            rel = f"{cls}/Data/Images/Anomaly/{100 + i:04d}.JPG"
            mask_rel = f"{cls}/Data/Masks/Anomaly/{100 + i:04d}.png"
            _save(image, root / rel, "JPEG")
            _save(mask.astype(np.uint8) * 255, root / mask_rel)
            rows.append(f"{cls},test,anomaly,{rel},{mask_rel}")
    csv_path = root / "split_csv" / "1cls.csv"
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    csv_path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return root


def write_mvtec(root: Path, classes=("fabric",), n_normal: int = 4, n_anomalous: int = 4, seed: int = 11,
                n_train: int = 2) -> Path:
    """MVTec AD: ``<class>/train/good``, ``<class>/test/good|<defect>``, ``<class>/ground_truth/<defect>/NNN_mask.png``."""
    for cls in classes:
        for i in range(n_train):
            _save(render_sample(cls, None, SIZE, sample_entropy(seed, cls, "train/good", i))[0],
                  root / cls / "train" / "good" / f"{i:03d}.png")
        for i in range(n_normal):
            _save(render_sample(cls, None, SIZE, sample_entropy(seed, cls, "test/good", i))[0],
                  root / cls / "test" / "good" / f"{i:03d}.png")
        for i in range(n_anomalous):
            defect = DEFECTS[i % len(DEFECTS)]
            image, mask = render_sample(cls, defect, SIZE, sample_entropy(seed, cls, defect, i))
            _save(image, root / cls / "test" / defect / f"{i:03d}.png")
            _save(mask.astype(np.uint8) * 255, root / cls / "ground_truth" / defect / f"{i:03d}_mask.png")
    return root


def listing(folder: Path) -> list[str]:
    """Every path under ``folder`` (relative, sorted): to show that nothing was written."""
    return sorted(p.relative_to(folder).as_posix() for p in Path(folder).rglob("*"))
