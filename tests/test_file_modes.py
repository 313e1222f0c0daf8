"""Files and folders aaclip writes take their modes from the process umask, as ordinary files do:
0644 / 0755 under umask 022 (a teammate on a shared file system can read them), 0600 / 0700
under umask 077. They are written to temporary names (mkstemp / mkdtemp: 0600 / 0700) and renamed
into place, so this is not what they get by default."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from aaclip_core.checkpoints.checkpoint import export_reference, save_checkpoint
from aaclip_core.data import ensure_demo_data, index_dataset, write_metadata_jsonl
from aaclip_core.files import atomic_write_text


@pytest.fixture(params=[0o022, 0o077], ids=["umask022", "umask077"])
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def _expect(umask: int, path: Path) -> None:
    want = (0o777 if path.is_dir() else 0o666) & ~umask
    assert _mode(path) == want, f"{path}: {oct(_mode(path))} != {oct(want)}"


def _adapters() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"text_adapter.0.weight": torch.randn(4, 4, generator=g), "image_adapter.0.weight": torch.randn(4, 4, generator=g)}


def test_checkpoint_folder_and_files(umask, tmp_path):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1, momentum=0.9)
    ckpt = save_checkpoint(tmp_path / "checkpoints" / "final", _adapters(), {"stage": "stage2"},
                           optimizer_state=opt.state_dict(), extra_tensors={"rng": torch.zeros(3)})
    _expect(umask, ckpt)
    files = sorted(ckpt.iterdir())
    assert len(files) == 4  # adapters, optimiser, extra state, manifest
    for f in files:
        _expect(umask, f)


def test_exported_reference_files(umask, tmp_path):
    for f in export_reference(_adapters(), tmp_path / "ref", 5, 20):
        _expect(umask, f)


def test_text_and_metadata_files(umask, tmp_path, demo_root):
    atomic_write_text(tmp_path / "report.json", "{}")
    _expect(umask, tmp_path / "report.json")
    samples = index_dataset(demo_root / "test", layout="mvtec", split="test")[:5]
    write_metadata_jsonl(samples, tmp_path / "train.jsonl", demo_root / "test")
    _expect(umask, tmp_path / "train.jsonl")


def test_demo_data_folders_and_images(umask, tmp_path):
    train, test = ensure_demo_data(tmp_path / "demo", image_size=32)
    for root in (train, test):
        _expect(umask, root)
        some_image = next(root.rglob("*.png"))
        _expect(umask, some_image)
        _expect(umask, some_image.parent)

