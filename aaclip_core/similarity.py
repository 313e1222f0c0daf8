"""From patch features and anchors to anomaly maps (SPEC §2, §5)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.transforms.functional import gaussian_blur

BLUR = {"industrial": (7, 1.0), "medical": (9, 1.5)}


def patch_logits(patches: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """100 * patches @ T -> [B, 2, g, g] for patches [B, P, E] and anchors [B, E, 2]."""
    b, p, _ = patches.shape
    g = int(round(p**0.5))
    if g * g != p:
        raise ValueError(f"{p} patch tokens do not form a square grid")
    s = 100.0 * torch.einsum("bpe,bec->bcp", patches, anchors)
    return s.reshape(b, 2, g, g)


def training_probs(patches: torch.Tensor, anchors: torch.Tensor, image_size: int) -> torch.Tensor:
    """Bilinear up-sampling (align_corners=True) to the image, then softmax over the 2 channels."""
    logits = F.interpolate(patch_logits(patches, anchors), size=image_size, mode="bilinear", align_corners=True)
    return logits.softmax(dim=1)


def test_map(patches: torch.Tensor, anchors: torch.Tensor, image_size: int, domain: str) -> torch.Tensor:
    """One level's pixel score [B, S, S]: (abnormal + 1 - normal)/2 on the grid (no softmax), Gaussian
    blur on the grid, then bilinear up-sampling."""
    s = patch_logits(patches, anchors)
    score = ((s[:, 1] + 1 - s[:, 0]) / 2).unsqueeze(1)
    k, sigma = BLUR[domain]
    score = gaussian_blur(score, [k, k], [sigma, sigma])
    return F.interpolate(score, size=image_size, mode="bilinear", align_corners=True)[:, 0]
