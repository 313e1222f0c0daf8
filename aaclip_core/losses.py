"""Training losses (SPEC §3-4), written to match the reference's numbers."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def focal_loss(probs: torch.Tensor, mask: torch.Tensor, gamma: float = 2.0, smooth: float = 1e-5) -> torch.Tensor:
    """Focal loss on already-softmaxed maps.

    ``probs`` [B, 2, H, W], ``mask`` [B, 1, H, W] in {0, 1}. The one-hot target is clamped to
    [smooth, 1 - smooth] and ``smooth`` is added to p_t before the log, as in the reference.
    """
    c = probs.shape[1]
    p = probs.permute(0, 2, 3, 1).reshape(-1, c)
    target = F.one_hot(mask.reshape(-1).long(), c).to(p.dtype)
    target = target.clamp(smooth / (c - 1), 1.0 - smooth)
    pt = (target * p).sum(dim=1) + smooth
    return (-((1 - pt) ** gamma) * pt.log()).mean()


def dice_loss(pred: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - mean over the batch of (2|P∩T| + 1) / (|P| + |T| + 1)."""
    n = target.shape[0]
    p = pred.reshape(n, -1)
    t = target.reshape(n, -1)
    dice = (2 * (p * t).sum(1) + smooth) / (p.sum(1) + t.sum(1) + smooth)
    return 1 - dice.mean()


def segmentation_loss(probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Focal + dice(normal channel, 1 - mask) + dice(abnormal channel, mask)."""
    m = mask[:, 0]
    return focal_loss(probs, mask) + dice_loss(probs[:, 0], 1 - m) + dice_loss(probs[:, 1], m)


def orthogonality_loss(anchors: torch.Tensor) -> torch.Tensor:
    """(mean over the batch of <normal, abnormal>)^2 for anchors [B, E, 2]."""
    return (anchors[..., 0] * anchors[..., 1]).sum(-1).mean() ** 2


def detection_loss(det: torch.Tensor, anchors: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on det @ T (2 logits, unscaled as in the reference)."""
    logits = torch.einsum("be,bec->bc", det, anchors)
    return F.cross_entropy(logits, labels)
