"""Which images `predict` scores, where their outputs go, and which class each belongs to."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from aaclip_score.errors import DataError
from aaclip_score.layouts import IMAGE_EXTENSIONS, MASK_FOLDERS, class_of_image

SKIP_DIRS = MASK_FOLDERS
# The columns of predictions.jsonl, in order (the same for a model and for an exported file).
ROW_KEYS = (
    "path",
    "class_name",
    "image_score",
    "raw_map_max",
    "raw_det",
    "threshold",
    "threshold_source",
    "verdict",
    "overlay",
    "map",
    "error",
)

CLASS_SEARCH_DEPTH = 3


@dataclass
class ImageJob:
    path: Path
    key: Path  # output location relative to the output folder, without suffix
    class_name: str | None = None
    error: str | None = None


def _images_in(folder: Path, out_dir: Path) -> list[Path]:
    out_res = out_dir.resolve()
    found = []
    for f in sorted(folder.rglob("*")):
        rel = f.relative_to(folder)
        if any(part in SKIP_DIRS or part.startswith(".") for part in rel.parts):
            continue
        if f.suffix.lower() not in IMAGE_EXTENSIONS or not f.is_file():
            continue
        if out_res in f.resolve().parents:
            continue
        found.append(f)
    return found


def collect_images(inputs: list[Path], out_dir: Path) -> list[ImageJob]:
    """Files as given; folders searched recursively (sorted), skipping mask folders, hidden
    entries and the output folder. Output keys mirror the inputs (folder name / relative path) and never collide."""
    jobs: list[ImageJob] = []
    used: set[str] = set()

    def add(path: Path, key: Path) -> None:
        stem, k = key.with_suffix(""), 1
        candidate = stem
        while candidate.as_posix().lower() in used:
            k += 1
            candidate = stem.with_name(f"{stem.name}_{k}")
        used.add(candidate.as_posix().lower())
        jobs.append(ImageJob(path=path, key=candidate))

    for given in inputs:
        p = Path(given).expanduser()
        if p.is_dir():
            found = _images_in(p, out_dir)
            if not found:
                raise DataError(f"Folder {p} holds no image files ({', '.join(IMAGE_EXTENSIONS)}).")
            name = p.resolve().name or "input"
            for f in found:
                add(f, Path(name) / f.relative_to(p))
        elif p.exists():
            add(p, Path(p.name))
        else:
            raise DataError(f"{p} does not exist: pass image files or folders of images.")
    return jobs


def resolve_class(path: Path, fallback: str | None, known: set[str]) -> str:
    """The class of one image: where it sits in an indexed layout (`class_of_image`: MVTec AD, MPDD,
    BTAD, VisA, the plain folder layout), else the nearest of its parent folders that is a known class
    of the model, else ``fallback`` (``--class``). Each image is resolved on its own, so one call scores a
    folder of several classes."""
    resolved = Path(path).resolve()
    by_layout = class_of_image(resolved)
    if by_layout is not None:
        return by_layout
    parents = [q.name for q in resolved.parents][:CLASS_SEARCH_DEPTH]
    for name in parents:
        if name in known:
            return name
    if fallback:
        return fallback
    raise DataError(
        f"cannot tell the class of {path}: it sits in no dataset layout (<class>/test/<defect>/, "
        f"<class>/Data/Images/Anomaly/, <class>/normal/, ...) and none of its folders ({', '.join(parents) or '-'}) "
        f"is a known class of the model ({', '.join(sorted(known)) or 'none'}); pass --class NAME"
    )


def assign_classes(jobs: list[ImageJob], fallback: str | None, known: set[str]) -> set[str]:
    """Give every job its class (or an error); returns the classes found."""
    for job in jobs:
        try:
            job.class_name = resolve_class(job.path, fallback, known)
        except DataError as exc:
            job.error = str(exc)
    return {j.class_name for j in jobs if j.error is None}


def row(job: ImageJob, **values) -> dict:
    out = dict.fromkeys(ROW_KEYS)
    out.update(path=str(job.path.resolve() if job.path.exists() else job.path), class_name=job.class_name)
    out.update(values)
    return out
