"""Loading an exported detector in the full install: ONNX files through the torch-free scorer
(`aaclip_score.detector`), TorchScript ``.pt`` files through torch, which is imported only when one
is loaded. Everything else about scoring a file (sidecar, preprocessing, the `Detector`) is the
scorer's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from aaclip_score.contract import OUTPUT_NAMES as OUTPUTS
from aaclip_score.detector import BACKENDS, Detector
from aaclip_score.detector import load_detector as load_with
from aaclip_score.errors import CheckpointError, ConfigError


class TorchScriptBackend:
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


ALL_BACKENDS = {**BACKENDS, "torchscript": TorchScriptBackend}


def load_detector(path: Path, threads: int | None = None, verify: bool = True, info: dict | None = None) -> Detector:
    """Load ``path`` (.onnx or TorchScript .pt) with its sidecar JSON (or the given ``info``)."""
    return load_with(path, threads, verify, info, ALL_BACKENDS)
