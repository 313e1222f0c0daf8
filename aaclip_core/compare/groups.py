"""Seed groups: rows of one configuration that differ only in the seed, summarised as mean ± std."""

from __future__ import annotations

import numpy as np

from aaclip_core.compare.rows import Row
from aaclip_core.evaluation.protocol import METRIC_NAMES


def seed_groups(rows: list[Row]) -> list[dict]:
    """Mean ± std (sample std) over rows of one configuration that differ only in the seed."""
    by_key: dict[str, list[Row]] = {}
    for r in rows:
        by_key.setdefault(r.config_key, []).append(r)
    out = []
    for members in by_key.values():
        seeds = sorted({r.attrs.get("seed") for r in members}, key=str)
        if len(members) < 2 or len(seeds) < 2:
            continue
        first = members[0]
        label = f"{first.stage}" + (f" loop {first.loop}" if first.loop is not None else "")
        stats: dict[str, dict[str, dict[str, float]]] = {}
        for d in sorted({d for r in members for d in r.tests}):
            for m in METRIC_NAMES:
                vals = [r.tests[d].metrics[m] for r in members if d in r.tests and m in r.tests[d].metrics]
                if vals:
                    stats.setdefault(d, {})[m] = {
                        "mean": float(np.mean(vals)),
                        "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0,
                        "n": len(vals),
                    }
        held: dict[str, dict[str, float]] = {}
        for m in METRIC_NAMES:
            vals = [r.held_out[m] for r in members if m in r.held_out]
            if vals:
                held[m] = {"mean": float(np.mean(vals)), "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0,
                           "n": len(vals)}
        out.append({
            "label": f"{label} mean ± std ({len(seeds)} seeds)",
            "stage": first.stage,
            "loop": first.loop,
            "rows": [r.key for r in members],
            "seeds": seeds,
            "test": stats,
            "held_out": held,
        })
    return out


