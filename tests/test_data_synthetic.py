"""The procedural demo dataset: determinism, exact masks, layout, and cached generation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aaclip_core.data import (
    DEFECTS,
    DEMO_CLASSES,
    ensure_demo_data,
    index_dataset,
    render_sample,
    synthetic,
    validate_samples,
    write_synthetic_dataset,
)
from aaclip_core.data.synthetic import COMPLETE_MARKER, sample_entropy
from aaclip_core.errors import ConfigError, DataError

SMALL = dict(image_size=64, n_normal=2, n_anomalous=3, n_train=1)


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def small_demo(monkeypatch):
    """Shrink the demo defaults so cache tests run in milliseconds."""
    monkeypatch.setattr(synthetic, "DEFAULT_N_NORMAL", 2)
    monkeypatch.setattr(synthetic, "DEFAULT_N_ANOMALOUS", 3)
    monkeypatch.setattr(synthetic, "DEFAULT_N_TRAIN", 1)


def test_same_seed_gives_byte_identical_files(tmp_path):
    first = tree_bytes(write_synthetic_dataset(tmp_path / "a", seed=7, **SMALL))
    second = tree_bytes(write_synthetic_dataset(tmp_path / "b", seed=7, **SMALL))
    assert first == second
    assert len(first) == len(DEMO_CLASSES) * (1 + 2 + 3 + 3)  # train, good, defects, masks


def test_different_seed_gives_different_images(tmp_path):
    first = tree_bytes(write_synthetic_dataset(tmp_path / "a", seed=1, **SMALL))
    second = tree_bytes(write_synthetic_dataset(tmp_path / "b", seed=2, **SMALL))
    assert first.keys() == second.keys()
    assert all(first[name] != second[name] for name in first if name.endswith("000.png"))


def test_layout_indexes_as_mvtec_and_validates(tmp_path):
    root = write_synthetic_dataset(tmp_path / "demo", seed=0, **SMALL)
    test = index_dataset(root)
    train = index_dataset(root, split="train")

    for cls in DEMO_CLASSES:
        labels = [s.label for s in test if s.class_name == cls]
        assert labels.count(0) == 2 and labels.count(1) == 3
        assert {s.defect for s in test if s.class_name == cls and s.label == 1} == set(DEFECTS)
    assert len(train) == len(DEMO_CLASSES) and {s.label for s in train} == {0}
    validate_samples(test)  # sizes match and every anomalous mask is non-empty


def test_masks_are_binary_0_255(tmp_path):
    root = write_synthetic_dataset(tmp_path / "demo", seed=0, **SMALL)
    for mask_path in root.rglob("*_mask.png"):
        values = set(np.unique(np.asarray(Image.open(mask_path))).tolist())
        assert values == {0, 255}


@pytest.mark.parametrize("class_name", DEMO_CLASSES)
@pytest.mark.parametrize("defect", DEFECTS)
def test_mask_is_exactly_the_changed_pixels(class_name, defect):
    for index in range(4):
        entropy = sample_entropy(3, class_name, defect, index)
        clean, empty = render_sample(class_name, None, 96, entropy)
        defective, mask = render_sample(class_name, defect, 96, entropy)

        changed = (clean != defective).any(axis=-1)
        assert not empty.any()
        np.testing.assert_array_equal(changed, mask)
        assert 0.02 <= mask.mean() <= 0.10
        # Visible: the mean colour shift inside the defect is well above 8-bit noise.
        shift = np.abs(clean[mask].astype(int) - defective[mask].astype(int)).mean()
        assert shift > 15


def test_written_defect_image_matches_its_render(tmp_path):
    root = write_synthetic_dataset(tmp_path / "demo", seed=5, classes=("disc",), **SMALL)
    image, mask = render_sample("disc", "spot", 64, sample_entropy(5, "disc", "spot", 0))
    np.testing.assert_array_equal(np.asarray(Image.open(root / "disc/test/spot/000.png")), image)
    np.testing.assert_array_equal(
        np.asarray(Image.open(root / "disc/ground_truth/spot/000_mask.png")) > 0, mask
    )


def test_class_subset_renders_the_same_images(tmp_path):
    full = tree_bytes(write_synthetic_dataset(tmp_path / "all", seed=0, **SMALL))
    subset = tree_bytes(
        write_synthetic_dataset(tmp_path / "one", seed=0, classes=("fabric",), **SMALL)
    )
    assert subset == {name: data for name, data in full.items() if name.startswith("fabric/")}


def test_invalid_parameters_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="plank, fabric, disc"):
        write_synthetic_dataset(tmp_path, classes=("teapot",))
    with pytest.raises(ConfigError, match="at least 32"):
        write_synthetic_dataset(tmp_path, image_size=8)


def test_ensure_demo_data_default_sizes_and_held_out_test_root(tmp_path):
    train_root, test_root = ensure_demo_data(tmp_path / "demo", image_size=64)

    assert (train_root, test_root) == (tmp_path / "demo" / "train", tmp_path / "demo" / "test")
    for root in (train_root, test_root):
        test = index_dataset(root)
        assert len(test) == len(DEMO_CLASSES) * 48
        assert sum(s.label for s in test) == len(DEMO_CLASSES) * 24
        assert len(index_dataset(root, split="train")) == len(DEMO_CLASSES) * 8
    marker = json.loads((test_root / COMPLETE_MARKER).read_text())
    assert marker["seed"] == 1000 and marker["image_size"] == 64
    # Held out: no evaluation image equals a training image.
    train_images = {p.read_bytes() for p in train_root.rglob("test/*/*.png")}
    assert not train_images & {p.read_bytes() for p in test_root.rglob("test/*/*.png")}


def test_ensure_demo_data_is_idempotent(tmp_path, small_demo, monkeypatch):
    roots = ensure_demo_data(tmp_path / "demo", image_size=48)
    before = tree_bytes(tmp_path / "demo")

    def must_not_regenerate(*args, **kwargs):
        raise AssertionError("complete demo data was regenerated")

    monkeypatch.setattr(synthetic, "write_synthetic_dataset", must_not_regenerate)
    assert ensure_demo_data(tmp_path / "demo", image_size=48) == roots
    assert tree_bytes(tmp_path / "demo") == before


def test_interrupted_generation_leaves_no_partial_dataset(tmp_path, small_demo, monkeypatch):
    real_writer = synthetic.write_synthetic_dataset

    def interrupted(root, **kwargs):
        real_writer(root, **{**kwargs, "classes": ("plank",)})  # some files are on disk...
        raise KeyboardInterrupt  # ...when the user hits Ctrl-C

    monkeypatch.setattr(synthetic, "write_synthetic_dataset", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ensure_demo_data(tmp_path / "demo", image_size=48)
    assert list((tmp_path / "demo").iterdir()) == []  # neither the target nor staging remains

    monkeypatch.setattr(synthetic, "write_synthetic_dataset", real_writer)
    train_root, _ = ensure_demo_data(tmp_path / "demo", image_size=48)
    assert {s.class_name for s in index_dataset(train_root)} == set(DEMO_CLASSES)


def test_changed_parameters_regenerate(tmp_path, small_demo):
    train_root, _ = ensure_demo_data(tmp_path / "demo", image_size=48)
    ensure_demo_data(tmp_path / "demo", image_size=40)
    assert Image.open(train_root / "disc/test/good/000.png").size == (40, 40)
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == ["test", "train"]


def test_foreign_directory_is_never_overwritten(tmp_path, small_demo):
    foreign = tmp_path / "demo" / "train"
    foreign.mkdir(parents=True)
    (foreign / "precious.txt").write_text("user data")
    with pytest.raises(DataError, match=rf"{foreign} exists but is not a generated demo dataset"):
        ensure_demo_data(tmp_path / "demo")
    assert (foreign / "precious.txt").read_text() == "user data"
