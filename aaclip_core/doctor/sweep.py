"""`aaclip doctor SWEEP_ID`: what a sweep can get wrong, each with the number behind it and a fix."""

from __future__ import annotations

import math

from aaclip_core.doctor.checks import Check
from aaclip_core.recipe import Recipe, SweepRange
from aaclip_core.registry.sweeps import SweepView

# A best value within this share of a range (on its own scale: log for log ranges) is at its edge.
EDGE_SHARE = 0.05


def sweep_checks(view: SweepView, recipe: Recipe | None) -> list[Check]:
    counted = [t for t in view.trials if t["state"] in ("COMPLETE", "PRUNED")]
    finished = [t for t in view.trials if t["state"] == "COMPLETE"]
    failed = [t for t in view.trials if t["state"] == "FAIL"]
    checks = [Check(
        "sweep trials", "pass" if len(counted) >= view.target_trials else "warn", len(counted),
        f"{len(counted)} of the {view.target_trials} trials asked ended with a result ({len(finished)} finished, "
        f"{len(counted) - len(finished)} pruned)",
        "" if len(counted) >= view.target_trials else
        f"join the study again to finish it: aaclip sweep --study {view.study} (with its recipe)",
    )]
    checks.append(Check(
        "diverged trials", "pass" if not failed else "warn", len(failed),
        "no trial failed" if not failed else
        f"{len(failed)} trial(s) failed (diverged, no finite held-out value, or their worker died): "
        + ", ".join(str(t["number"]) for t in failed[:10]),
        "" if not failed else "look at the failed trials' runs (`aaclip runs`); a learning-rate range whose top "
        "diverges should end lower",
    ))
    best = next((t for t in view.trials if t["number"] == view.best_trial), None)
    space = recipe.sweep.space if recipe is not None and recipe.sweep is not None else {}
    if best is None:
        checks.append(Check("best at a range's edge", "skip", None, "no finished trial"))
        return checks
    edges = []
    for key, dim in space.items():
        value = best["params"].get(key)
        if isinstance(dim, SweepRange) and isinstance(value, (int, float)):
            side = _edge(dim, float(value))
            if side:
                edges.append(f"{key} = {value:.4g} at the {side} end of [{dim.low}, {dim.high}]")
    ranged = [k for k, d in space.items() if isinstance(d, SweepRange)]
    checks.append(Check(
        "best at a range's edge", "warn" if edges else ("pass" if ranged else "skip"), len(edges),
        "; ".join(edges) if edges else (f"the best trial's {', '.join(ranged)} lie inside their ranges" if ranged else
                                        "the space has no ranges"),
        "widen the range past that end (the best may lie outside it) and sweep again" if edges else "",
    ))
    return checks


def _edge(dim: SweepRange, value: float) -> str | None:
    scale = math.log if dim.log else (lambda x: x)
    lo, hi, v = scale(float(dim.low)), scale(float(dim.high)), scale(value)
    share = (v - lo) / (hi - lo)
    return "low" if share <= EDGE_SHARE else "high" if share >= 1 - EDGE_SHARE else None
