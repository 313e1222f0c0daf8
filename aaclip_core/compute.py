"""Device, precision and seeding: choices made from the recipe, never assumptions."""

from __future__ import annotations

import contextlib
import os
import random

import numpy as np
import torch

from aaclip_core.errors import ConfigError

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def select_device(spec: str) -> torch.device:
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"runtime.device = '{spec}' is not a device; use auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"runtime.device = '{spec}' but no CUDA GPU is visible to torch; use --set runtime.device=cpu."
        )
    return device


def autocast(device: torch.device, precision: str):
    """Mixed precision for the forward pass; fp32 means no autocast at all."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if device.type == "cpu" and precision == "fp16":
        raise ConfigError("runtime.precision = 'fp16' needs a GPU; use bf16 or fp32 on the CPU.")
    return torch.autocast(device_type=device.type, dtype=_DTYPES[precision])


def bf16_supported(device: torch.device) -> bool:
    """Whether the hardware computes in bf16 natively (CUDA GPUs from Ampere on; CPUs with
    AVX512-BF16 or AMX). Elsewhere bf16 autocast works but is emulated, and slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch (the reference seeds all three) and return a generator for
    data order, so shuffling does not depend on how many random numbers the model drew."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def configure_threads(threads: int) -> None:
    if threads > 0:
        torch.set_num_threads(threads)
