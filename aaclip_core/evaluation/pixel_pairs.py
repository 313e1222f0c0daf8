"""Per-class pixel pair counts: what a bootstrap over test images needs to recompute pixel AUROC
exactly without keeping every pixel map (SPEC §5; used by `compare`).

For the images of one class, ``C[i, j]`` counts the (anomalous pixel of image i, normal pixel of
image j) pairs in which the anomalous pixel scores higher (a tie counts one half); ``pos[i]`` and
``neg[j]`` count each image's anomalous and normal pixels. Pixel AUROC over any multiset of the
images, image i taken ``w[i]`` times, is then ``w @ C @ w / ((w @ pos) * (w @ neg))``; with every
weight 1 it is the class's pixel AUROC. Min-max normalisation is monotonic, so raw maps serve.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class PixelPairs:
    counts: np.ndarray  # [n, n] float64
    pos: np.ndarray  # [n] anomalous pixels per image
    neg: np.ndarray  # [n] normal pixels per image

    def auroc(self, weights: np.ndarray | None = None) -> float:
        w = np.ones(len(self.pos)) if weights is None else weights
        denom = float(w @ self.pos) * float(w @ self.neg)
        return float(w @ self.counts @ w / denom) if denom > 0 else float("nan")


def pixel_pairs(maps: torch.Tensor, masks: torch.Tensor) -> PixelPairs:
    """Exact pair counts for ``maps`` [n, H, W] and boolean ``masks`` [n, H, W].

    Every anomalous pixel of the class is located among each image's sorted normal pixels with
    two binary searches (strictly below, and equal for the half-count of ties).
    """
    n = maps.shape[0]
    flat = maps.reshape(n, -1).to(torch.float64)
    m = masks.reshape(n, -1).bool()
    pos_scores = flat[m]
    pos_owner = torch.arange(n, device=flat.device).unsqueeze(1).expand_as(m)[m]
    counts = torch.zeros(n, n, dtype=torch.float64, device=flat.device)
    for j in range(n):
        negatives = flat[j][~m[j]].sort().values
        if negatives.numel() == 0 or pos_scores.numel() == 0:
            continue
        below = torch.searchsorted(negatives, pos_scores, right=False).to(torch.float64)
        not_above = torch.searchsorted(negatives, pos_scores, right=True).to(torch.float64)
        counts[:, j] = torch.zeros(n, dtype=torch.float64, device=flat.device).index_add_(
            0, pos_owner, (below + not_above) / 2
        )
    return PixelPairs(
        counts=counts.cpu().numpy(),
        pos=m.sum(1).cpu().numpy().astype(np.float64),
        neg=(~m).sum(1).cpu().numpy().astype(np.float64),
    )


def save_pixel_pairs(path, per_class: dict[str, tuple[list[str], PixelPairs]]) -> None:
    """One ``.npz`` (no pickle): ``<class>/paths``, ``<class>/counts``, ``<class>/pos``, ``<class>/neg``."""
    arrays = {}
    for c, (paths, pp) in per_class.items():
        arrays[f"{c}/paths"] = np.array(paths, dtype=str)
        arrays[f"{c}/counts"], arrays[f"{c}/pos"], arrays[f"{c}/neg"] = pp.counts, pp.pos, pp.neg
    with open(path, "wb") as f:
        np.savez_compressed(f, **arrays)


def load_pixel_pairs(path) -> dict[str, tuple[list[str], PixelPairs]]:
    out: dict[str, tuple[list[str], PixelPairs]] = {}
    with np.load(path, allow_pickle=False) as z:
        classes = sorted({k.rsplit("/", 1)[0] for k in z.files})
        for c in classes:
            out[c] = ([str(p) for p in z[f"{c}/paths"]], PixelPairs(z[f"{c}/counts"], z[f"{c}/pos"], z[f"{c}/neg"]))
    return out
