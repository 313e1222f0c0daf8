"""A doctor check, the report that collects them, and every threshold a check judges by (documented in
the package docstring)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

CROSS_WEIGHT_BAND = (0.05, 0.2)
CROSS_WEIGHT_FAIL = 0.5
GRAD_BAND = (0.05, 0.15)
GRAD_VANISHING = 0.01
GRAD_DEAD = 0.001
# The band is SPEC §7's, measured on the reference backbone; on it, norms this many times the band's
# top warn. Other backbones (the tiny demo one runs 20-200x the band) are judged only for vanishing.
GRAD_BAND_BACKBONE = "ViT-L-14-336"
GRAD_FAR_ABOVE = 10.0
LOSS_NEARLY_FLAT = 0.02
PROBE_RATIO_FAIL = 0.8
PROBE_SHARE_FAIL = 0.5
PROBE_IMAGES = 8
STATUSES = ("pass", "warn", "fail", "skip")


@dataclass
class Check:
    name: str
    status: str  # pass | warn | fail | skip
    value: Any  # the number (or setting) behind the verdict
    detail: str
    fix: str = ""

    def as_dict(self) -> dict:
        d = asdict(self)
        if isinstance(d["value"], float) and not math.isfinite(d["value"]):
            d["value"] = str(d["value"])
        return d


@dataclass
class Note:
    """A caveat that holds for several checks alike (what training does with large gradient norms):
    said once, under the last of the checks it covers, instead of in each one's detail."""
    covers: list[str]  # the names of the checks it is about
    text: str

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class DoctorReport:
    run_id: str | None
    checks: list[Check]
    notes: list[Note] = field(default_factory=list)

    @property
    def summary(self) -> dict[str, int]:
        return {s: sum(c.status == s for c in self.checks) for s in STATUSES}

    @property
    def failed(self) -> bool:
        return any(c.status == "fail" for c in self.checks)

    def as_dict(self) -> dict:
        return {"run_id": self.run_id, "checks": [c.as_dict() for c in self.checks],
                "notes": [n.as_dict() for n in self.notes], "summary": self.summary}


