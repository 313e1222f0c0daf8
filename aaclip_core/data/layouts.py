"""Index public anomaly-detection dataset layouts into lists of `Sample`.

Indexers only list and match file names (plus reading a metadata file for VisA/jsonl); opening
images is `validate_samples`'s job. Every result is sorted by (class, path) so that the same
dataset always yields the same order.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

# Image suffixes, the train/test split folders, the mask folders and an image's class by its path are
# facts the scorer needs too: their home is aaclip_score.layouts.
from aaclip_score.layouts import IMAGE_EXTENSIONS, MASK_FOLDERS, SPLITS, class_of_image  # noqa: F401

from aaclip_core.data.samples import ANOMALOUS, NORMAL, NORMAL_DEFECT, Sample, sort_samples
from aaclip_core.errors import ConfigError, DataError
from aaclip_core.files import atomic_write_text, not_utf8
from aaclip_core.names import INDEX_LAYOUTS, LAYOUTS

JSONL_DEFAULT_NAME = "full-shot.jsonl"
VISA_CSV = Path("split_csv") / "1cls.csv"

# One line per layout: used in error messages so the user sees what was expected.
LAYOUT_DESCRIPTIONS = {
    "mvtec": "<class>/test/<defect>/*.png with masks <class>/ground_truth/<defect>/<stem>_mask.png",
    "mpdd": "same as mvtec",
    "visa": f"{VISA_CSV.as_posix()} with columns object,split,label,image,mask",
    "btad": "<class>/test/ok|ko/* with masks <class>/ground_truth/ko/<stem>.png|.bmp",
    "folder": "<class>/normal/*, <class>/anomaly/* and optional masks <class>/masks/<stem>.png",
    "jsonl": f"a JSON-lines file (or a directory holding {JSONL_DEFAULT_NAME}) with one "
    '{"image_path", "label", "class_name", "mask_path"} object per line',
}
assert tuple(LAYOUT_DESCRIPTIONS) == INDEX_LAYOUTS, "describe every layout of aaclip_core.names"


def _is_image(path: Path) -> bool:
    return (
        path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")
    )


def _images_in(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if _is_image(p))


def _subdirs(directory: Path) -> list[Path]:
    # Hidden directories hold caches and half-written temp data, never classes.
    return sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))


def _class_dirs(root: Path, is_class_dir: Callable[[Path], bool]) -> list[Path]:
    """Class folders under ``root``, or ``root`` itself when it is a single class folder.

    Folders that do not look like a class (a README folder, ``split_csv``) are skipped so
    that dataset roots with extra material still index.
    """
    if is_class_dir(root):
        return [root]
    return [d for d in _subdirs(root) if is_class_dir(d)]


def _first_existing(candidates: Iterable[Path]) -> Path | None:
    return next((p for p in candidates if p.is_file()), None)


def _mask_file(folder: Path, stem: str, extensions: Sequence[str] = (".png",)) -> Path | None:
    """The mask ``folder/stem.ext`` for the first extension found, in lower or upper case (a camera
    that writes IMG_1.PNG writes its masks as .PNG too)."""
    return _first_existing(folder / f"{stem}{case}" for ext in extensions for case in (ext, ext.upper()))


# --------------------------------------------------------------------------- mvtec / mpdd


def _looks_mvtec(class_dir: Path) -> bool:
    # Checked after BTAD (whose class folders also have test/), so test/ alone is enough here.
    return (class_dir / "test").is_dir() or (class_dir / "train" / "good").is_dir()


def _check_no_empty_class(empty: list[Path], samples: list[Sample], split: str, layout: str) -> None:
    """A class folder without images beside classes with images is a mistake to name, not to skip
    (a dataset with no images at all gets `index_dataset`'s message instead)."""
    if empty and samples:
        raise DataError(
            f"Class folder {empty[0]} has no {split} images" + (f" (nor {len(empty) - 1} more)" if len(empty) > 1 else "")
            + f"; layout {layout!r} expects {LAYOUT_DESCRIPTIONS[layout]}. Add its images or move the folder out "
            "of the dataset root."
        )


def _index_mvtec(root: Path, split: str) -> list[Sample]:
    samples: list[Sample] = []
    empty = []
    for class_dir in _class_dirs(root, lambda d: (d / split).is_dir()):
        before = len(samples)
        _index_mvtec_class(class_dir, split, samples)
        if len(samples) == before:
            empty.append(class_dir)
    _check_no_empty_class(empty, samples, split, "mvtec")
    return samples


def _index_mvtec_class(class_dir: Path, split: str, samples: list[Sample]) -> None:
    if split == "train":
        samples += [Sample(p, NORMAL, class_dir.name, None) for p in _images_in(class_dir / "train" / "good")]
        return
    for defect_dir in _subdirs(class_dir / "test"):
        defect = defect_dir.name
        for image in _images_in(defect_dir):
            if defect == NORMAL_DEFECT:
                samples.append(Sample(image, NORMAL, class_dir.name, None))
                continue
            mask = _mask_file(class_dir / "ground_truth" / defect, f"{image.stem}_mask")
            if mask is None:
                expected = class_dir / "ground_truth" / defect / f"{image.stem}_mask.png"
                raise DataError(
                    f"Anomalous image {image} has no mask: expected {expected}. MVTec-style "
                    "datasets need a mask for every image outside test/good; add it or "
                    "move the image."
                )
            samples.append(Sample(image, ANOMALOUS, class_dir.name, mask, defect))


# --------------------------------------------------------------------------- btad


def _looks_btad(class_dir: Path) -> bool:
    return any((class_dir / split / name).is_dir() for split in SPLITS for name in ("ok", "ko"))


def _index_btad(root: Path, split: str) -> list[Sample]:
    samples = []
    empty = []
    for class_dir in _class_dirs(root, lambda d: (d / split).is_dir()):
        if not any(_images_in(class_dir / split / name) for name in ("ok", "ko")):
            empty.append(class_dir)
        samples += [
            Sample(p, NORMAL, class_dir.name, None) for p in _images_in(class_dir / split / "ok")
        ]
        if split == "train":
            continue
        for image in _images_in(class_dir / "test" / "ko"):
            mask_dir = class_dir / "ground_truth" / "ko"
            mask = _mask_file(mask_dir, image.stem, (".png", ".bmp"))
            if mask is None:
                raise DataError(
                    f"Anomalous image {image} has no mask: expected {mask_dir / image.stem}.png "
                    "(or .bmp). Add the mask or move the image out of test/ko."
                )
            samples.append(Sample(image, ANOMALOUS, class_dir.name, mask, "ko"))
    _check_no_empty_class(empty, samples, split, "btad")
    return samples


# --------------------------------------------------------------------------- folder


def _looks_folder(class_dir: Path) -> bool:
    return (class_dir / "normal").is_dir() or (class_dir / "anomaly").is_dir()


def _index_folder(root: Path, split: str) -> list[Sample]:
    _reject_train_split("folder", split)
    samples = []
    empty = []
    for class_dir in _class_dirs(root, _looks_folder):
        if not any(_images_in(class_dir / name) for name in ("normal", "anomaly")):
            empty.append(class_dir)
        samples += [
            Sample(p, NORMAL, class_dir.name, None) for p in _images_in(class_dir / "normal")
        ]
        for image in _images_in(class_dir / "anomaly"):
            mask = _mask_file(class_dir / "masks", image.stem)
            samples.append(Sample(image, ANOMALOUS, class_dir.name, mask, "anomaly"))
    _check_no_empty_class(empty, samples, split, "folder")
    return samples


def _reject_train_split(layout: str, split: str) -> None:
    # These layouts have no train/test distinction; silently returning the same images for
    # "train" would leak evaluation data into training.
    if split != "test":
        raise DataError(
            f"The {layout!r} layout has no {split!r} split: it lists one set of labelled images. "
            "Index it with split='test', or use an MVTec/VisA/BTAD layout that has a train split."
        )


# --------------------------------------------------------------------------- visa


def _index_visa(root: Path, split: str) -> list[Sample]:
    csv_path = root / VISA_CSV
    if not csv_path.is_file():
        raise DataError(
            f"VisA split file {csv_path} does not exist. Expected layout 'visa': "
            f"{LAYOUT_DESCRIPTIONS['visa']}."
        )
    try:
        with csv_path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            missing = {"object", "split", "label", "image", "mask"} - set(reader.fieldnames or ())
            if missing:
                raise DataError(
                    f"VisA split file {csv_path} lacks column(s) {', '.join(sorted(missing))}; "
                    "it needs the header object,split,label,image,mask."
                )
            rows = [
                (line_no, row)
                for line_no, row in enumerate(reader, start=2)
                if row["split"].strip() == split
            ]
    except UnicodeDecodeError as exc:
        raise DataError(f"VisA split file {csv_path} cannot be read: {not_utf8(exc)}. Save it as UTF-8.") from None
    return [_visa_sample(root, csv_path, line_no, row) for line_no, row in rows]


def _visa_sample(root: Path, csv_path: Path, line_no: int, row: dict[str, str]) -> Sample:
    where = f"{csv_path} line {line_no}"
    label_text = row["label"].strip().lower()
    if label_text not in ("normal", "anomaly"):
        raise DataError(
            f"{where} has label {row['label']!r}; VisA labels must be 'normal' or 'anomaly'."
        )
    image = _existing_listed_file(root, row["image"], where, "image")
    if label_text == "normal":
        return Sample(image, NORMAL, row["object"].strip(), None)
    if not row["mask"].strip():
        raise DataError(
            f"{where} lists anomalous image {image} without a mask; fill in the mask column."
        )
    mask = _existing_listed_file(root, row["mask"], where, "mask")
    return Sample(image, ANOMALOUS, row["object"].strip(), mask, "anomaly")


def _existing_listed_file(base: Path, relative: str, where: str, what: str) -> Path:
    path = (base / relative.strip()).resolve()
    if not path.is_file():
        raise DataError(
            f"{where} lists {what} {path}, which does not exist. Paths are relative to {base}; "
            "fix the entry or restore the file."
        )
    return path


# --------------------------------------------------------------------------- jsonl


def _jsonl_file(root: Path) -> Path | None:
    if root.is_file() and root.suffix == ".jsonl":
        return root
    candidate = root / JSONL_DEFAULT_NAME
    return candidate if candidate.is_file() else None


def _index_jsonl(root: Path, split: str) -> list[Sample]:
    _reject_train_split("jsonl", split)
    jsonl = _jsonl_file(root)
    if jsonl is None:
        raise DataError(
            f"No metadata file at {root}: the 'jsonl' layout needs a .jsonl file or a directory "
            f"holding {JSONL_DEFAULT_NAME}."
        )
    base = jsonl.parent
    samples = []
    try:
        with jsonl.open(encoding="utf-8") as handle:
            for line_no, line in enumerate(handle, start=1):
                if line.strip():
                    samples.append(_jsonl_sample(base, f"{jsonl} line {line_no}", line))
    except UnicodeDecodeError as exc:
        raise DataError(f"Metadata file {jsonl} cannot be read: {not_utf8(exc)}. Save it as UTF-8.") from None
    return samples


def _jsonl_sample(base: Path, where: str, line: str) -> Sample:
    try:
        record = json.loads(line)
        image_rel, label, class_name = record["image_path"], record["label"], record["class_name"]
        mask_rel = record.get("mask_path") or ""
    except (json.JSONDecodeError, TypeError, KeyError, AttributeError) as exc:
        raise DataError(
            f"{where} is not a valid metadata record ({exc}); each line must be a JSON object "
            'with "image_path", "label", "class_name" and "mask_path".'
        ) from exc
    if label not in (0, 1) or isinstance(label, float):
        raise DataError(f"{where} has label {label!r}; use 0 (normal) or 1 (anomalous).")
    image = _existing_listed_file(base, image_rel, where, "image")
    mask = _existing_listed_file(base, mask_rel, where, "mask") if mask_rel else None
    defect = NORMAL_DEFECT if label == NORMAL else record.get("defect", "anomaly")
    return Sample(image, int(label), str(class_name), mask, str(defect))


def write_metadata_jsonl(samples: Iterable[Sample], path: Path, root: Path) -> None:
    """Write ``samples`` in the reference JSON-lines format with paths relative to ``root``.

    The file is replaced atomically so a reader never sees a truncated index.
    """
    path = Path(path)
    root = Path(root).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)

    def relative(p: Path) -> str:
        return Path(os.path.relpath(p, root)).as_posix()

    lines = [
        json.dumps(
            {
                "image_path": relative(s.image_path),
                "label": s.label,
                "class_name": s.class_name,
                "mask_path": relative(s.mask_path) if s.mask_path is not None else "",
            }
        )
        for s in samples
    ]
    atomic_write_text(path, "".join(line + "\n" for line in lines))


# --------------------------------------------------------------------------- detection


def detect_layout(root: Path) -> str:
    """Guess the layout of ``root`` from its metadata files and folder names."""
    root = Path(root)
    if _jsonl_file(root) is not None:
        return "jsonl"
    if not root.is_dir():
        raise DataError(f"Dataset root {root} does not exist or is not a directory.")
    if (root / VISA_CSV).is_file():
        return "visa"
    # BTAD class folders also have test/ and ground_truth/, so ok/ko must be checked first.
    for layout, looks in (
        ("btad", _looks_btad),
        ("mvtec", _looks_mvtec),
        ("folder", _looks_folder),
    ):
        if _class_dirs(root, looks):
            return layout
    looked_for = "; ".join(
        f"{name}: {desc}" for name, desc in LAYOUT_DESCRIPTIONS.items() if name != "mpdd"
    )
    raise DataError(
        f"Cannot recognise the layout of dataset root {root}. Looked for — {looked_for}. "
        "Pass the layout explicitly or reorganise the folder."
    )


def looks_like(root: Path, layout: str = "auto") -> bool:
    """Whether ``root`` holds a dataset in ``layout`` (any known layout for "auto"), judged from
    file and folder names only; never raises."""
    root = Path(root)
    try:
        if layout == "auto":
            detect_layout(root)
            return True
        if layout == "jsonl":
            return _jsonl_file(root) is not None
        if not root.is_dir():
            return False
        if layout == "visa":
            return (root / VISA_CSV).is_file()
        looks = {"mvtec": _looks_mvtec, "mpdd": _looks_mvtec, "btad": _looks_btad, "folder": _looks_folder}
        return bool(_class_dirs(root, looks[layout])) if layout in looks else False
    except (DataError, OSError):
        return False


_INDEXERS: dict[str, Callable[[Path, str], list[Sample]]] = {
    "mvtec": _index_mvtec,
    "mpdd": _index_mvtec,
    "btad": _index_btad,
    "folder": _index_folder,
    "visa": _index_visa,
    "jsonl": _index_jsonl,
}


def filesystem_error(exc: OSError | RuntimeError, fallback: Path) -> DataError:
    """A file-system failure while listing a dataset (a symbolic-link loop, an unreadable folder) as
    a DataError naming the path. pathlib reports a loop met by ``resolve()`` as a RuntimeError."""
    path = getattr(exc, "filename", None)
    if path is None:
        found = re.search(r"Symlink loop from '(.*)'", str(exc))
        path = found.group(1) if found else fallback
    if isinstance(exc, RuntimeError) or getattr(exc, "errno", None) == errno.ELOOP:
        why = "is a symbolic link that loops back on itself (ELOOP)"
    else:
        why = f"cannot be read ({getattr(exc, 'strerror', None) or exc})"
    return DataError(f"{path} {why}, met while indexing the dataset at {fallback}. Fix or remove that entry.")


def index_dataset(root: Path, layout: str = "auto", split: str = "test") -> list[Sample]:
    """List the images of the dataset at ``root`` as absolute-path `Sample`s, sorted."""
    try:
        return _index_dataset(root, layout, split)
    except (OSError, RuntimeError) as exc:
        if isinstance(exc, RuntimeError) and "Symlink loop" not in str(exc):
            raise
        raise filesystem_error(exc, Path(root)) from None


def _index_dataset(root: Path, layout: str, split: str) -> list[Sample]:
    if layout not in LAYOUTS:
        raise ConfigError(f"Unknown dataset layout {layout!r}; choose one of {', '.join(LAYOUTS)}.")
    if split not in SPLITS:
        raise ConfigError(f"Unknown dataset split {split!r}; choose 'train' or 'test'.")
    root = Path(root).expanduser().resolve()
    if not root.exists():
        expected = (
            f"one of the layouts {', '.join(LAYOUT_DESCRIPTIONS)}"
            if layout == "auto"
            else f"layout {layout!r} ({LAYOUT_DESCRIPTIONS[layout]})"
        )
        raise DataError(
            f"Dataset root {root} does not exist; expected a dataset in {expected}. Check the path."
        )
    if layout == "auto":
        layout = detect_layout(root)
    samples = _INDEXERS[layout](root, split)
    if not samples:
        raise DataError(
            f"Found no {split} images under dataset root {root} for layout {layout!r} "
            f"({LAYOUT_DESCRIPTIONS[layout]}). Check the path, layout and split."
        )
    return sort_samples(samples)
