"""Files written atomically, with the modes the process umask gives ordinary files (typically
0644), and the SHA-256 of a file: what the scorer writes and checks. `aaclip_core.files` imports
these and adds the folder writers of the training stack.

`tempfile.mkstemp` makes 0600 files, which is right for scratch space but stays on a file that is
renamed into place: a teammate on a shared file system could not read it. Every result is written
under a temporary name beside its destination (the same file system, so the rename is atomic),
renamed into place only when complete, and removed if writing fails, so a reader or an interrupted
run never sees a half-written file.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
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


@contextlib.contextmanager
def atomic_path(dest: Path) -> Iterator[Path]:
    """Yield a temporary file path beside ``dest`` for any writer to fill; when the block completes
    it is renamed onto ``dest`` (with the umask's mode), and when it raises it is removed and
    ``dest`` is left as it was."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, name = temp_file_beside(dest)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        # Some writers (safetensors among them) recreate the file 0600 rather than fill it.
        os.replace(with_umask_mode(tmp), dest)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def sha256_of(path: Path) -> str:
    """The SHA-256 of a file's bytes (hex), read in 1 MiB chunks so a large model file is never
    held in memory whole."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
