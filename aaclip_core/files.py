"""Temporary files and folders that become results, created with the modes the process umask
gives ordinary files (typically 0644 / 0755).

`tempfile.mkstemp` and `mkdtemp` make 0600 / 0700 entries, which is right for scratch space but
stays on a file or folder that is renamed into place (checkpoints, exported weights, metadata,
plots, demo data) or copied into an artifact store: a teammate on a shared file system could not
read it.

Every result is written atomically, in one way: under a temporary name beside its destination (the
same file system, so the rename is atomic), renamed into place only when complete, and removed
if writing fails, so a reader or an interrupted run never sees a half-written file or folder.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

# The single-file writers and the checksum are the scorer's (it writes and checks files without the
# training stack); they are this module's too.
from aaclip_score.files import (
    atomic_path,
    atomic_write_bytes,
    atomic_write_text,
    current_umask,
    sha256_of,
    temp_file_beside,
    with_umask_mode,
)

__all__ = [
    "atomic_dir", "atomic_path", "atomic_write_bytes", "atomic_write_text", "current_umask", "not_utf8",
    "sha256_of", "temp_dir_in", "temp_file_beside", "with_umask_mode",
]


def temp_dir_in(parent: Path, prefix: str) -> Path:
    """A new folder in ``parent``, to be filled and then renamed into place."""
    return with_umask_mode(Path(tempfile.mkdtemp(dir=parent, prefix=prefix)))


def os_cause(exc: OSError) -> str:
    """The operating system's words for a failed file operation, with its errno name:
    "No space left on device (ENOSPC)", "File too large (EFBIG)", "Permission denied (EACCES)"."""
    name = errno.errorcode.get(exc.errno, type(exc).__name__) if exc.errno else type(exc).__name__
    return f"{exc.strerror or exc} ({name})"


def copy_file_atomic(src: Path, dest: Path) -> None:
    """Copy ``src`` onto ``dest`` atomically (``atomic_path``): a copy that fails part-way (a full
    disk, a file-size limit) leaves ``dest`` as it was and nothing beside it."""
    with atomic_path(dest) as tmp:
        shutil.copyfile(src, tmp)


def copy_tree_atomic(src: Path, dest: Path) -> None:
    """Copy the folder ``src`` into ``dest``. A new ``dest`` appears whole or not at all
    (``atomic_dir``); into an existing one each file is copied atomically, so no file is ever
    half-written there, whatever fails. A failure is the first file's own OSError (its errno and
    file name), not shutil.copytree's list of them."""
    src, dest = Path(src), Path(dest)
    if dest.exists():
        _copy_files(src, dest, copy_file_atomic)
        return
    with atomic_dir(dest) as staging:
        _copy_files(src, staging, shutil.copyfile)


def _copy_files(src: Path, dest: Path, copy) -> None:
    for path in sorted(src.rglob("*")):
        target = dest / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            copy(path, target)


def not_utf8(exc: UnicodeDecodeError) -> str:
    """Why a text file could not be decoded, in words: "it is not UTF-8 text (byte 0xff at offset 0)"."""
    byte = exc.object[exc.start:exc.start + 1]
    return f"it is not UTF-8 text (byte 0x{byte.hex() or '??'} at offset {exc.start})"


@contextlib.contextmanager
def atomic_dir(dest: Path) -> Iterator[Path]:
    """Yield a new folder beside ``dest`` to fill; when the block completes it replaces ``dest``
    (a previous ``dest`` is moved aside first, then deleted), and when it raises it is deleted and
    ``dest`` is left as it was. The final rename raises OSError if another writer put a ``dest``
    in place meanwhile."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = temp_dir_in(dest.parent, f".{dest.name}.tmp-")
    try:
        yield staging
        stale = None
        if dest.exists():
            # A folder cannot be renamed onto a non-empty one: move the old one into a hidden
            # sibling of its own, so the gap without ``dest`` is two renames long.
            stale = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.stale-"))
            os.replace(dest, stale / dest.name)
        try:
            os.rename(staging, dest)
        except OSError:
            if stale is not None and not dest.exists():
                os.rename(stale / dest.name, dest)  # nothing took its place: put the old one back
            raise
        finally:
            if stale is not None:
                shutil.rmtree(stale, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
