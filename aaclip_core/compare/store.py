"""What compare reads from the MLflow store: experiments, runs (by id or unique prefix), the latest
test run per (source run, dataset, checkpoint), and a test run's per-image scores and pixel pairs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aaclip_core.checkpoints.checkpoint import FINAL
from aaclip_core.errors import ConfigError
from aaclip_core.evaluation import bootstrap as bs
from aaclip_core.evaluation.pixel_pairs import load_pixel_pairs
from aaclip_core.record import TRAINING_STAGES, Artifact, Stage, Tag
from aaclip_core.registry.tracking import get_run


def search_runs(client, experiment_ids: list[str], filter_string: str = "") -> list:
    out, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string, max_results=1000, page_token=token,
                                  order_by=["attributes.start_time ASC"])
        out.extend(page)
        token = page.token
        if not token:
            return out


def experiment_ids(client, names: list[str] | None) -> list[str]:
    if not names:
        return [e.experiment_id for e in client.search_experiments()]
    ids = []
    for name in names:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            known = ", ".join(sorted(e.name for e in client.search_experiments())) or "none"
            raise ConfigError(f"--experiment '{name}': no such MLflow experiment (known: {known}).")
        ids.append(exp.experiment_id)
    return ids


def find_run(client, run_id: str):
    """The run with this id in any experiment, or None when the store has none; a store that cannot
    be read raises (it is not a missing run)."""
    ids = [e.experiment_id for e in client.search_experiments()]
    found = client.search_runs(ids, f"attributes.run_id = '{run_id}'", max_results=1) if ids else []
    return found[0] if found else None


def resolve_runs(mlflow, ids: list[str]) -> list:
    """The runs given by full id or unique prefix (tracking.get_run: one resolver for every command)."""
    runs = [get_run(mlflow, rid) for rid in ids]
    for r in runs:
        stage = r.data.tags.get(Tag.STAGE)
        if stage == Stage.TEST:
            raise ConfigError(
                f"Run {r.info.run_id} is a test run; compare takes training runs (its source is "
                f"{r.data.tags.get(Tag.SOURCE_RUN)})."
            )
        if stage not in TRAINING_STAGES:
            raise ConfigError(
                f"Run {r.info.run_id} has {Tag.STAGE} '{stage}'; compare takes training runs "
                f"({', '.join(TRAINING_STAGES)})."
            )
    return runs


def latest_tests(client, experiment_ids: list[str], source_ids: set[str]) -> dict[str, dict[tuple[str, str], Any]]:
    """source run -> (dataset, checkpoint) -> the latest FINISHED test run."""
    finished_tests = f"tags.`{Tag.STAGE}` = '{Stage.TEST}' and attributes.status = 'FINISHED'"
    runs = search_runs(client, experiment_ids, finished_tests)
    out: dict[str, dict[tuple[str, str], Any]] = {}
    for r in runs:  # oldest first: later ones overwrite
        src = r.data.tags.get(Tag.SOURCE_RUN)
        if src not in source_ids:
            continue
        key = (r.data.tags.get(Tag.DATASET, "?"), r.data.tags.get(Tag.CHECKPOINT, FINAL))
        out.setdefault(src, {})[key] = r
    return out


class TestArtifacts:
    """A test run's per-image scores and pixel pairs, downloaded once per comparison (None: the run
    has none)."""

    def __init__(self, client, workdir: Path):
        self.client, self.workdir = client, workdir
        self._scores: dict[str, list[bs.ImageScore] | None] = {}
        self._pixels: dict[str, dict | None] = {}

    def _download(self, test_run_id: str, name: str, folder: str) -> Path | None:
        """A test run's ``results/<name>``, or None when the run has none (an older test run);
        a store that cannot be read raises."""
        path = Artifact.result(name)
        if path not in {a.path for a in self.client.list_artifacts(test_run_id, Artifact.RESULTS)}:
            return None
        return Path(self.client.download_artifacts(test_run_id, path, str(self.workdir / folder)))

    def image_scores(self, test_run_id: str) -> list[bs.ImageScore] | None:
        if test_run_id not in self._scores:
            local = self._download(test_run_id, Artifact.IMAGE_SCORES, test_run_id)
            self._scores[test_run_id] = bs.read_image_scores(local) if local else None
        return self._scores[test_run_id]

    def pixel_pairs(self, test_run_id: str) -> dict | None:
        if test_run_id not in self._pixels:
            local = self._download(test_run_id, Artifact.PIXEL_PAIRS, f"{test_run_id}-px")
            self._pixels[test_run_id] = load_pixel_pairs(local) if local else None
        return self._pixels[test_run_id]
