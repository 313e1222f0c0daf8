"""From a recipe's dataset reference to samples and loaders."""

from __future__ import annotations

from pathlib import Path

import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from torch.utils.data import DataLoader

from ..config import DatasetRef, Recipe
from ..data import AnomalyDataset, Sample, index_dataset, k_shot, select_classes, validate_samples
from ..data.synthetic import ensure_demo_data
from ..errors import DataError
from ..runtime import select_device


def load_samples(ref: DatasetRef, seed: int, validate: bool = True, field: str = "data.train") -> list[Sample]:
    """The labelled images of a dataset (its test split in the MVTec sense), filtered and sub-sampled
    as the recipe says. ``field`` names the recipe table in error messages."""
    root = Path(ref.root).expanduser()
    if ref.layout != "synthetic" and not root.exists():
        raise DataError(
            f"Dataset root '{root}' ({field}.root, dataset {ref.name}) does not exist. Point it at the "
            f"dataset with --set {field}.root=/path/to/{ref.name} (layouts: MVTec AD, VisA, BTAD, MPDD, "
            "a plain folder, or reference JSON-lines metadata), or use --recipe demo for the built-in data."
        )
    layout = ref.layout
    if layout == "synthetic":
        # The demo data is generated on first use: root names one of the two generated halves.
        ensure_demo_data(root.parent)
        layout = "mvtec"
    samples = index_dataset(root, layout=layout, split="test")
    samples = select_classes(samples, ref.classes)
    if ref.shot:
        samples = k_shot(samples, ref.shot, seed)
    if validate:
        validate_samples(samples)
    return samples


def make_dataset(samples: list[Sample], recipe: Recipe, augment: str) -> AnomalyDataset:
    return AnomalyDataset(
        samples,
        image_size=recipe.model.image_size,
        mean=tuple(OPENAI_DATASET_MEAN),
        std=tuple(OPENAI_DATASET_STD),
        augment=augment,
        cache=recipe.data.cache_images,
        seed=recipe.runtime.seed,
    )


def make_loader(
    dataset: AnomalyDataset, batch_size: int, shuffle: bool, recipe: Recipe, generator: torch.Generator | None
) -> DataLoader:
    workers = recipe.data.num_workers
    if workers > 0 and recipe.data.cache_images:
        # Decode once in the main process, so forked workers share the filled cache.
        dataset.preload()
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=workers,
        pin_memory=select_device(recipe.runtime.device).type == "cuda",
        # Workers are re-created every epoch so that they see the dataset's epoch (set_epoch), which
        # keys the augmentation draws; persistent workers would repeat epoch 1's draws forever.
        persistent_workers=False,
        generator=generator,
        drop_last=False,
    )


def fixed_batch(samples: list[Sample], recipe: Recipe) -> dict:
    """The un-augmented items of ``samples`` stacked as one loader-style batch."""
    ds = make_dataset(samples, recipe, "none")
    items = [ds[i] for i in range(len(ds))]
    return {
        "image": torch.stack([it["image"] for it in items]),
        "mask": torch.stack([it["mask"] for it in items]),
        "label": torch.stack([it["label"] for it in items]),
        "class_name": [it["class_name"] for it in items],
    }
