"""Score images with an exported detector file alone: no training stack, no tracking store.

Imports numpy, PIL and the standard library at module level; ONNX Runtime when a file is loaded.
The sidecar JSON beside the file (``detector.onnx`` -> ``detector.onnx.json``) says how to
preprocess (image size, mean, std), which classes the ``class_index`` input names, the domain, the
per-class thresholds and where the model came from. A TorchScript ``.pt`` needs torch and is
loaded by `aaclip_core.deploy.scorer`, which gives `load_detector` its backend.

Preprocessing reproduces `aaclip_core.data.dataset.load_image_tensor` (RGB, bicubic resize to S x S
with PIL, /255, minus mean, over std, in float32) without torch; a test holds the two equal.

In memory (`Detector.load`, `Detector.score_bytes`): encoded images (PNG, JPEG ...) with a class
name each give one `ScoredImage` per image: score, verdict, threshold and, on request, the maps.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from aaclip_score.contract import OUTPUT_NAMES as OUTPUTS
from aaclip_score.contract import REQUIRED_KEYS, SIDECAR_SCHEMA, sidecar_of
from aaclip_score.errors import CheckpointError, ConfigError, DataError, UnknownClass
from aaclip_score.files import sha256_of
from aaclip_score.images import UnreadableImage, read_rgb, read_rgb_bytes

DEPLOY_HINT = "pip install aaclip-score (or 'aaclip[deploy]')"


def _normalise(rgb: Image.Image, image_size: int, mean, std) -> tuple[np.ndarray, np.ndarray]:
    resized = rgb.resize((image_size, image_size), Image.Resampling.BICUBIC)
    picture = np.asarray(resized, dtype=np.uint8).copy()
    m = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)
    x = picture.transpose(2, 0, 1).astype(np.float32) / np.float32(255.0)
    return (x - m) / s, picture


def preprocess(path: Path, image_size: int, mean, std) -> tuple[np.ndarray, np.ndarray]:
    """(float32 [3, S, S] normalised input, uint8 [S, S, 3] resized picture) of one image file."""
    try:
        rgb = read_rgb(path)
    except UnreadableImage as exc:
        raise DataError(f"Image {path} cannot be read ({exc.reason}). Replace or remove the file.") from exc
    return _normalise(rgb, image_size, mean, std)


def preprocess_bytes(data: bytes, image_size: int, mean, std, name: str = "image") -> tuple[np.ndarray, np.ndarray]:
    """`preprocess` of an encoded image held in memory; ``name`` is how an error names it."""
    return _normalise(read_rgb_bytes(data, name), image_size, mean, std)


class OnnxBackend:
    """Runs an ``.onnx`` detector with ONNX Runtime on the CPU."""

    def __init__(self, path: Path, threads: int | None) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise ConfigError(
                f"{path} is an ONNX model, which needs ONNX Runtime: {DEPLOY_HINT} (or pip install onnxruntime)."
            ) from None
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types for bad files
            raise CheckpointError(f"ONNX Runtime cannot load {path}: {exc}. Re-export it with `aaclip export`.") from None

    def __call__(self, images: np.ndarray, index: np.ndarray) -> dict[str, np.ndarray]:
        out = self.session.run(list(OUTPUTS), {"image": images, "class_index": index})
        return dict(zip(OUTPUTS, out))


# format (the sidecar's "format") -> backend class(path, threads); aaclip adds "torchscript".
Backends = Mapping[str, Callable[[Path, int | None], Callable[[np.ndarray, np.ndarray], dict]]]
BACKENDS: Backends = {"onnx": OnnxBackend}


@dataclass(frozen=True)
class ScoredImage:
    """One in-memory image's result: ``score`` on the exported calibration's scale (raw for an
    uncalibrated class), ``threshold`` (the given one, else the class's F1-optimal one, else None)
    and ``verdict`` ("anomalous" when score >= threshold, "normal", None without a threshold).
    ``map`` (float32 [S, S], calibrated scale) and ``raw_map`` when asked for."""

    class_name: str
    score: float
    raw_det: float
    threshold: float | None
    verdict: str | None
    map: np.ndarray | None = None
    raw_map: np.ndarray | None = None


@dataclass
class Detector:
    """An exported detector: ``score`` maps preprocessed images of named classes to the outputs."""

    path: Path
    info: dict
    backend: object

    @classmethod
    def load(cls, path: Path | str, threads: int | None = None, verify: bool = True) -> Detector:
        """The ``.onnx`` file with its sidecar JSON; ``verify`` checks the file's sha256 against it."""
        return load_detector(Path(path), threads, verify)

    @property
    def classes(self) -> list[str]:
        return list(self.info["classes"])

    @property
    def image_size(self) -> int:
        return int(self.info["image_size"])

    @property
    def domain(self) -> str:
        return str(self.info["domain"])

    def calibration(self, class_name: str) -> dict | None:
        return (self.info.get("calibration") or {}).get(class_name)

    def threshold(self, class_name: str) -> float | None:
        t = (self.calibration(class_name) or {}).get("image_threshold")
        return None if t is None else float(t)

    def preprocess(self, path: Path) -> tuple[np.ndarray, np.ndarray]:
        return preprocess(path, self.image_size, self.info["mean"], self.info["std"])

    def class_index(self, class_names: list[str]) -> np.ndarray:
        known = {c: i for i, c in enumerate(self.info["classes"])}
        missing = sorted({c for c in class_names if c not in known})
        if missing:
            raise UnknownClass(
                f"{self.path} has no class {', '.join(repr(c) for c in missing)} (it has: "
                f"{', '.join(self.classes)}); pass --class with one of these.", missing[0], self.classes,
            )
        return np.asarray([known[c] for c in class_names], dtype=np.int64)

    def score(self, images: np.ndarray, class_names: list[str]) -> dict[str, np.ndarray]:
        """``images`` float32 [B, 3, S, S] (see `preprocess`) -> raw_map, raw_det, map, score."""
        images = np.ascontiguousarray(images, dtype=np.float32)
        s = self.image_size
        if images.ndim != 4 or images.shape[1:] != (3, s, s):
            raise DataError(f"{self.path} takes images of shape [B, 3, {s}, {s}], got {list(images.shape)}.")
        return self.backend(images, self.class_index(class_names))

    def score_bytes(self, images: Sequence[bytes], class_names: Sequence[str], threshold: float | None = None,
                    with_maps: bool = False) -> list[ScoredImage]:
        """Score encoded images (PNG, JPEG, ... as bytes), one class name each, in one batch.

        ``threshold``: one number for every image; None takes each class's F1-optimal threshold of
        the exported calibration (no verdict for a class without one). Raises `UnreadableImage`
        (a `DataError`) naming the first image that cannot be decoded (``image 2``), `UnknownClass`
        for a class the file was not exported for, before anything is scored."""
        if len(images) != len(class_names):
            raise DataError(f"{len(images)} images but {len(class_names)} class names: give one class per image.")
        if not images:
            return []
        class_names = [str(c) for c in class_names]
        index = self.class_index(class_names)  # unknown classes first: no image is decoded for nothing
        xs = [preprocess_bytes(b, self.image_size, self.info["mean"], self.info["std"], f"image {i}")[0]
              for i, b in enumerate(images)]
        out = self.backend(np.ascontiguousarray(np.stack(xs), dtype=np.float32), index)
        results = []
        for i, c in enumerate(class_names):
            t = float(threshold) if threshold is not None else self.threshold(c)
            score = float(out["score"][i])
            results.append(ScoredImage(
                class_name=c, score=score, raw_det=float(out["raw_det"][i]), threshold=t,
                verdict=None if t is None else ("anomalous" if score >= t else "normal"),
                map=np.asarray(out["map"][i], dtype=np.float32) if with_maps else None,
                raw_map=np.asarray(out["raw_map"][i], dtype=np.float32) if with_maps else None,
            ))
        return results


def read_sidecar(model_file: Path, verify: bool = True) -> dict:
    side = sidecar_of(model_file)
    if not side.is_file():
        raise ConfigError(
            f"{side} is missing: an exported model needs the JSON that `aaclip export` writes beside it "
            "(classes, image size, normalisation, thresholds). Copy it next to the model file."
        )
    try:
        info = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # ValueError: bad JSON or not UTF-8 text
        raise ConfigError(f"{side} is not readable JSON ({exc}); re-export the model with `aaclip export`.") from None
    if not isinstance(info, dict):
        info = {}
    missing = [k for k in REQUIRED_KEYS if k not in info]
    if missing or info.get("schema") != SIDECAR_SCHEMA:
        raise ConfigError(
            f"{side} is not an aaclip export description (schema {info.get('schema')!r}, missing "
            f"{', '.join(missing) or 'nothing'}); re-export the model with this version of `aaclip export`."
        )
    if verify and info.get("sha256") and info["sha256"] != sha256_of(model_file):
        raise ConfigError(
            f"{model_file} does not match {side} (sha256 differs): the pair comes from different exports. "
            "Use the files of one `aaclip export` together."
        )
    return info


def load_detector(path: Path, threads: int | None = None, verify: bool = True, info: dict | None = None,
                  backends: Backends = BACKENDS) -> Detector:
    """Load ``path`` with its sidecar JSON (or the given ``info``), run by ``backends[format]``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"--model {path} does not exist: pass the .onnx or .pt file that `aaclip export` wrote.")
    info = read_sidecar(path, verify) if info is None else info
    fmt = info["format"]
    if fmt not in backends:
        if fmt == "torchscript":
            raise ConfigError(f"{path} is a TorchScript model, which needs torch: score it with `aaclip predict "
                              "--model` (the full aaclip install), or export the run with --format onnx.")
        raise ConfigError(f"{sidecar_of(path)} names format '{fmt}'; this scorer runs {', '.join(backends)}.")
    return Detector(path, info, backends[fmt](path, threads))
