"""Procedurally generated demo dataset in the MVTec AD layout.

The demo must run offline in minutes on a laptop CPU, so the images are drawn with numpy
instead of downloaded. Each image is rendered from its own seed (derived from the dataset seed,
class, folder and index), so the output is byte-identical for a seed and any single image can
be re-rendered, with or without its defect, by `render_sample`.

A defect is drawn by first building its mask and then repainting only the masked pixels, so the
ground-truth mask is exactly the set of pixels that differ from the defect-free render.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from aaclip_core.errors import ConfigError, DataError, LocalFileError
from aaclip_core.files import atomic_dir, os_cause

DEMO_CLASSES: tuple[str, ...] = ("plank", "fabric", "disc")
DEFECTS: tuple[str, ...] = ("scratch", "spot", "crack")
DEFAULT_N_NORMAL = 24
DEFAULT_N_ANOMALOUS = 24
DEFAULT_N_TRAIN = 8
MIN_IMAGE_SIZE = 32

# Bump whenever rendering changes so cached demo data written by older code is regenerated.
GENERATOR_VERSION = 1
COMPLETE_MARKER = ".complete"

# Fraction of the image area a defect mask may cover: small enough to be a local anomaly, large
# enough to survive resizing to the model resolution.
_MIN_DEFECT_AREA = 0.02
_MAX_DEFECT_AREA = 0.10
_MAX_DEFECT_ATTEMPTS = 40

# Folder codes that enter the per-image seed; fixed numbers (not positions in a tuple the caller
# passes) so generating a subset of classes yields the same images.
_TRAIN_GOOD, _TEST_GOOD = 0, 1

Array = np.ndarray
Renderer = Callable[[np.random.Generator, int], tuple[Array, Array]]


# --------------------------------------------------------------------------- textures


def _coords(size: int) -> tuple[Array, Array]:
    """Pixel-centre coordinates in [0, 1), as broadcastable column (y) and row (x) vectors."""
    axis = (np.arange(size, dtype=np.float32) + 0.5) / size
    return axis[:, None], axis[None, :]


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> Array:
    """Band-limited noise with unit-ish amplitude: a coarse random grid upsampled bicubically."""
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC))


def _render_plank(rng: np.random.Generator, size: int) -> tuple[Array, Array]:
    y, x = _coords(size)
    base = np.array([158.0, 106.0, 58.0], dtype=np.float32) + rng.normal(0.0, 4.0, 3)
    # Grain lines run along x and are bent by low-frequency noise, like sawn growth rings.
    warp = 0.05 * _smooth_noise(rng, size, 4) + 0.02 * np.sin(2 * np.pi * (1.3 * x + rng.random()))
    rings = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(9.0, 13.0) * (y + warp))
    shading = (
        0.82
        + 0.22 * rings**3
        + 0.05 * _smooth_noise(rng, size, 10)
        + 0.025 * rng.standard_normal((size, size)).astype(np.float32)
    )
    return base * shading[..., None], np.ones((size, size), dtype=bool)


def _render_fabric(rng: np.random.Generator, size: int) -> tuple[Array, Array]:
    y, x = _coords(size)
    angle = np.deg2rad(rng.uniform(-6.0, 6.0))
    threads = rng.uniform(14.0, 18.0)
    u = threads * (x * np.cos(angle) + y * np.sin(angle))
    v = threads * (-x * np.sin(angle) + y * np.cos(angle))
    # Plain weave: in alternating cells the warp or the weft thread lies on top.
    warp_on_top = (np.floor(u) + np.floor(v)) % 2 == 0
    warp = np.sin(np.pi * (u % 1.0))
    weft = np.sin(np.pi * (v % 1.0))
    weave = np.where(warp_on_top, 0.55 + 0.45 * warp, 0.5 + 0.4 * weft)
    shading = weave * (1.0 + 0.05 * _smooth_noise(rng, size, 6))
    base = np.array([72.0, 96.0, 150.0], dtype=np.float32) + rng.normal(0.0, 4.0, 3)
    image = base * shading[..., None] + 3.0 * rng.standard_normal((size, size, 1))
    return image, np.ones((size, size), dtype=bool)


def _render_disc(rng: np.random.Generator, size: int) -> tuple[Array, Array]:
    y, x = _coords(size)
    cy, cx = 0.5 + rng.uniform(-0.04, 0.04, 2)
    radius, hole = rng.uniform(0.37, 0.42), rng.uniform(0.07, 0.09)
    dy, dx = y - cy, x - cx
    r = np.sqrt(dx * dx + dy * dy)
    theta = np.arctan2(dy, dx)
    # Brushed metal: an anisotropic highlight that turns with the angle plus fine turning rings.
    metal = (
        165.0
        + 45.0 * np.cos(2 * theta + rng.uniform(0, np.pi))
        + 7.0 * np.sin(2 * np.pi * r * size / rng.uniform(2.5, 3.5))
        + 4.0 * rng.standard_normal((size, size))
    )
    metal = np.where(r > radius - 0.025, metal * 0.7, metal)  # darker bevelled rim
    metal_rgb = metal[..., None] * np.array([0.97, 1.0, 1.04], dtype=np.float32)
    background = 55.0 + 10.0 * _smooth_noise(rng, size, 5) + 3.0 * rng.standard_normal((size, size))
    background_rgb = background[..., None] * np.array([1.0, 0.95, 0.9], dtype=np.float32)
    # Anti-aliased coverage of the ring between the hole and the outer edge.
    coverage = np.clip((radius - r) * size + 0.5, 0, 1) * np.clip((r - hole) * size + 0.5, 0, 1)
    image = coverage[..., None] * metal_rgb + (1 - coverage[..., None]) * background_rgb
    # Defects belong on the metal, away from the rim and the hole.
    region = (r < radius - 0.04) & (r > hole + 0.03)
    return image, region


_RENDERERS: dict[str, Renderer] = {
    "plank": _render_plank,
    "fabric": _render_fabric,
    "disc": _render_disc,
}


# --------------------------------------------------------------------------- defect masks


def _stroke_mask(size: int, strokes: Sequence[tuple[Sequence[tuple[float, float]], int]]) -> Array:
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    for points, width in strokes:
        draw.line(
            [(px * size, py * size) for px, py in points], fill=255, width=width, joint="curve"
        )
    return np.asarray(canvas) > 0


def _random_point(rng: np.random.Generator, region: Array) -> tuple[float, float]:
    ys, xs = np.nonzero(region)
    i = rng.integers(len(ys))
    size = region.shape[0]
    return (xs[i] + 0.5) / size, (ys[i] + 0.5) / size


def _scratch_mask(rng: np.random.Generator, region: Array) -> Array:
    size = region.shape[0]
    x0, y0 = _random_point(rng, region)
    angle, length = rng.uniform(0, 2 * np.pi), rng.uniform(0.5, 0.9)
    bend = rng.uniform(-0.12, 0.12)
    # A gently curved stroke through the start point: a quadratic bend perpendicular to it.
    t = np.linspace(-0.5, 0.5, 16)
    along = np.array([np.cos(angle), np.sin(angle)])
    across = np.array([-along[1], along[0]])
    points = (
        np.array([x0, y0]) + np.outer(t * length, along) + np.outer(bend * (1 - 4 * t * t), across)
    )
    width = max(2, round(size * rng.uniform(0.03, 0.05)))
    return _stroke_mask(size, [(points.tolist(), width)])


def _inside(region: Array, x: float, y: float) -> bool:
    size = region.shape[0]
    col, row = int(x * size), int(y * size)
    return 0 <= row < size and 0 <= col < size and bool(region[row, col])


def _crack_mask(rng: np.random.Generator, region: Array) -> Array:
    size = region.shape[0]

    def walk(start: tuple[float, float], heading: float, steps: int) -> list[tuple[float, float]]:
        points = [start]
        for _ in range(steps):
            heading += rng.uniform(-0.8, 0.8)  # sharp turns make the line jagged
            step = rng.uniform(0.04, 0.08)
            x, y = points[-1]
            nx, ny = x + step * np.cos(heading), y + step * np.sin(heading)
            if not _inside(region, nx, ny):
                # Turn back instead of running off the object (the disc's ring is narrow).
                heading += np.pi
                nx, ny = x + step * np.cos(heading), y + step * np.sin(heading)
            points.append((nx, ny))
        return points

    heading = rng.uniform(0, 2 * np.pi)
    trunk = walk(_random_point(rng, region), heading, int(rng.integers(8, 14)))
    branch_start = trunk[len(trunk) // 2]
    branch = walk(branch_start, heading + rng.choice([-1.0, 1.0]) * rng.uniform(0.6, 1.2), 4)
    width = max(2, round(size * rng.uniform(0.02, 0.035)))
    return _stroke_mask(size, [(trunk, width), (branch, max(2, width - 1))])


def _spot_mask(rng: np.random.Generator, region: Array) -> Array:
    size = region.shape[0]
    y, x = _coords(size)
    cx, cy = _random_point(rng, region)
    area = rng.uniform(_MIN_DEFECT_AREA * 1.2, _MAX_DEFECT_AREA * 0.8)
    aspect = rng.uniform(0.6, 1.6)
    rx = np.sqrt(area / np.pi * aspect)
    ry = np.sqrt(area / np.pi / aspect)
    angle = rng.uniform(0, np.pi)
    u = (x - cx) * np.cos(angle) + (y - cy) * np.sin(angle)
    v = -(x - cx) * np.sin(angle) + (y - cy) * np.cos(angle)
    # Noise on the ellipse threshold gives a ragged, stain-like outline.
    return (u / rx) ** 2 + (v / ry) ** 2 < 1.0 + 0.35 * _smooth_noise(rng, size, 6)


_MASKERS: dict[str, Callable[[np.random.Generator, Array], Array]] = {
    "scratch": _scratch_mask,
    "spot": _spot_mask,
    "crack": _crack_mask,
}


def _defect_mask(rng: np.random.Generator, region: Array, defect: str) -> Array:
    """Draw masks until one on the object covers the allowed area fraction.

    Clipping to the object region can shrink a mask below the minimum, so a few redraws are
    expected; the closest candidate is kept if none fits (only at very small image sizes).
    """
    low, high = _MIN_DEFECT_AREA, _MAX_DEFECT_AREA
    best, best_gap = None, np.inf
    for _ in range(_MAX_DEFECT_ATTEMPTS):
        mask = _MASKERS[defect](rng, region) & region
        fraction = mask.mean()
        gap = max(low - fraction, fraction - high, 0.0)
        if gap == 0.0:
            return mask
        if gap < best_gap and mask.any():
            best, best_gap = mask, gap
    assert best is not None, "the object region is never empty"
    return best


# --------------------------------------------------------------------------- defect paint


def _luminance(pixels: Array) -> Array:
    return pixels @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _paint_scratch(rng: np.random.Generator, pixels: Array) -> Array:
    # Choose the polarity that contrasts with the surface so the scratch is visible everywhere.
    target = 25.0 if _luminance(pixels).mean() > 115 else 235.0
    alpha = rng.uniform(0.4, 0.65)
    return (1 - alpha) * pixels + alpha * target


def _paint_spot(rng: np.random.Generator, pixels: Array) -> Array:
    palette = np.array(
        [[190, 70, 40], [70, 150, 60], [60, 70, 180], [210, 190, 60], [120, 60, 130]],
        dtype=np.float32,
    )
    # Pick among the two tints farthest from the surface colour: an "off colour" stain.
    distance = np.linalg.norm(palette - pixels.mean(axis=0), axis=1)
    tint = palette[rng.choice(np.argsort(distance)[-2:])]
    # Modulating the tint by the local brightness keeps the underlying texture visible, so the
    # stain changes colour without erasing the surface structure.
    brightness = _luminance(pixels) / max(float(_luminance(pixels).mean()), 1.0)
    alpha = rng.uniform(0.3, 0.5)
    return (1 - alpha) * pixels + alpha * tint * brightness[:, None]


def _paint_crack(rng: np.random.Generator, pixels: Array) -> Array:
    return pixels * rng.uniform(0.25, 0.45)


_PAINTERS: dict[str, Callable[[np.random.Generator, Array], Array]] = {
    "scratch": _paint_scratch,
    "spot": _paint_spot,
    "crack": _paint_crack,
}


def _apply_defect(
    image: Array, region: Array, defect: str, rng: np.random.Generator
) -> tuple[Array, Array]:
    mask = _defect_mask(rng, region, defect)
    before = image[mask]
    after = np.clip(np.rint(_PAINTERS[defect](rng, before.astype(np.float32))), 0, 255).astype(
        np.uint8
    )
    # A blend can round back to the original value on a few pixels; nudge those so the mask
    # stays exactly the set of changed pixels.
    same = (after == before).all(axis=1)
    after[same] = np.where(before[same] > 127, before[same] - 40, before[same] + 40)
    painted = image.copy()
    painted[mask] = after
    return painted, mask


# --------------------------------------------------------------------------- public rendering


def sample_entropy(seed: int, class_name: str, folder: str, index: int) -> tuple[int, ...]:
    """The seed material of one image; folder is "train/good", "test/good" or a defect name."""
    folder_code = {"train/good": _TRAIN_GOOD, "test/good": _TEST_GOOD}.get(folder)
    if folder_code is None:
        folder_code = 2 + DEFECTS.index(folder)
    # SeedSequence rejects negative entropy; wrap so any int seed is usable.
    return (seed % 2**64, DEMO_CLASSES.index(class_name), folder_code, index)


def render_sample(
    class_name: str, defect: str | None, image_size: int, entropy: Sequence[int]
) -> tuple[Array, Array]:
    """Render one image as (uint8 [S,S,3], bool [S,S] mask).

    The defect-free texture depends only on ``entropy``, so rendering with ``defect=None`` and
    with a defect from the same entropy gives images that differ exactly inside the mask.
    """
    texture_seq, defect_seq = np.random.SeedSequence(list(entropy)).spawn(2)
    image, region = _RENDERERS[class_name](np.random.default_rng(texture_seq), image_size)
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    if defect is None:
        return image, np.zeros((image_size, image_size), dtype=bool)
    return _apply_defect(image, region, defect, np.random.default_rng(defect_seq))


def _save_png(array: Array, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # PNG has no timestamps by default, so equal arrays give byte-identical files.
    Image.fromarray(array).save(path, format="PNG")


def _check_parameters(classes: Sequence[str], image_size: int, counts: Sequence[int]) -> None:
    unknown = [c for c in classes if c not in _RENDERERS]
    if unknown or not classes:
        raise ConfigError(
            f"Synthetic demo classes {list(classes)} are invalid; choose one or more of "
            f"{', '.join(DEMO_CLASSES)}."
        )
    if image_size < MIN_IMAGE_SIZE:
        raise ConfigError(
            f"Synthetic image size {image_size} is too small; use at least {MIN_IMAGE_SIZE} pixels."
        )
    if min(counts) < 0:
        raise ConfigError(f"Synthetic image counts must not be negative, got {list(counts)}.")


def write_synthetic_dataset(
    root: Path,
    *,
    seed: int = 0,
    image_size: int = 128,
    classes: tuple[str, ...] = DEMO_CLASSES,
    n_normal: int = DEFAULT_N_NORMAL,
    n_anomalous: int = DEFAULT_N_ANOMALOUS,
    n_train: int = DEFAULT_N_TRAIN,
) -> Path:
    """Write a demo dataset in the MVTec AD layout under ``root`` and return ``root``.

    Per class: ``n_train`` images in train/good, ``n_normal`` in test/good and ``n_anomalous``
    in test/<defect>, shared round-robin between the defect types, each with a 0/255 mask in
    ground_truth/<defect>/<stem>_mask.png.
    """
    _check_parameters(classes, image_size, (n_normal, n_anomalous, n_train))
    root = Path(root)
    for class_name in classes:
        class_dir = root / class_name
        for folder, count in (("train/good", n_train), ("test/good", n_normal)):
            for i in range(count):
                image, _ = render_sample(
                    class_name, None, image_size, sample_entropy(seed, class_name, folder, i)
                )
                _save_png(image, class_dir / folder / f"{i:03d}.png")
        for k in range(n_anomalous):
            defect, i = DEFECTS[k % len(DEFECTS)], k // len(DEFECTS)
            image, mask = render_sample(
                class_name, defect, image_size, sample_entropy(seed, class_name, defect, i)
            )
            _save_png(image, class_dir / "test" / defect / f"{i:03d}.png")
            _save_png(
                mask.astype(np.uint8) * 255,
                class_dir / "ground_truth" / defect / f"{i:03d}_mask.png",
            )
    return root


# --------------------------------------------------------------------------- cached demo data


def _marker_text(**params: object) -> str:
    return json.dumps({"generator_version": GENERATOR_VERSION, **params}, sort_keys=True)


def _is_complete(target: Path, marker: str) -> bool:
    marker_path = target / COMPLETE_MARKER
    return marker_path.is_file() and marker_path.read_text(encoding="utf-8") == marker


def _materialise(target: Path, marker: str, write: Callable[[Path], object]) -> None:
    """Create ``target`` atomically: write into a hidden sibling, then rename it into place."""
    if _is_complete(target, marker):
        return
    if target.exists() and not (target / COMPLETE_MARKER).is_file():
        # Generation only ever renames finished trees into place, so a directory without a
        # marker is not ours; never delete it.
        raise DataError(
            f"{target} exists but is not a generated demo dataset (no {COMPLETE_MARKER} file). "
            "Move it away or choose another demo data directory."
        )
    # An existing target was written by us with other parameters or an older generator: it is
    # swapped out.
    try:
        with atomic_dir(target) as staging:
            write(staging)
            (staging / COMPLETE_MARKER).write_text(marker, encoding="utf-8")
    except OSError:
        # Another process finished first; its copy is identical if the marker matches.
        if not _is_complete(target, marker):
            raise


# The two independent renders of the demo data: training reads the first, evaluation the second.
DEMO_HALVES = {"train": 0, "test": 1000}  # name -> offset added to the generation seed


def ensure_demo_half(target: Path, seed: int = 0, image_size: int = 128) -> Path:
    """Make sure the demo render named by ``target``'s folder name ("train" or "test") exists at
    ``target``; writes nothing anywhere else. Returns ``target``."""
    target = Path(target)
    if target.name not in DEMO_HALVES:
        raise ConfigError(
            f"A demo data folder is called 'train' or 'test' (the two independent renders), not "
            f"'{target.name}' ({target})."
        )
    params = dict(
        seed=seed + DEMO_HALVES[target.name],
        image_size=image_size,
        classes=DEMO_CLASSES,
        n_normal=DEFAULT_N_NORMAL,
        n_anomalous=DEFAULT_N_ANOMALOUS,
        n_train=DEFAULT_N_TRAIN,
    )
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _materialise(target, _marker_text(**params), partial(write_synthetic_dataset, **params))
    except OSError as exc:  # a read-only or full folder: nothing was renamed into place (_materialise)
        shown = target.absolute()  # a recipe's root is relative to the working folder: say which folder that is
        failed = Path(os.fsdecode(exc.filename)).absolute() if exc.filename else shown
        where = f" ({failed})" if failed != shown else ""
        raise LocalFileError(
            f"Cannot generate the demo data in {shown}: {os_cause(exc)}{where}; nothing was left there. The demo "
            "data is written on first use where the recipe's data.train.root / data.test.root point (the demo "
            "recipes: aaclip-demo-data/ in the working folder). Run from a folder you can write, or set both roots "
            "to .../train and .../test in one (`aaclip data synth DIR` writes them)."
        ) from None
    return target


def is_demo_data(target: Path) -> bool:
    """Whether ``target`` is a complete demo render written by this generator (any version)."""
    return (Path(target) / COMPLETE_MARKER).is_file()


def ensure_demo_data(root: Path, seed: int = 0, image_size: int = 128) -> tuple[Path, Path]:
    """Make sure the demo roots ``root/train`` and ``root/test`` exist; return them.

    The two roots are independent renders (seeds ``seed`` and ``seed + 1000``): training uses
    the labelled test/ images of the first, evaluation those of the second, so evaluation is on
    held-out images. Existing complete roots with the same parameters are reused as they are.
    """
    root = Path(root)
    return ensure_demo_half(root / "train", seed, image_size), ensure_demo_half(root / "test", seed, image_size)
