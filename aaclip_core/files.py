"""Temporary files and folders that become results, created with the modes the process umask
gives ordinary files (typically 0644 / 0755).

`tempfile.mkstemp` and `mkdtemp` make 0600 / 0700 entries, which is right for scratch space but
stays on a file or folder that is renamed into place (checkpoints, exported weights, metadata,
plots, demo data) or copied into an artifact store: a teammate on a shared file system could not
read it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def current_umask() -> int:
    """The process umask. Linux reports it in /proc without changing it; elsewhere it can only be
    read by setting it, which is restored at once."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def with_umask_mode(path: Path) -> Path:
    """Give an existing file or folder the mode an ordinary one gets (some writers, safetensors'
    among them, create files 0600)."""
    path.chmod((0o777 if path.is_dir() else 0o666) & ~current_umask())
    return path


def temp_file_beside(path: Path) -> tuple[int, str]:
    """An open temporary file in ``path``'s folder, to be renamed onto ``path`` when complete."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, 0o666 & ~current_umask())
    return fd, name


def temp_dir_in(parent: Path, prefix: str) -> Path:
    """A new folder in ``parent``, to be filled and then renamed into place."""
    return with_umask_mode(Path(tempfile.mkdtemp(dir=parent, prefix=prefix)))


def not_utf8(exc: UnicodeDecodeError) -> str:
    """Why a text file could not be decoded, in words: "it is not UTF-8 text (byte 0xff at offset 0)"."""
    byte = exc.object[exc.start:exc.start + 1]
    return f"it is not UTF-8 text (byte 0x{byte.hex() or '??'} at offset {exc.start})"
