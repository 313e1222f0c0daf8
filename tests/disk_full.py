"""Run the aaclip CLI as if the disk holding a store filled up at a given moment (no root needed).

    python disk_full.py LIMIT_BYTES WATCHED_FOLDER MARK FREES -- aaclip arguments...

The fault is the operating system's own: the moment this process opens, for writing, a file under
WATCHED_FOLDER whose path contains MARK (say "/checkpoints/": a checkpoint being copied into the
artifact store), its file-size limit (RLIMIT_FSIZE) drops to LIMIT_BYTES, so every write past that
offset in any file fails with EFBIG ("File too large") — the copy stops part-way through the file, and
the SQLite store cannot write its pages past that offset either, as on a full disk. SIGXFSZ is
ignored, so the write fails instead of the process being killed. With FREES = 1 the limit is lifted
again when a file or folder under WATCHED_FOLDER is deleted (the half-written copy removed: the
space comes back, as it would on a real disk); with 0 the disk stays full.

Folders count too: creating one under WATCHED_FOLDER whose path contains MARK ("os.mkdir") fills the
disk, since safetensors writes a checkpoint's files from Rust, where Python's "open" event is not
raised; the checkpoint's staging folder is made first.

With DISK_FULL_SIGNAL set (e.g. SIGTERM) in the environment, that signal is also sent to this process
the moment the disk fills: a user stopping the job just as the disk fills, so the run must be ended
KILLED while the store cannot be written.

Python's audit hooks (``sys.addaudithook``: events "open", "os.mkdir", "os.remove", "shutil.rmtree")
say when; nothing in aaclip is replaced.
"""

from __future__ import annotations

import os
import resource
import signal
import sys

limit, watched, mark, frees = int(sys.argv[1]), os.path.realpath(sys.argv[2]), sys.argv[3], sys.argv[4] == "1"
assert sys.argv[5] == "--"
args = sys.argv[6:]
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND


def _under(path) -> str | None:
    if isinstance(path, int):
        return None
    path = os.path.realpath(os.fsdecode(path))
    return path if path.startswith(watched + os.sep) else None


def _writing(mode, flags) -> bool:
    if isinstance(mode, str):
        return any(c in mode for c in "wax+")
    return isinstance(flags, int) and bool(flags & WRITE_FLAGS)


SIGNAL = os.environ.get("DISK_FULL_SIGNAL")
_filled: list[bool] = []


def _fill() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    if SIGNAL and not _filled:
        os.kill(os.getpid(), getattr(signal, SIGNAL))
    _filled.append(True)


def _hook(event: str, event_args: tuple) -> None:
    creating = event == "os.mkdir" or (event == "open" and len(event_args) > 2 and _writing(*event_args[1:3]))
    if creating and event_args:
        path = _under(event_args[0])
        if path is not None and mark in path:
            _fill()
    elif frees and event in ("os.remove", "shutil.rmtree") and event_args and _under(event_args[0]):
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


sys.addaudithook(_hook)
sys.argv = ["aaclip", *args]
from aaclip_cli.main import main  # noqa: E402 - after the hook, so every write of the job is seen

main()
