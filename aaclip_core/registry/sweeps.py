"""A sweep as stored: its trials, best first, with their held-out value and state, read from the
summary the sweep run keeps (``sweep/trials.json``, written by `aaclip sweep` whenever a worker sees
its study complete). `aaclip compare SWEEP_ID` and `aaclip doctor SWEEP_ID` read it from here."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from aaclip_core.errors import ConfigError
from aaclip_core.record import Artifact, Stage, Tag
from aaclip_core.registry.tracking import connect, download, get_run


@dataclass
class SweepView:
    run_id: str
    study: str
    objective: str
    target_trials: int
    best_trial: int | None
    best_value: float | None
    trials: list[dict]  # number, state, value, params, run_id, loops; best first
    importances: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"run_id": self.run_id, "study": self.study, "objective": self.objective,
                "target_trials": self.target_trials, "best_trial": self.best_trial, "best_value": self.best_value,
                "importances": self.importances, "trials": self.trials}


def is_sweep(run) -> bool:
    return run.data.tags.get(Tag.STAGE) == Stage.SWEEP


def sweep_view(tracking_uri: str | None, run_id: str) -> SweepView | None:
    """The sweep ``run_id`` names, or None when it names another kind of run."""
    mlflow = connect(tracking_uri)
    run = get_run(mlflow, run_id)
    if not is_sweep(run):
        return None
    run_id = run.info.run_id
    with tempfile.TemporaryDirectory(prefix="aaclip-sweep-") as tmp:
        try:
            path = download(mlflow, run_id, Artifact.SWEEP_TRIALS, Path(tmp))
        except Exception:
            raise ConfigError(
                f"Sweep {run_id} has no summary yet (no worker has seen its study complete). Let it finish, or join it "
                f"with `aaclip sweep --study {run.data.tags.get(Tag.STUDY, 'NAME')}`."
            ) from None
        doc = json.loads(path.read_text(encoding="utf-8"))
    return SweepView(run_id, run.data.tags.get(Tag.STUDY, "?"), doc["objective"], doc["target_trials"],
                     doc["best_trial"], doc["best_value"], doc["trials"], doc.get("importances", {}))


