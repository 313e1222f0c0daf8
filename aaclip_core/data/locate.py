"""Helping a user point a recipe at a dataset: what a root must hold, and where the dataset
actually is when a download unpacked it one folder deeper (``data/VisA/VisA_20220922/``) or
next to the expected name (``data/VisA_20220922/``).

Only file and folder names are looked at, and at most one level down, so a hint costs a few
directory listings even on a big disk.
"""

from __future__ import annotations

import os
from pathlib import Path

from aaclip_core.data.layouts import LAYOUT_DESCRIPTIONS, looks_like


def expected_content(layout: str) -> str:
    """One sentence saying what a dataset root of ``layout`` must hold."""
    if layout in LAYOUT_DESCRIPTIONS:
        return f"a {layout} dataset: {LAYOUT_DESCRIPTIONS[layout]}"
    described = "; ".join(f"{name}: {desc}" for name, desc in LAYOUT_DESCRIPTIONS.items() if name != "mpdd")
    return f"a dataset in one of the known layouts ({described})"


def _subdirs(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return []


def nested_datasets(root: Path, layout: str) -> list[Path]:
    """Folders that hold a ``layout`` dataset one level below ``root``, or beside it under a name
    that starts like it (and one level inside those), nearest first."""
    root = Path(root)
    candidates: list[Path] = []
    if root.is_dir():
        candidates += _subdirs(root)
    prefix = root.name.lower()
    if prefix and root.parent.is_dir():
        for sibling in _subdirs(root.parent):
            if sibling != root and sibling.name.lower().startswith(prefix):
                candidates += [sibling, *_subdirs(sibling)]
    return [c for c in candidates if looks_like(c, layout)]


def shown(path: Path) -> str:
    """A path as the user would type it from the working directory (relative when inside it)."""
    path = Path(path)
    try:
        rel = os.path.relpath(path.resolve(), Path.cwd())
    except ValueError:  # another drive on Windows
        return str(path)
    return rel if not rel.startswith("..") else str(path.resolve())


def dataset_hint(root: Path, layout: str, field: str) -> str:
    """What to do about a ``field.root`` that holds no ``layout`` dataset: where relative paths are
    read from, what the root must hold, and any dataset found one level down."""
    root = Path(root).expanduser()
    parts = []
    if not root.is_absolute():
        parts.append(f"Relative paths are read from the working directory {Path.cwd()}.")
    parts.append(f"{field}.root must hold {expected_content(layout)}.")
    found = nested_datasets(root, layout)
    if found:
        first = shown(found[0])
        others = f" (also: {', '.join(shown(f) for f in found[1:3])})" if len(found) > 1 else ""
        parts.append(
            f"Found one at {first}{others}, probably a download folder unpacked one level down: "
            f'use --set {field}.root="{first}".'
        )
    return " ".join(parts)
