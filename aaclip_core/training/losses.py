"""Training losses (SPEC §3-4), written to match the reference's numbers."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


def focal_per_sample(probs: torch.Tensor, mask: torch.Tensor, gamma: float = 2.0, smooth: float = 1e-5) -> torch.Tensor:
    """Focal loss of each image [B] on already-softmaxed maps (mean over its pixels).

    ``probs`` [B, 2, H, W], ``mask`` [B, 1, H, W] in {0, 1}. The one-hot target is clamped to
    [smooth, 1 - smooth] and ``smooth`` is added to p_t before the log, as in the reference.
    """
    b, c = probs.shape[:2]
    p = probs.permute(0, 2, 3, 1).reshape(b, -1, c)
    target = F.one_hot(mask.reshape(b, -1).long(), c).to(p.dtype)
    target = target.clamp(smooth / (c - 1), 1.0 - smooth)
    pt = (target * p).sum(dim=-1) + smooth
    return (-((1 - pt) ** gamma) * pt.log()).mean(dim=1)


def focal_loss(probs: torch.Tensor, mask: torch.Tensor, gamma: float = 2.0, smooth: float = 1e-5) -> torch.Tensor:
    """The reference's focal loss: the mean over all pixels of the batch (every image has as many)."""
    return focal_per_sample(probs, mask, gamma, smooth).mean()


def dice_per_sample(pred: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Dice coefficient of each image [B]: (2|P∩T| + 1) / (|P| + |T| + 1)."""
    n = target.shape[0]
    p = pred.reshape(n, -1)
    t = target.reshape(n, -1)
    return (2 * (p * t).sum(1) + smooth) / (p.sum(1) + t.sum(1) + smooth)


def dice_loss(pred: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - mean over the batch of (2|P∩T| + 1) / (|P| + |T| + 1)."""
    return 1 - dice_per_sample(pred, target, smooth).mean()


def segmentation_loss(probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Focal + dice(normal channel, 1 - mask) + dice(abnormal channel, mask)."""
    m = mask[:, 0]
    return focal_loss(probs, mask) + dice_loss(probs[:, 0], 1 - m) + dice_loss(probs[:, 1], m)


def anchor_dots(anchors: torch.Tensor) -> torch.Tensor:
    """<normal, abnormal> of each image's anchors [B, E, 2] -> [B]."""
    return (anchors[..., 0] * anchors[..., 1]).sum(-1)


def orthogonality_loss(anchors: torch.Tensor) -> torch.Tensor:
    """(mean over the batch of <normal, abnormal>)^2 for anchors [B, E, 2]."""
    return anchor_dots(anchors).mean() ** 2


def detection_per_sample(det: torch.Tensor, anchors: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each image [B] on det @ T (2 logits, unscaled as in the reference)."""
    logits = torch.einsum("be,bec->bc", det, anchors)
    return F.cross_entropy(logits, labels, reduction="none")


def detection_loss(det: torch.Tensor, anchors: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on det @ T (2 logits, unscaled as in the reference), mean over the batch."""
    return detection_per_sample(det, anchors, labels).mean()


@dataclass
class LossTerms:
    """A batch loss written as a function of batch means of per-sample values.

    Every training loss here is such a function (means added, 1 - dice means added, the squared
    mean orthogonality), so a batch split over processes gets the one-process loss from the
    all-reduced sums of these values (`distributed.batch_means`).
    """

    added: list[torch.Tensor] = field(default_factory=list)  # [B] each: + mean
    dice: list[torch.Tensor] = field(default_factory=list)  # [B] each: + (1 - mean)
    squared: list[tuple[float, torch.Tensor]] = field(default_factory=list)  # (w, [B]): + w * mean**2

    def add_segmentation(self, probs: torch.Tensor, mask: torch.Tensor) -> None:
        """The terms of `segmentation_loss`."""
        m = mask[:, 0]
        self.added.append(focal_per_sample(probs, mask))
        self.dice += [dice_per_sample(probs[:, 0], 1 - m), dice_per_sample(probs[:, 1], m)]

    def values(self) -> torch.Tensor:
        """[B, K]: every per-sample value, in a fixed order."""
        cols = self.added + self.dice + [v for _, v in self.squared]
        # Float64 sums make the global means independent of how the batch was split.
        return torch.stack([c.double() for c in cols], dim=1)

    def loss(self, means: torch.Tensor) -> torch.Tensor:
        """The batch loss from the means of `values()` (same order)."""
        a, d = len(self.added), len(self.dice)
        total = means[:a].sum() + (1 - means[a:a + d]).sum()
        for j, (w, _) in enumerate(self.squared):
            total = total + w * means[a + d + j] ** 2
        return total
