"""From patch features and anchors to anomaly maps (SPEC §2, §5)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

BLUR = {"industrial": (7, 1.0), "medical": (9, 1.5)}


def patch_logits(patches: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """100 * patches @ T -> [B, 2, g, g] for patches [B, P, E] and anchors [B, E, 2].

    Always fp32, also when the backbone ran under bf16/fp16 autocast: every map (training loss,
    test score) starts here, and reduced precision would quantise the scores into ties."""
    p = int(patches.shape[1])  # a Python int even while tracing: the grid is fixed by the image size
    g = math.isqrt(p)
    if g * g != p:
        raise ValueError(f"{p} patch tokens do not form a square grid")
    device = patches.device.type
    if torch.is_autocast_enabled(device) or patches.dtype != torch.float32:
        with torch.autocast(device, enabled=False):
            s = 100.0 * torch.einsum("bpe,bec->bcp", patches.float(), anchors.float())
    else:  # the plain fp32 graph (what fp32 runs and exported graphs see)
        s = 100.0 * torch.einsum("bpe,bec->bcp", patches, anchors)
    return s.reshape(-1, 2, g, g)  # -1: the batch stays a free dimension in exported graphs


def training_probs(patches: torch.Tensor, anchors: torch.Tensor, image_size: int) -> torch.Tensor:
    """Bilinear up-sampling (align_corners=True) to the image, then softmax over the 2 channels."""
    logits = F.interpolate(patch_logits(patches, anchors), size=image_size, mode="bilinear", align_corners=True)
    return logits.softmax(dim=1)


def test_map(patches: torch.Tensor, anchors: torch.Tensor, image_size: int, domain: str) -> torch.Tensor:
    """One level's pixel score [B, S, S]: (abnormal + 1 - normal)/2 on the grid (no softmax), Gaussian
    blur on the grid, then bilinear up-sampling."""
    s = patch_logits(patches, anchors)
    score = ((s[:, 1] + 1 - s[:, 0]) / 2).unsqueeze(1)
    score = gaussian_blur(score, *BLUR[domain])
    return F.interpolate(score, size=image_size, mode="bilinear", align_corners=True)[:, 0]


def gaussian_kernel(size: int, sigma: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The [size, size] kernel of ``torchvision.transforms.functional.gaussian_blur``, built by the
    same operations so that blurred maps are bit-identical to it (a test holds them equal)."""
    half = (size - 1) * 0.5
    x = torch.linspace(-half, half, steps=size, dtype=dtype)
    pdf = torch.exp(-0.5 * (x / sigma).pow(2))
    k1 = pdf / pdf.sum()
    return torch.mm(k1[:, None], k1[None, :])


def gaussian_blur(x: torch.Tensor, size: int, sigma: float) -> torch.Tensor:
    """Gaussian blur of single-channel maps [B, 1, H, W] with reflect padding, as torchvision's.

    Not torchvision's own function: it expands its kernel by the input's channel count, which the
    ONNX exporter sees as a traced value and then cannot export the convolution; here the kernel is
    a constant of the graph."""
    kernel = gaussian_kernel(size, sigma, x.dtype).to(x.device)[None, None]
    pad = size // 2
    return F.conv2d(F.pad(x, [pad, pad, pad, pad], mode="reflect"), kernel)
