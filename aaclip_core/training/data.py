"""From a recipe's dataset reference to samples and loaders."""

from __future__ import annotations

from pathlib import Path

import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler

from aaclip_core import distributed, signals
from aaclip_core.compute import select_device
from aaclip_core.data import AnomalyDataset, Sample, index_dataset, k_shot, select_classes, validate_samples
from aaclip_core.data.layouts import LAYOUT_DESCRIPTIONS, looks_like
from aaclip_core.data.locate import dataset_hint
from aaclip_core.data.synthetic import DEMO_HALVES, ensure_demo_half, is_demo_data
from aaclip_core.errors import DataError
from aaclip_core.recipe import DatasetRef, Recipe
from aaclip_core.training.sharding import RankShareBatches, StridedBatches, WeightedItems


def load_samples(ref: DatasetRef, seed: int, validate: bool = True, field: str = "data.train") -> list[Sample]:
    """The labelled images of a dataset (its test split in the MVTec sense), filtered and sub-sampled
    as the recipe says. ``field`` names the recipe table in error messages."""
    root = Path(ref.root).expanduser()
    layout = ref.layout
    if layout == "synthetic":
        _demo_root(root, field)
        layout = "mvtec"
    elif not root.exists():
        raise DataError(
            f"Dataset root '{ref.root}' ({field}.root, dataset {ref.name}) does not exist. "
            f"{dataset_hint(root, layout, field)} Point it at the dataset with "
            f"--set {field}.root=/path/to/{ref.name}, or use --recipe demo for the built-in data."
        )
    try:
        samples = index_dataset(root, layout=layout, split="test")
    except DataError as exc:
        # A root without the layout at all gets the "where is it" hint; a broken file inside a
        # recognisable dataset gets only the field, since the message names the file.
        hint = "" if looks_like(root, layout) else " " + dataset_hint(root, layout, field)
        raise DataError(f"{field} ({field}.root = '{ref.root}', {field}.layout = '{ref.layout}'): {exc}{hint}") from None
    samples = select_classes(samples, ref.classes)
    if ref.shot:
        samples = k_shot(samples, ref.shot, seed, setting=f"{field}.shot")
    if validate:
        validate_samples(samples)
    return samples


def synthetic_root_problem(root: Path, field: str) -> str | None:
    """Why ``root`` cannot hold the generated demo data of ``field`` (layout "synthetic"), or None.
    Demo data is only ever written where a recipe asks for it: a folder named ``train`` or ``test``
    (the two renders) that is empty or was written by the generator, never real data."""
    root = Path(root)
    real_data = root.exists() and not is_demo_data(root)
    if root.name in DEMO_HALVES and not real_data:
        return None
    what = "holds data aaclip did not generate" if real_data else "is not a demo data folder (.../train or .../test)"
    return (
        f"{field}.layout is 'synthetic' (the generated demo data) but {field}.root = '{root}' {what}; "
        f"nothing was written. For your own data set {field}.layout = \"auto\" (or one of "
        f"{', '.join(LAYOUT_DESCRIPTIONS)}) and {field}.name to the dataset's name, e.g. "
        f'--set {field}.layout="auto" --set {field}.name="MVTec".'
    )


def _demo_root(root: Path, field: str) -> None:
    problem = synthetic_root_problem(root, field)
    if problem:
        raise DataError(problem)
    ensure_demo_half(root)


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
    """A training loader (``shuffle``) yields this rank's weighted share of each global batch of
    ``batch_size``; an evaluation loader yields this rank's whole batches (see `sharding`). With
    one process both are the plain loader."""
    workers = recipe.data.num_workers
    if workers > 0 and recipe.data.cache_images:
        # Decode once in the main process, so forked workers share the filled cache.
        dataset.preload()
    rank, world = distributed.rank(), distributed.world_size()
    if shuffle:
        order = BatchSampler(RandomSampler(dataset, generator=generator), batch_size, drop_last=False)
        items, batches = WeightedItems(dataset), RankShareBatches(order, rank, world)
    else:
        order = BatchSampler(SequentialSampler(dataset), batch_size, drop_last=False)
        items, batches = dataset, StridedBatches(order, rank, world)
    return DataLoader(
        items,
        batch_sampler=batches,
        num_workers=workers,
        pin_memory=select_device(recipe.runtime.device).type == "cuda",
        # Workers are re-created every epoch so that they see the dataset's epoch (set_epoch), which
        # keys the augmentation draws; persistent workers would repeat epoch 1's draws forever.
        persistent_workers=False,
        worker_init_fn=signals.leave_to_parent if workers > 0 else None,
        generator=generator,
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
