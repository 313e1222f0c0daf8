"""The one way aaclip writes a result: beside its destination, renamed into place when complete,
gone without a trace when writing fails."""

from __future__ import annotations

import hashlib
import os

import pytest

from aaclip_core.files import atomic_dir, atomic_path, atomic_write_bytes, atomic_write_text, sha256_of


def _entries(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_atomic_path_renames_into_place_on_success(tmp_path):
    dest = tmp_path / "sub" / "model.bin"  # the missing folder is created
    with atomic_path(dest) as tmp:
        assert tmp.parent == dest.parent and tmp != dest
        assert not dest.exists()  # nothing visible until the block completes
        tmp.write_bytes(b"new")
    assert dest.read_bytes() == b"new"
    assert _entries(dest.parent) == ["model.bin"]


def test_atomic_path_exception_keeps_destination_and_leaves_no_temp(tmp_path):
    dest = tmp_path / "report.json"
    dest.write_text("old", encoding="utf-8")
    with pytest.raises(RuntimeError, match="interrupted"):
        with atomic_path(dest) as tmp:
            tmp.write_text("half", encoding="utf-8")
            raise RuntimeError("interrupted")
    assert dest.read_text(encoding="utf-8") == "old"
    assert _entries(tmp_path) == ["report.json"]


def test_atomic_path_writer_that_removes_its_file(tmp_path):
    """A writer that deletes the temporary file and then fails: the error is the writer's."""
    dest = tmp_path / "plot.png"
    with pytest.raises(ValueError, match="writer"):
        with atomic_path(dest) as tmp:
            tmp.unlink()
            raise ValueError("writer failed")
    assert _entries(tmp_path) == []


def test_rename_onto_unwritable_destination_fails_cleanly(tmp_path):
    """A destination that cannot be replaced (here a folder in its place): the rename's OSError
    comes through and the temporary file is removed."""
    dest = tmp_path / "detector.onnx"
    dest.mkdir()
    (dest / "keep").write_text("x", encoding="utf-8")
    with pytest.raises(OSError):
        atomic_write_text(dest, "text")
    assert _entries(tmp_path) == ["detector.onnx"]
    assert _entries(dest) == ["keep"]


def test_atomic_write_text_and_bytes(tmp_path):
    atomic_write_text(tmp_path / "a.txt", "héllo\n")
    atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
    atomic_write_text(tmp_path / "a.txt", "again")  # an existing file is replaced
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "again"
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert _entries(tmp_path) == ["a.txt", "b.bin"]


def test_atomic_path_gives_the_umask_mode_even_to_a_recreated_file(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "w.safetensors") as tmp:
            tmp.unlink()  # as a writer that creates its file 0600 would
            fd = os.open(tmp, os.O_CREAT | os.O_WRONLY, 0o600)
            os.close(fd)
    finally:
        os.umask(old)
    assert (tmp_path / "w.safetensors").stat().st_mode & 0o777 == 0o644


def test_atomic_dir_replaces_an_existing_folder(tmp_path):
    dest = tmp_path / "final"
    dest.mkdir()
    (dest / "old.txt").write_text("old", encoding="utf-8")
    with atomic_dir(dest) as staging:
        assert staging.parent == tmp_path and staging != dest
        (staging / "new.txt").write_text("new", encoding="utf-8")
    assert _entries(dest) == ["new.txt"]
    assert _entries(tmp_path) == ["final"]  # no staging or stale folder left


def test_atomic_dir_exception_keeps_the_old_folder(tmp_path):
    dest = tmp_path / "final"
    dest.mkdir()
    (dest / "old.txt").write_text("old", encoding="utf-8")
    with pytest.raises(RuntimeError):
        with atomic_dir(dest) as staging:
            (staging / "new.txt").write_text("new", encoding="utf-8")
            raise RuntimeError("interrupted")
    assert _entries(dest) == ["old.txt"]
    assert _entries(tmp_path) == ["final"]


def test_atomic_dir_exception_on_first_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "stage1"):
            raise RuntimeError("interrupted")
    assert _entries(tmp_path) == []


def test_sha256_of_matches_hashlib_across_chunks(tmp_path):
    data = os.urandom((1 << 20) + 123)  # more than one 1 MiB chunk
    (tmp_path / "f").write_bytes(data)
    assert sha256_of(tmp_path / "f") == hashlib.sha256(data).hexdigest()


# A copy stopped part-way by the operating system: a process whose file-size limit (RLIMIT_FSIZE) is
# below the file's size gets EFBIG after the first bytes, as a full disk gives ENOSPC.
COPY_UNDER_A_SIZE_LIMIT = """
import errno, resource, signal, sys
from pathlib import Path
from aaclip_core.files import copy_file_atomic, copy_tree_atomic
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (65536, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
copy = copy_tree_atomic if sys.argv[1] == "tree" else copy_file_atomic
try:
    copy(Path(sys.argv[2]), Path(sys.argv[3]))
except OSError as exc:
    print(errno.errorcode[exc.errno], Path(exc.filename).name)
"""


@pytest.mark.parametrize("kind", ["tree", "file"])
def test_a_copy_stopped_part_way_leaves_nothing_in_the_destination(kind, tmp_path):
    import subprocess
    import sys

    src = tmp_path / "ckpt"
    src.mkdir()
    (src / "a_manifest.json").write_text("{}")
    (src / "b_adapters.safetensors").write_bytes(os.urandom(300_000))
    store = tmp_path / "store"
    store.mkdir()
    (store / "old.json").write_text("kept")
    source, dest = (src, store / "ckpt") if kind == "tree" else (src / "b_adapters.safetensors", store / "b.bin")
    out = subprocess.run([sys.executable, "-c", COPY_UNDER_A_SIZE_LIMIT, kind, str(source), str(dest)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["EFBIG", "b_adapters.safetensors"]  # it failed in the large file, part-way
    assert _entries(store) == ["old.json"]  # no half-written file or folder, nothing hidden beside it
    if kind == "tree":  # an existing folder gets whole files or none: the small one copied, the large one not
        dest.mkdir()
        out = subprocess.run([sys.executable, "-c", COPY_UNDER_A_SIZE_LIMIT, kind, str(source), str(dest)],
                             capture_output=True, text=True, timeout=120)
        assert out.stdout.split() == ["EFBIG", "b_adapters.safetensors"]
        assert _entries(dest) == ["a_manifest.json"]
