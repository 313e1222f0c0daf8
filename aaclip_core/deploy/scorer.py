"""Score images with an exported detector file alone: no training stack, no tracking store.

Imports only numpy, PIL and the standard library at module level; the backend is imported when a
file is loaded: onnxruntime for ``.onnx`` (``pip install aaclip[deploy]``), torch for a TorchScript
``.pt``. The sidecar JSON beside the file (``detector.onnx`` -> ``detector.onnx.json``) says how to
preprocess (image size, mean, std), which classes the ``class_index`` input names, the domain, the
per-class thresholds and where the model came from.

Preprocessing reproduces `aaclip_core.data.dataset.load_image_tensor` (RGB, bicubic resize to S x S
with PIL, /255, minus mean, over std, in float32) without torch; a test holds the two equal.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from aaclip_core.deploy.contract import OUTPUT_NAMES as OUTPUTS
from aaclip_core.deploy.contract import REQUIRED_KEYS, SIDECAR_SCHEMA, sidecar_of
from aaclip_core.errors import CheckpointError, ConfigError, DataError
from aaclip_core.files import sha256_of
from aaclip_core.images import UnreadableImage, read_rgb

DEPLOY_HINT = "pip install 'aaclip[deploy]'"


def preprocess(path: Path, image_size: int, mean, std) -> tuple[np.ndarray, np.ndarray]:
    """(float32 [3, S, S] normalised input, uint8 [S, S, 3] resized picture) of one image file."""
    try:
        rgb = read_rgb(path)
    except UnreadableImage as exc:
        raise DataError(f"Image {path} cannot be read ({exc.reason}). Replace or remove the file.") from exc
    resized = rgb.resize((image_size, image_size), Image.Resampling.BICUBIC)
    picture = np.asarray(resized, dtype=np.uint8).copy()
    m = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)
    x = picture.transpose(2, 0, 1).astype(np.float32) / np.float32(255.0)
    return (x - m) / s, picture


class _OnnxBackend:
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


class _TorchScriptBackend:
    def __init__(self, path: Path, threads: int | None) -> None:
        try:
            import torch
        except ImportError:
            raise ConfigError(f"{path} is a TorchScript model, which needs torch (pip install torch).") from None
        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        try:
            self.module = torch.jit.load(str(path), map_location="cpu").eval()
        except Exception as exc:  # torch.jit raises RuntimeError/ValueError variants for bad files
            raise CheckpointError(f"TorchScript cannot load {path}: {exc}. Re-export it with `aaclip export`.") from None

    def __call__(self, images: np.ndarray, index: np.ndarray) -> dict[str, np.ndarray]:
        torch = self.torch
        with torch.no_grad():
            out = self.module(torch.from_numpy(images), torch.from_numpy(index))
        return {k: v.numpy() for k, v in zip(OUTPUTS, out)}


BACKENDS = {"onnx": _OnnxBackend, "torchscript": _TorchScriptBackend}


@dataclass
class Detector:
    """An exported detector: ``score`` maps preprocessed images of named classes to the outputs."""

    path: Path
    info: dict
    backend: object

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
            raise DataError(
                f"{self.path} has no class {', '.join(repr(c) for c in missing)} (it has: "
                f"{', '.join(self.classes)}); pass --class with one of these."
            )
        return np.asarray([known[c] for c in class_names], dtype=np.int64)

    def score(self, images: np.ndarray, class_names: list[str]) -> dict[str, np.ndarray]:
        """``images`` float32 [B, 3, S, S] (see `preprocess`) -> raw_map, raw_det, map, score."""
        images = np.ascontiguousarray(images, dtype=np.float32)
        s = self.image_size
        if images.ndim != 4 or images.shape[1:] != (3, s, s):
            raise DataError(f"{self.path} takes images of shape [B, 3, {s}, {s}], got {list(images.shape)}.")
        return self.backend(images, self.class_index(class_names))


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


def load_detector(path: Path, threads: int | None = None, verify: bool = True, info: dict | None = None) -> Detector:
    """Load ``path`` (.onnx or TorchScript .pt) with its sidecar JSON (or the given ``info``)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"--model {path} does not exist: pass the .onnx or .pt file that `aaclip export` wrote.")
    info = read_sidecar(path, verify) if info is None else info
    fmt = info["format"]
    if fmt not in BACKENDS:
        raise ConfigError(f"{sidecar_of(path)} names format '{fmt}'; this scorer runs {', '.join(BACKENDS)}.")
    return Detector(path, info, BACKENDS[fmt](path, threads))
