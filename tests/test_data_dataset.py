"""AnomalyDataset preprocessing/augmentation and the k-shot / validation splits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from aaclip_core.data import (
    AnomalyDataset,
    Sample,
    index_dataset,
    k_shot,
    load_image_tensor,
    sort_samples,
    train_val_split,
    write_synthetic_dataset,
)
from aaclip_core.errors import ConfigError, DataError

MEAN = (0.5, 0.4, 0.3)
STD = (0.25, 0.2, 0.1)


def save(array: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def red_is_mask_sample(tmp_path: Path, name: str, seed: int) -> Sample:
    """An image whose red channel is 255 exactly where its mask is set."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((48, 48), dtype=np.uint8)
    for _ in range(4):
        y, x = rng.integers(0, 40, 2)
        mask[y : y + rng.integers(3, 9), x : x + rng.integers(3, 9)] = 255
    image = np.stack([mask, np.full_like(mask, 90), np.full_like(mask, 160)], axis=-1)
    image_path = save(image, tmp_path / f"{name}.png")
    return Sample(image_path, 1, "toy", save(mask, tmp_path / f"{name}_mask.png"), "x")


def unnormalise(image: torch.Tensor) -> torch.Tensor:
    return image * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)


@pytest.fixture(scope="module")
def demo_samples(tmp_path_factory) -> list[Sample]:
    root = tmp_path_factory.mktemp("demo")
    write_synthetic_dataset(root, seed=0, image_size=64, n_normal=6, n_anomalous=6, n_train=1)
    return index_dataset(root)


# --------------------------------------------------------------------------- items


def test_item_shapes_dtypes_and_values(demo_samples):
    dataset = AnomalyDataset(demo_samples, 56, MEAN, STD)
    assert len(dataset) == len(demo_samples)
    for i in (0, len(dataset) - 1):
        item = dataset[i]
        assert item["image"].shape == (3, 56, 56) and item["image"].dtype == torch.float32
        assert item["mask"].shape == (1, 56, 56) and item["mask"].dtype == torch.float32
        assert set(item["mask"].unique().tolist()) <= {0.0, 1.0}
        assert item["label"].dtype == torch.int64 and item["label"].shape == ()
        assert item["label"].item() == demo_samples[i].label
        assert item["class_name"] == demo_samples[i].class_name and item["index"] == i
        assert item["mask"].any() == bool(demo_samples[i].label)


def test_normalisation_uses_mean_and_std(tmp_path):
    path = save(np.full((20, 30, 3), (255, 102, 0), dtype=np.uint8), tmp_path / "flat.png")
    item = AnomalyDataset([Sample(path, 0, "c", None)], 16, MEAN, STD)[0]
    expected = (torch.tensor([1.0, 0.4, 0.0]) - torch.tensor(MEAN)) / torch.tensor(STD)
    torch.testing.assert_close(item["image"], expected.view(3, 1, 1).expand(3, 16, 16))
    assert not item["mask"].any()


def test_mask_resize_is_nearest_and_any_nonzero_counts(tmp_path):
    mask = np.zeros((40, 40), dtype=np.uint8)
    mask[:20, :] = 1  # a grey level of 1 is still anomalous
    image = save(np.zeros((40, 40, 3), np.uint8), tmp_path / "i.png")
    sample = Sample(image, 1, "c", save(mask, tmp_path / "m.png"), "x")
    out = AnomalyDataset([sample], 10, MEAN, STD)[0]["mask"][0]
    torch.testing.assert_close(out, torch.cat([torch.ones(5, 10), torch.zeros(5, 10)]))


def test_load_image_tensor_matches_unaugmented_item(demo_samples):
    item = AnomalyDataset(demo_samples, 40, MEAN, STD)[3]
    single = load_image_tensor(demo_samples[3].image_path, 40, MEAN, STD)
    torch.testing.assert_close(single, item["image"])


def test_batches_through_default_collate(demo_samples):
    loader = torch.utils.data.DataLoader(AnomalyDataset(demo_samples, 32, MEAN, STD), batch_size=4)
    batch = next(iter(loader))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["label"].shape == (4,)
    assert len(batch["class_name"]) == 4


# --------------------------------------------------------------------------- augmentation


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_geometric_augmentation_keeps_image_and_mask_aligned(tmp_path, seed):
    samples = [red_is_mask_sample(tmp_path, f"s{i}", i) for i in range(6)]
    dataset = AnomalyDataset(samples, 48, MEAN, STD, augment="geometric", seed=seed)
    moved = 0
    for epoch in range(3):
        dataset.set_epoch(epoch)
        for i in range(len(dataset)):
            item = dataset[i]
            red = unnormalise(item["image"])[0]
            torch.testing.assert_close((red > 0.5).float(), item["mask"][0])
            moved += not torch.equal(
                item["mask"], AnomalyDataset(samples, 48, MEAN, STD)[i]["mask"]
            )
    assert moved > 0  # the augmentation really transformed something


def test_colour_augmentation_changes_image_only(tmp_path):
    samples = [red_is_mask_sample(tmp_path, f"s{i}", i) for i in range(8)]
    geometric = AnomalyDataset(samples, 48, MEAN, STD, augment="geometric", seed=4)
    coloured = AnomalyDataset(samples, 48, MEAN, STD, augment="geometric+colour", seed=4)
    images_differ = 0
    for i in range(len(samples)):
        # Colour ops run after the geometric ones, so the same seed gives the same geometry.
        torch.testing.assert_close(geometric[i]["mask"], coloured[i]["mask"])
        images_differ += not torch.allclose(geometric[i]["image"], coloured[i]["image"])
    assert images_differ > 0


def test_seeded_augmentation_is_reproducible_and_varies_by_epoch(demo_samples):
    def images(seed: int, epoch: int) -> torch.Tensor:
        subset = demo_samples[::3]
        dataset = AnomalyDataset(subset, 32, MEAN, STD, augment="geometric+colour", seed=seed)
        dataset.set_epoch(epoch)
        return torch.stack([dataset[i]["image"] for i in range(len(dataset))])

    torch.testing.assert_close(images(0, 0), images(0, 0))
    assert not torch.allclose(images(0, 0), images(0, 1))
    assert not torch.allclose(images(0, 0), images(1, 0))


def test_seeded_items_leave_global_rng_untouched(demo_samples):
    dataset = AnomalyDataset(demo_samples, 32, MEAN, STD, augment="geometric", seed=0)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    dataset[0]
    torch.testing.assert_close(torch.rand(3), expected)


def test_unknown_augmentation_is_config_error(demo_samples):
    with pytest.raises(ConfigError, match="'mixup'"):
        AnomalyDataset(demo_samples, 32, MEAN, STD, augment="mixup")


# --------------------------------------------------------------------------- loading and cache


def test_unreadable_image_names_file(tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"garbage")
    with pytest.raises(DataError, match=rf"Image {broken} cannot be read"):
        AnomalyDataset([Sample(broken, 0, "c", None)], 16, MEAN, STD)[0]
    with pytest.raises(DataError, match=rf"Image {broken} cannot be read"):
        load_image_tensor(broken, 16, MEAN, STD)


def test_mask_size_mismatch_names_mask(tmp_path):
    image = save(np.zeros((20, 20, 3), np.uint8), tmp_path / "i.png")
    mask = save(np.full((10, 20), 255, np.uint8), tmp_path / "m.png")
    with pytest.raises(DataError, match=rf"Mask {mask} is 20x10 pixels but image {image} is 20x20"):
        AnomalyDataset([Sample(image, 1, "c", mask, "x")], 16, MEAN, STD)[0]


def test_cache_serves_decoded_images_after_first_load(tmp_path):
    path = save(np.full((20, 20, 3), 200, np.uint8), tmp_path / "i.png")
    cached = AnomalyDataset([Sample(path, 0, "c", None)], 16, MEAN, STD, cache=True)
    uncached = AnomalyDataset([Sample(path, 0, "c", None)], 16, MEAN, STD, cache=False)
    cached.preload()
    first = uncached[0]["image"]
    path.unlink()
    torch.testing.assert_close(cached[0]["image"], first)
    with pytest.raises(DataError, match=r"i\.png"):
        uncached[0]


# --------------------------------------------------------------------------- splits


def counts(samples: list[Sample]) -> dict[tuple[str, int], int]:
    result: dict[tuple[str, int], int] = {}
    for s in samples:
        result[(s.class_name, s.label)] = result.get((s.class_name, s.label), 0) + 1
    return result


@pytest.mark.parametrize(("k", "normal", "anomalous"), [(4, 2, 2), (5, 2, 3), (1, 0, 1)])
def test_k_shot_counts_per_class(demo_samples, k, normal, anomalous):
    chosen = k_shot(demo_samples, k, seed=0)
    for cls in {s.class_name for s in demo_samples}:
        assert counts(chosen).get((cls, 0), 0) == normal
        assert counts(chosen).get((cls, 1), 0) == anomalous
    assert chosen == sort_samples(chosen)


def test_k_shot_is_deterministic_and_order_independent(demo_samples):
    assert k_shot(demo_samples, 4, seed=3) == k_shot(list(reversed(demo_samples)), 4, seed=3)
    picks = {tuple(s.image_path for s in k_shot(demo_samples, 4, seed=seed)) for seed in range(6)}
    assert len(picks) > 1


def test_k_shot_too_few_images_names_class_and_counts(demo_samples):
    message = r"7 normal and 7 anomalous images per class, but 'disc' 6 normal \+ 6 anomalous.*12 or less"
    with pytest.raises(DataError, match=message):
        k_shot(demo_samples, 14, seed=0)
    with pytest.raises(DataError, match=r"data.train.shot = 14 .*Set data.train.shot to 12.*data.train.classes"):
        k_shot(demo_samples, 14, seed=0, setting="data.train.shot")
    with pytest.raises(ConfigError, match="k = 0"):
        k_shot(demo_samples, 0, seed=0)


def test_train_val_split_is_stratified_and_deterministic(demo_samples):
    train, val = train_val_split(demo_samples, 0.34, seed=1)
    assert sort_samples(train + val) == demo_samples
    assert not set(train) & set(val)
    assert all(n == 2 for n in counts(val).values()) and len(counts(val)) == 6
    assert train_val_split(list(reversed(demo_samples)), 0.34, seed=1) == (train, val)
    assert train_val_split(demo_samples, 0.34, seed=2) != (train, val)


def test_train_val_split_keeps_one_training_image_per_group(tmp_path):
    groups = (("a", 0, 2), ("a", 1, 1), ("b", 0, 3))
    samples = [
        Sample(
            tmp_path / f"{cls}{label}_{i}.png", label, cls, tmp_path / "m.png" if label else None
        )
        for cls, label, n in groups
        for i in range(n)
    ]
    train, val = train_val_split(samples, 0.9, seed=0)
    assert counts(train) == {("a", 0): 1, ("a", 1): 1, ("b", 0): 1}
    assert counts(val) == {("a", 0): 1, ("b", 0): 2}
    assert train_val_split(samples, 0.0, seed=0) == (samples, [])
    with pytest.raises(ConfigError):
        train_val_split(samples, 1.0, seed=0)
