"""Which feedback loop a run stands for: the one rule `train feedback`, `test` and `doctor` share.

Each loop's held-out validation results are kept in the manifest of its ``loop_<k>_stage_2``
checkpoint (``val``: metric -> value). The selected loop is the one with the highest value of
``feedback.selection_metric`` (earliest on ties). A metric that no loop defines cannot select; that
is refused before training where it can be known (``check_selection_metric``) and otherwise falls
back to the last loop *loudly*: the selection says FALLBACK and the run is tagged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from aaclip_core.errors import ConfigError
from aaclip_core.names import AUPRO
from aaclip_core.recipe import Recipe


@dataclass(frozen=True)
class Selection:
    loop: int
    reason: str
    fallback: bool = False  # no loop had a finite value: the last loop was taken
    values: dict[int, float] | None = None  # loop -> the metric's finite values

    @property
    def best_value(self) -> float | None:
        return None if self.fallback or not self.values else self.values[self.loop]


def select_loop(val_by_loop: dict[int, dict[str, float]], metric: str) -> Selection:
    """The loop with the best held-out ``metric`` (earliest on ties), or a loud fallback to the last."""
    finite = {k: float(v[metric]) for k, v in val_by_loop.items()
              if v.get(metric) is not None and math.isfinite(float(v[metric]))}
    if not finite:
        last = max(val_by_loop) if val_by_loop else 1
        return Selection(last, f"FALLBACK: no loop has a finite held-out {metric} (undefined on the validation split "
                               f"of every loop); the last loop ({last}) is used, not a selection", True, {})
    best = max(sorted(finite), key=lambda k: finite[k])
    listing = ", ".join(f"{k}: {100 * v:.2f}" for k, v in sorted(finite.items()))
    return Selection(best, f"highest held-out {metric} (x100 per loop: {listing})", False, finite)


def check_selection_metric(recipe: Recipe, val_labels: list[int] | None = None) -> None:
    """Refuse, before any loop is trained, a selection metric that will be undefined for every loop:
    AUPRO switched off, or a validation split whose images are all of one kind (AUROC, AP and F1
    need both normal and anomalous images)."""
    metric = recipe.feedback.selection_metric
    if metric == AUPRO and not recipe.eval.aupro:
        raise ConfigError(
            "feedback.selection_metric = 'aupro' but eval.aupro = false: no loop would have an AUPRO to be selected "
            "by. Set eval.aupro = true, or choose another feedback.selection_metric (e.g. pixel_auroc)."
        )
    if val_labels is not None and len(set(val_labels)) < 2:
        kind = "anomalous" if val_labels and val_labels[0] else "normal"
        raise ConfigError(
            f"The held-out validation split ({len(val_labels)} images, feedback.val_fraction = "
            f"{recipe.feedback.val_fraction}) holds only {kind} images, so feedback.selection_metric = '{metric}' "
            "is undefined for every loop. Raise feedback.val_fraction or train on data with both normal and "
            "anomalous images."
        )
