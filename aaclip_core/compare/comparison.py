"""`compare_runs`: the rows, the reference, every pairwise comparison with its fairness and bootstrap."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from aaclip_core.compare.fairness import differences
from aaclip_core.compare.groups import seed_groups
from aaclip_core.compare.paired import compare_pair
from aaclip_core.compare.rows import Row, rows_of
from aaclip_core.compare.store import (
    TestArtifacts,
    experiment_ids,
    latest_tests,
    resolve_runs,
    search_runs,
)
from aaclip_core.errors import ConfigError
from aaclip_core.evaluation import bootstrap as bs
from aaclip_core.evaluation.protocol import METRIC_NAMES
from aaclip_core.names import IMAGE_AUROC, PIXEL_AUROC
from aaclip_core.record import TRAINING_STAGES, Stage, Tag
from aaclip_core.registry.tracking import connect, store_call


@dataclass
class Comparison:
    rows: list[Row]
    reference: Row
    datasets: list[str]
    metric: str
    comparisons: list[dict]
    differences: list[dict]
    groups: list[dict]
    bootstrap_resamples: int
    notes: list[str]

    def as_dict(self) -> dict:
        return {
            "metric": self.metric,
            "reference": self.reference.key,
            "datasets": self.datasets,
            "rows": [r.as_dict() for r in self.rows],
            "groups": self.groups,
            "differences": self.differences,
            "comparisons": self.comparisons,
            "bootstrap": {
                "resamples": self.bootstrap_resamples,
                "seed": bs.BOOTSTRAP_SEED,
                "confidence": bs.CONFIDENCE,
                "metrics": [IMAGE_AUROC, PIXEL_AUROC],
            },
            "notes": self.notes,
        }


def _pick_reference(rows: list[Row], reference: str | None) -> Row:
    if reference:
        matches = [r for r in rows if r.run_id == reference or r.key == reference]
        if not matches:
            matches = [r for r in rows if r.run_id.startswith(reference) or r.key.startswith(reference)]
            runs = {r.run_id for r in matches}
            if len(runs) > 1:
                raise ConfigError(f"--reference '{reference}' matches several runs; give more characters.")
        if not matches:
            raise ConfigError(
                f"--reference '{reference}' is not one of the compared rows "
                f"({', '.join(r.key for r in rows)}). Pass one of them (or include the run in RUN_IDs)."
            )
        for r in matches:  # a feedback run given by id: its held-out selected loop
            if r.selected:
                return r
        return matches[0]
    bases = [r for r in rows if r.stage == Stage.BASE and r.selected]
    if bases:
        # The base run that the other runs started from, when they share one; else the oldest.
        parents = [r.attrs.get("_parent") for r in rows if r.attrs.get("_parent")]
        for b in bases:
            if parents and all(p == b.run_id for p in parents):
                return b
        return bases[0]
    return rows[0]


def _open_store(tracking_uri: str | None, experiments: list[str] | None):
    mlflow = connect(tracking_uri)
    client = mlflow.MlflowClient()
    with store_call(mlflow, "listing experiments"):
        return mlflow, client, experiment_ids(client, experiments)


def _training_runs(mlflow, client, run_ids, exp_ids, experiments, notes: list[str]) -> list:
    """The runs named (any status, noted when not finished), else every finished training run."""
    if run_ids:
        runs = resolve_runs(mlflow, run_ids)
        notes += [f"run {r.info.run_id[:8]} is {r.info.status}, not FINISHED" for r in runs
                  if r.info.status != "FINISHED"]
    else:
        runs = [r for r in search_runs(client, exp_ids, "attributes.status = 'FINISHED'")
                if r.data.tags.get(Tag.STAGE) in TRAINING_STAGES]
    if not runs:
        where = ", ".join(experiments) if experiments else "any experiment"
        raise ConfigError(
            f"No finished training runs in {where} of the store '{mlflow.get_tracking_uri()}'. Train one "
            "(`aaclip train base`), or pass --experiment / --tracking-uri."
        )
    return runs


def _rows(client, runs: list) -> list[Row]:
    tests = latest_tests(client, sorted({r.info.experiment_id for r in runs}), {r.info.run_id for r in runs})
    rows: list[Row] = []
    for r in sorted(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id)):
        for row in rows_of(client, r, tests.get(r.info.run_id, {})):
            row.attrs["_parent"] = r.data.tags.get(Tag.PARENT_RUN)
            rows.append(row)
    return rows


def _image_sets(rows: list[Row], artifacts: TestArtifacts) -> dict[tuple[str, str], set[str] | None]:
    """(row, test dataset) -> the image paths its test scored (None: the test run stored none)."""
    out: dict[tuple[str, str], set[str] | None] = {}
    for r in rows:
        for d, t in r.tests.items():
            scores = artifacts.image_scores(t.run_id)
            out[(r.key, d)] = {s.path for s in scores} if scores is not None else None
            t.n_images = len(scores) if scores is not None else None
    return out


def compare_runs(
    run_ids: list[str] | None = None,
    experiments: list[str] | None = None,
    metric: str = PIXEL_AUROC,
    reference: str | None = None,
    resamples: int = bs.DEFAULT_RESAMPLES,
    tracking_uri: str | None = None,
) -> Comparison:
    if metric not in METRIC_NAMES:
        raise ConfigError(f"--metric '{metric}' is not a metric; choose one of {', '.join(METRIC_NAMES)}.")
    if resamples < 0:
        raise ConfigError(f"--bootstrap {resamples}: pass 0 (no bootstrap) or a number of resamples.")
    mlflow, client, exp_ids = _open_store(tracking_uri, experiments)
    notes: list[str] = []
    rows = _rows(client, _training_runs(mlflow, client, run_ids, exp_ids, experiments, notes))
    ref = _pick_reference(rows, reference)
    if not ref.tests:
        notes.append(f"the reference {ref.label} is not tested, so nothing is compared with it: run "
                     f"`{ref.test_command}` (or choose another with --reference)")
    with tempfile.TemporaryDirectory(prefix="aaclip-compare-") as tmp:
        artifacts = TestArtifacts(client, Path(tmp))
        image_sets = _image_sets(rows, artifacts)
        comparisons = [
            compare_pair(r, ref, d, image_sets, artifacts.image_scores, artifacts.pixel_pairs, resamples)
            for r in rows if r is not ref for d in sorted(r.tests)
        ]
    for r in rows:
        r.attrs.pop("_parent", None)
    return Comparison(
        rows=rows, reference=ref, datasets=sorted({d for r in rows for d in r.tests}), metric=metric,
        comparisons=comparisons, differences=differences(rows, image_sets), groups=seed_groups(rows),
        bootstrap_resamples=resamples, notes=notes,
    )
