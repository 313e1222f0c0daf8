"""Torch dataset: decode, resize, (optionally) augment and normalise `Sample`s.

Preprocessing follows the reference protocol: the RGB image is resized to S x S with bicubic
(antialiased) resampling, the mask with nearest-neighbour and then binarised with ``!= 0``.
Decoding and resizing dominate the cost of an item, so their uint8 result is cached per index
and augmentation runs on the cached tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from aaclip_score.images import UnreadableImage, read_grey, read_rgb
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

from aaclip_core.data.samples import Sample
from aaclip_core.errors import ConfigError, DataError

AUGMENT_MODES = ("none", "geometric", "geometric+colour")

_Stats = tuple[float, float, float]


def build_augmentation(mode: str) -> v2.Compose | None:
    """The training augmentation; geometric ops move image and mask together.

    Rotation and translation keep torchvision's nearest interpolation (its default) so an
    augmented mask stays binary and pixel-aligned with the image.
    """
    if mode not in AUGMENT_MODES:
        raise ConfigError(
            f"Unknown augmentation {mode!r}; choose one of {', '.join(AUGMENT_MODES)}."
        )
    if mode == "none":
        return None
    ops: list[v2.Transform] = [
        v2.RandomApply([v2.RandomRotation(degrees=30)], p=0.5),
        v2.RandomApply([v2.RandomAffine(degrees=0, translate=(0.15, 0.15))], p=0.5),
        v2.RandomHorizontalFlip(p=0.5),
        v2.RandomVerticalFlip(p=0.5),
    ]
    if mode == "geometric+colour":
        # Colour transforms leave tv_tensors.Mask untouched, so only the image changes.
        ops += [
            v2.RandomApply([v2.ColorJitter(brightness=0.5)], p=0.7),
            v2.RandomApply([v2.ColorJitter(contrast=0.5)], p=0.7),
            v2.RandomApply([v2.ColorJitter(saturation=0.5)], p=0.7),
        ]
    return v2.Compose(ops)


def _decode_image(path: Path, image_size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """uint8 [3, S, S] tensor and the original (width, height)."""
    try:
        rgb = read_rgb(path)
    except UnreadableImage as exc:
        raise DataError(
            f"Image {path} cannot be read ({exc.reason}). Replace or remove the file and re-index "
            "the dataset."
        ) from exc
    original_size = rgb.size
    resized = rgb.resize((image_size, image_size), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1).contiguous(), original_size


def _decode_mask(sample: Sample, image_size: int, expected_size: tuple[int, int]) -> torch.Tensor:
    """uint8 [1, S, S] tensor in {0, 1}; all zero when the sample has no mask."""
    if sample.mask_path is None:
        return torch.zeros((1, image_size, image_size), dtype=torch.uint8)
    try:
        mask = read_grey(sample.mask_path)
    except UnreadableImage as exc:
        raise DataError(
            f"Mask {sample.mask_path} of image {sample.image_path} cannot be read ({exc.reason}). "
            "Replace it with a valid single-channel PNG."
        ) from exc
    mask_size = mask.size
    resized = mask.resize((image_size, image_size), Image.Resampling.NEAREST)
    if mask_size != expected_size:
        raise DataError(
            f"Mask {sample.mask_path} is {mask_size[0]}x{mask_size[1]} pixels but image "
            f"{sample.image_path} is {expected_size[0]}x{expected_size[1]}; masks must match "
            "their image size."
        )
    return torch.from_numpy(np.asarray(resized) != 0).to(torch.uint8).unsqueeze(0)


def _normaliser(mean: Sequence[float], std: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ConfigError(
            f"Normalisation needs three means and three positive stds, got mean={tuple(mean)} "
            f"std={tuple(std)}."
        )
    return (
        torch.tensor(mean, dtype=torch.float32).view(3, 1, 1),
        torch.tensor(std, dtype=torch.float32).view(3, 1, 1),
    )


def _check_image_size(image_size: int) -> None:
    if image_size < 1:
        raise ConfigError(f"Image size must be a positive number of pixels, got {image_size}.")


def load_image_tensor(path: Path, image_size: int, mean: _Stats, std: _Stats) -> torch.Tensor:
    """One image preprocessed like an unaugmented `AnomalyDataset` item: float32 [3, S, S]."""
    _check_image_size(image_size)
    mean_t, std_t = _normaliser(mean, std)
    image, _ = _decode_image(Path(path), image_size)
    return (image.float() / 255.0 - mean_t) / std_t


class AnomalyDataset(torch.utils.data.Dataset):
    """Items are dicts: image float32 [3,S,S] (normalised), mask float32 [1,S,S] in {0,1},
    label int64 scalar, class_name str, index int (position in ``samples``).

    With ``seed`` set, the augmentation of item ``i`` is a pure function of (seed, epoch, i),
    independent of DataLoader workers; call `set_epoch` each epoch to get fresh draws. With
    ``seed=None`` it uses torch's global RNG, which DataLoader seeds per worker.

    The cache lives in the process that loads the item; call `preload` before creating
    DataLoader workers so forked workers share one filled cache instead of each refilling it.
    """

    def __init__(
        self,
        samples: list[Sample],
        image_size: int,
        mean: _Stats,
        std: _Stats,
        augment: str = "none",
        cache: bool = True,
        seed: int | None = None,
    ) -> None:
        _check_image_size(image_size)
        self.samples = list(samples)
        self.image_size = image_size
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        self._mean, self._std = _normaliser(mean, std)
        self._transform = build_augmentation(augment)
        self._cache: list[tuple[torch.Tensor, torch.Tensor] | None] | None = (
            [None] * len(self.samples) if cache else None
        )

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def preload(self) -> None:
        for i in range(len(self)):
            self._decoded(i)

    def _decoded(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cache is not None and self._cache[i] is not None:
            return self._cache[i]
        sample = self.samples[i]
        image, original_size = _decode_image(sample.image_path, self.image_size)
        entry = image, _decode_mask(sample, self.image_size, original_size)
        if self._cache is not None:
            self._cache[i] = entry
        return entry

    def _augmented(
        self, i: int, image: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self._transform is None:
            return image, mask
        # torchvision transforms draw from the global RNG; a seeded item forks it so that
        # seeding leaves the caller's random stream untouched.
        with nullcontext() if self.seed is None else torch.random.fork_rng(devices=[]):
            if self.seed is not None:
                state = np.random.SeedSequence([self.seed % 2**64, self.epoch, i]).generate_state(2)
                torch.default_generator.manual_seed(int(state[0]) << 32 | int(state[1]))
            image, mask = self._transform(tv_tensors.Image(image), tv_tensors.Mask(mask))
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for a dataset of {len(self)} images")
        image, mask = self._augmented(i, *self._decoded(i))
        sample = self.samples[i]
        return {
            "image": (image.float() / 255.0 - self._mean) / self._std,
            "mask": mask.float(),
            "label": torch.tensor(sample.label, dtype=torch.int64),
            "class_name": sample.class_name,
            "index": i,
        }
