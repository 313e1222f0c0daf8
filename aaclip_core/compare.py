"""`aaclip compare`: training runs side by side on their test results, with the fairness of every
comparison checked and a paired-bootstrap interval on the difference (SPEC §5-7, §11).

Rows are training runs (base, cross, feedback, imported); a feedback run gets one row per loop
that has a test run or held-out metrics. A row's test metrics come from the test runs whose
``aaclip.source_run`` is the run: the latest FINISHED one per (test dataset, checkpoint). Values
are raw floats in [0, 1] everywhere here; the CLI shows them x100.

Fairness of a row against the reference row on a test dataset:

* UNFAIR: test dataset or test images differ, fidelity, backbone or weights, image size,
  QuickGELU (it changes the frozen backbone's function), protocol settings (``eval.*`` except
  ``eval.batch_size`` and ``eval.aupro``, which do not change any number, and ``data.domain``),
  or the row is a feedback loop other than the held-out selected one (preferring it can only
  rest on its test score: selection on the test set).
* note: seed, total epochs, trainable-parameter count, training dataset, declared checkpoint vs
  held-out loop selection, AUPRO computed for one side only.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import bootstrap as bs
from .pixel_pairs import load_pixel_pairs
from .errors import ConfigError, TrackingError
from .evaluation import METRIC_NAMES
from .tracking import TAG, connect
from .training.schedule import loop_epochs

TRAINING_STAGES = ("base", "cross", "feedback", "imported")
STAGE_ORDER = {s: i for i, s in enumerate(TRAINING_STAGES)}
_LOOP_CKPT = re.compile(r"^loop_(\d+)_stage_(\d)$")

# Recipe keys that do not change what a run learns or scores: ignored when grouping seeds.
_NON_CONFIG_KEYS = {
    "name", "description", "extends", "runtime.seed", "runtime.device", "runtime.threads",
    "data.num_workers", "data.cache_images", "tracking.experiment", "trainable_parameters",
    "val_images", "eval.batch_size",
}
# Protocol settings whose difference does not change a reported number (batch independence is a
# design rule, SPEC §6; aupro only switches AUPRO on or off).
_PROTOCOL_NEUTRAL = {"eval.batch_size", "eval.aupro"}


# ------------------------------------------------------------------------------------------ data


@dataclass
class TestResult:
    run_id: str
    dataset: str
    checkpoint: str
    metrics: dict[str, float]  # mean over classes, raw [0, 1]
    root: str | None
    protocol: dict[str, str]  # eval.* and data.domain the test ran with
    protocol_logged: bool  # False: taken from the training recipe (test run predates the params)
    n_images: int | None = None


@dataclass
class Row:
    key: str
    run_id: str
    stage: str
    label: str
    loop: int | None
    checkpoint: str
    selected: bool
    selection: str  # declared | held-out | test-set
    selection_detail: str
    attrs: dict[str, Any]
    tests: dict[str, TestResult] = field(default_factory=dict)
    held_out: dict[str, float] = field(default_factory=dict)
    run_status: str = "FINISHED"
    config_key: str = ""

    @property
    def test_command(self) -> str:
        if self.loop is not None and self.checkpoint == f"loop_{self.loop}_stage_2" and not self.selected:
            return f"aaclip test --run {self.run_id} --loop {self.loop}"
        if self.selected or self.checkpoint in ("final",):
            return f"aaclip test --run {self.run_id}"
        return f"aaclip test --run {self.run_id} --checkpoint {self.checkpoint}"

    def as_dict(self) -> dict:
        return {
            "key": self.key,
            "run_id": self.run_id,
            "stage": self.stage,
            "label": self.label,
            "loop": self.loop,
            "checkpoint": self.checkpoint,
            "selected": self.selected,
            "selection": self.selection,
            "selection_detail": self.selection_detail,
            "run_status": self.run_status,
            **{k: v for k, v in self.attrs.items() if not k.startswith("_")},
            "tested": bool(self.tests),
            "test": {d: asdict(t) for d, t in sorted(self.tests.items())},
            "held_out": dict(sorted(self.held_out.items())),
            "test_command": None if self.tests else self.test_command,
        }


# ------------------------------------------------------------------------------------------ store


def _search(client, experiment_ids: list[str], filter_string: str = "") -> list:
    out, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string, max_results=1000, page_token=token,
                                  order_by=["attributes.start_time ASC"])
        out.extend(page)
        token = page.token
        if not token:
            return out


def _experiment_ids(client, names: list[str] | None) -> list[str]:
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


def _resolve_runs(client, ids: list[str], experiment_ids: list[str]) -> list:
    runs, candidates = [], None
    for rid in ids:
        try:
            runs.append(client.get_run(rid))
            continue
        except Exception:
            pass
        if candidates is None:  # a short id: match a unique prefix among the store's runs
            candidates = _search(client, experiment_ids)
        matches = [r for r in candidates if r.info.run_id.startswith(rid)]
        if len(matches) != 1:
            raise TrackingError(
                f"Run '{rid}' is {'ambiguous' if matches else 'not in the store'} "
                f"'{client._tracking_client.tracking_uri}'. Pass a full run id (`aaclip compare` with no "
                "ids lists every training run), or point --tracking-uri at the store that holds it."
            )
        runs.append(matches[0])
    for r in runs:
        stage = r.data.tags.get(f"{TAG}stage")
        if stage == "test":
            raise ConfigError(
                f"Run {r.info.run_id} is a test run; compare takes training runs (its source is "
                f"{r.data.tags.get(f'{TAG}source_run')})."
            )
        if stage not in TRAINING_STAGES:
            raise ConfigError(
                f"Run {r.info.run_id} has aaclip.stage '{stage}'; compare takes training runs "
                f"({', '.join(TRAINING_STAGES)})."
            )
    return runs


def _latest_tests(client, experiment_ids: list[str], source_ids: set[str]) -> dict[str, dict[tuple[str, str], Any]]:
    """source run -> (dataset, checkpoint) -> the latest FINISHED test run."""
    runs = _search(client, experiment_ids, f"tags.`{TAG}stage` = 'test' and attributes.status = 'FINISHED'")
    out: dict[str, dict[tuple[str, str], Any]] = {}
    for r in runs:  # oldest first: later ones overwrite
        src = r.data.tags.get(f"{TAG}source_run")
        if src not in source_ids:
            continue
        key = (r.data.tags.get(f"{TAG}dataset", "?"), r.data.tags.get(f"{TAG}checkpoint", "final"))
        out.setdefault(src, {})[key] = r
    return out


def _test_result(test_run, train_params: dict[str, str]) -> TestResult:
    p = test_run.data.params
    protocol = {k[len("protocol."):]: v for k, v in p.items() if k.startswith("protocol.")}
    logged = bool(protocol)
    if not logged:
        protocol = {k: v for k, v in train_params.items() if k.startswith("eval.") or k == "data.domain"}
    return TestResult(
        run_id=test_run.info.run_id,
        dataset=test_run.data.tags.get(f"{TAG}dataset", "?"),
        checkpoint=test_run.data.tags.get(f"{TAG}checkpoint", "final"),
        metrics={m: float(test_run.data.metrics[m]) for m in METRIC_NAMES if m in test_run.data.metrics},
        root=p.get("test.root"),
        protocol=protocol,
        protocol_logged=logged,
    )


# ------------------------------------------------------------------------------------------ attrs


def _int(x) -> int | None:
    try:
        return int(str(x))
    except (TypeError, ValueError):
        return None


def _float(x) -> float | None:
    try:
        return float(str(x))
    except (TypeError, ValueError):
        return None


def _backbone(tags: dict, params: dict) -> tuple[str | None, str | None, int | None]:
    tag = tags.get(f"{TAG}backbone")
    if tag and ":" in tag and "@" in tag:
        name, rest = tag.split(":", 1)
        weights, size = rest.rsplit("@", 1)
        return name, weights, _int(size)
    pretrained = params.get("model.pretrained")
    if pretrained and "/" in pretrained:
        pretrained = Path(pretrained).name
    return params.get("model.name"), pretrained, _int(params.get("model.image_size"))


def _parent_loop(checkpoint: str | None) -> int | None:
    m = _LOOP_CKPT.match(checkpoint or "")
    return int(m.group(1)) if m else None


def run_epochs(client, run, loop: int | None, _seen: tuple = ()) -> tuple[int | None, str]:
    """Total training epochs behind a run's row (stage 1 + stage 2; feedback: summed over loops
    1..loop with :func:`loop_epochs`), including the run it started from, and how."""
    p, t = run.data.params, run.data.tags
    stage = t.get(f"{TAG}stage")
    own, how = None, ""
    if stage in ("base", "cross"):
        s1, s2 = _int(p.get("stage1.epochs")), _int(p.get("stage2.epochs"))
        if s1 is not None and s2 is not None:
            own, how = s1 + s2, f"{s1}+{s2}"
    elif stage == "feedback":
        te, ie = _int(p.get("feedback.text_epochs_per_loop")), _int(p.get("feedback.image_epochs_per_loop"))
        decay, loops = _float(p.get("feedback.epochs_decay_rate")), _int(p.get("feedback.loops"))
        if None not in (te, ie, decay, loops):
            last = loop or loops
            per = [loop_epochs(te, decay, k) + loop_epochs(ie, decay, k) for k in range(1, last + 1)]
            own, how = sum(per), f"loops 1-{last}: " + "+".join(map(str, per))
    elif stage == "imported":
        te, ie = _int(t.get(f"{TAG}text_adapter.epoch")), _int(t.get(f"{TAG}image_adapter.epoch"))
        if te is not None or ie is not None:
            own, how = (te or 0) + (ie or 0), f"imported {te or 0}+{ie or 0}"
    parent = t.get(f"{TAG}parent_run")
    if own is not None and parent and parent not in _seen:
        try:
            prun = client.get_run(parent)
        except Exception:
            return own, how + f" (+ unknown from parent {parent[:8]})"
        pe, _ = run_epochs(client, prun, _parent_loop(t.get(f"{TAG}parent_checkpoint")),
                           (*_seen, run.info.run_id))
        if pe is not None:
            return own + pe, f"{how} + {pe} of parent {parent[:8]}"
    return own, how


def _attrs(client, run, loop: int | None) -> dict[str, Any]:
    t, p = run.data.tags, run.data.params
    name, weights, size = _backbone(t, p)
    epochs, how = run_epochs(client, run, loop)
    return {
        "fidelity": t.get(f"{TAG}fidelity"),
        "backbone": name,
        "weights": weights,
        "image_size": size,
        "quick_gelu": t.get(f"{TAG}quick_gelu"),
        "seed": _int(t.get(f"{TAG}seed")),
        "train_dataset": t.get(f"{TAG}dataset"),
        "epochs": epochs,
        "epochs_detail": how,
        "trainable_parameters": _int(p.get("trainable_parameters")),
        "recipe": t.get(f"{TAG}recipe"),
    }


def _config_key(row_stage: str, loop: int | None, checkpoint: str, params: dict[str, str]) -> str:
    items = sorted((k, v) for k, v in params.items() if k not in _NON_CONFIG_KEYS and not k.startswith("import."))
    where = f"loop {loop}" if loop is not None else checkpoint
    return repr((row_stage, where, items))


# ------------------------------------------------------------------------------------------ rows


def _val_history(client, run_id: str) -> dict[int, dict[str, float]]:
    out: dict[int, dict[str, float]] = {}
    for m in METRIC_NAMES:
        for h in client.get_metric_history(run_id, f"val/{m}"):
            if not math.isnan(h.value):
                out.setdefault(int(h.step), {})[m] = float(h.value)
    return out


def _rows_of(client, run, tests: dict[tuple[str, str], Any]) -> list[Row]:
    rid = run.info.run_id
    t, p = run.data.tags, run.data.params
    stage = t.get(f"{TAG}stage", "?")
    selected_ckpt = t.get(f"{TAG}selected_checkpoint", "final")
    by_ckpt: dict[str, dict[str, TestResult]] = {}
    for (dataset, ckpt), tr in tests.items():
        by_ckpt.setdefault(ckpt, {})[dataset] = _test_result(tr, p)
    short = rid[:8]
    rows: list[Row] = []

    def make(ckpt: str, loop: int | None, held: dict[str, float]) -> Row:
        selected = ckpt == selected_ckpt
        if stage == "feedback":
            sel_loop = t.get(f"{TAG}selected_loop")
            if selected:
                selection, detail = "held-out", t.get(f"{TAG}selection", f"held-out selection: loop {sel_loop}")
            elif f"{TAG}selected_checkpoint" not in t:
                selection, detail = "declared", f"checkpoint '{ckpt}' (the run records no selection)"
            else:
                selection = "test-set"
                detail = (f"'{ckpt}' is not the held-out selected checkpoint '{selected_ckpt}': preferring it "
                          "can only rest on its test score (selection on the test set)")
        else:
            selection, detail = "declared", f"declared checkpoint '{ckpt}'"
        label = f"{stage} {short}"
        key = short
        if loop is not None and _LOOP_CKPT.match(ckpt) and ckpt.endswith("_stage_2"):
            label += f" loop {loop}"
            key += f"/loop{loop}"
        elif ckpt != selected_ckpt:
            label += f" @{ckpt}"
            key += f"@{ckpt}"
        if selected and stage == "feedback":
            label += " (selected)"
        row = Row(
            key=key, run_id=rid, stage=stage, label=label, loop=loop, checkpoint=ckpt, selected=selected,
            selection=selection, selection_detail=detail, attrs=_attrs(client, run, loop),
            tests=by_ckpt.get(ckpt, {}), held_out=held, run_status=run.info.status,
        )
        row.config_key = _config_key(stage, loop, ckpt if not selected else "selected", p)
        return row

    if stage == "feedback":
        val = _val_history(client, rid)
        loops = set(val)
        for ckpt in by_ckpt:
            m = _LOOP_CKPT.match(ckpt)
            if m and m.group(2) == "2":
                loops.add(int(m.group(1)))
        for k in sorted(loops):
            rows.append(make(f"loop_{k}_stage_2", k, val.get(k, {})))
        if not loops:
            m = _LOOP_CKPT.match(selected_ckpt)
            rows.append(make(selected_ckpt, int(m.group(1)) if m else None, {}))
        for ckpt in sorted(by_ckpt):
            m = _LOOP_CKPT.match(ckpt)
            if not (m and m.group(2) == "2"):
                rows.append(make(ckpt, int(m.group(1)) if m else None, {}))
    else:
        rows.append(make(selected_ckpt, None, {}))
        for ckpt in sorted(c for c in by_ckpt if c != selected_ckpt):
            rows.append(make(ckpt, None, {}))
    return rows


# ------------------------------------------------------------------------------------------ fairness

_UNFAIR_FIELDS = (
    ("fidelity", "fidelity"),
    ("backbone", "backbone"),
    ("weights", "backbone weights"),
    ("image_size", "image size"),
    ("quick_gelu", "QuickGELU"),
)
_NOTE_FIELDS = (
    ("seed", "seed"),
    ("epochs", "total epochs"),
    ("trainable_parameters", "trainable parameters"),
    ("train_dataset", "training dataset"),
)


def _protocol_diff(a: dict[str, str], b: dict[str, str]) -> tuple[list[str], list[str]]:
    unfair, notes = [], []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k, "?"), b.get(k, "?")
        if va == vb or k == "eval.batch_size":
            continue
        if k == "eval.aupro":
            notes.append(f"AUPRO computed on one side only (eval.aupro {va} vs {vb})")
        else:
            unfair.append(f"protocol {k} differs ({va} vs {vb})")
    return unfair, notes


def fairness(row: Row, ref: Row, dataset: str, paths: tuple[set[str] | None, set[str] | None]) -> dict:
    """Why a comparison of ``row`` with ``ref`` on ``dataset`` is UNFAIR, or what to note."""
    unfair: list[str] = []
    notes: list[str] = []
    for f, name in _UNFAIR_FIELDS:
        a, b = row.attrs.get(f), ref.attrs.get(f)
        if a != b:
            unfair.append(f"{name} differs ({a} vs {b})")
    rt, ft = row.tests.get(dataset), ref.tests.get(dataset)
    if rt is None or ft is None:
        unfair.append(f"test dataset differs ({dataset} tested for {'the row' if rt else 'the reference'} only)")
    else:
        pr, pf = paths
        if pr is not None and pf is not None:
            if pr != pf:
                unfair.append(f"test images differ ({len(pr)} vs {len(pf)} images, {len(pr ^ pf)} not shared)")
        elif rt.root != ft.root:
            unfair.append(f"test data root differs ({rt.root} vs {ft.root})")
        u, n = _protocol_diff(rt.protocol, ft.protocol)
        unfair += u
        notes += n
        if not (rt.protocol_logged and ft.protocol_logged):
            notes.append("a test run predates logged protocol settings; the training recipe's are assumed")
    for who in (row, ref):
        if who.selection == "test-set":
            unfair.append(f"{who.label}: {who.selection_detail}")
    if row.selection != ref.selection and "test-set" not in (row.selection, ref.selection):
        notes.append(f"selection differs ({row.selection} vs {ref.selection})")
    for f, name in _NOTE_FIELDS:
        a, b = row.attrs.get(f), ref.attrs.get(f)
        if a != b:
            extra = ""
            if f == "epochs":
                extra = f"; {row.attrs.get('epochs_detail')} vs {ref.attrs.get('epochs_detail')}"
            notes.append(f"{name} differs ({a} vs {b}{extra})")
    return {"fair": not unfair, "verdict": "UNFAIR" if unfair else ("note" if notes else "fair"),
            "unfair": unfair, "notes": notes}


def differences(rows: list[Row], image_sets: dict[tuple[str, str], set[str] | None]) -> list[dict]:
    """Every attribute that differs between the compared rows, with each row's value."""
    out = []
    # Differences matter where results are compared: between tested rows (all rows when none is).
    rows = [r for r in rows if r.tests] or rows

    def add(name: str, severity: str, values: dict[str, Any]) -> None:
        if len({repr(v) for v in values.values()}) > 1:
            out.append({"field": name, "severity": severity, "values": values})

    add("test datasets", "unfair", {r.key: sorted(r.tests) for r in rows if r.tests})
    for f, name in _UNFAIR_FIELDS:
        add(name, "unfair", {r.key: r.attrs.get(f) for r in rows})
    datasets = sorted({d for r in rows for d in r.tests})
    for d in datasets:
        on = [r for r in rows if d in r.tests]
        add(f"protocol settings on {d}", "unfair",
            {r.key: {k: v for k, v in sorted(r.tests[d].protocol.items()) if k not in _PROTOCOL_NEUTRAL} for r in on})
        sizes = {r.key: len(image_sets[(r.key, d)]) if image_sets.get((r.key, d)) is not None else None for r in on}
        sets = {frozenset(image_sets[(r.key, d)]) for r in on if image_sets.get((r.key, d)) is not None}
        if len(sets) > 1:
            out.append({"field": f"test images on {d}", "severity": "unfair", "values": sizes})
    add("selection", "unfair" if any(r.selection == "test-set" for r in rows) else "note",
        {r.key: r.selection for r in rows})
    for f, name in _NOTE_FIELDS:
        add(name, "note", {r.key: r.attrs.get(f) for r in rows})
    return out


# ------------------------------------------------------------------------------------------ groups


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


# ------------------------------------------------------------------------------------------ main


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
                "metrics": ["image_auroc", "pixel_auroc"],
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
    bases = [r for r in rows if r.stage == "base" and r.selected]
    if bases:
        # The base run that the other runs started from, when they share one; else the oldest.
        parents = [r.attrs.get("_parent") for r in rows if r.attrs.get("_parent")]
        for b in bases:
            if parents and all(p == b.run_id for p in parents):
                return b
        return bases[0]
    return rows[0]


def _image_scores(client, test_run_id: str, cache: dict, workdir: Path) -> list[bs.ImageScore] | None:
    if test_run_id not in cache:
        try:
            local = client.download_artifacts(test_run_id, "results/image_scores.csv", str(workdir / test_run_id))
            cache[test_run_id] = bs.read_image_scores(Path(local))
        except Exception:
            cache[test_run_id] = None
    return cache[test_run_id]


def _pixel_pairs(client, test_run_id: str, cache: dict, workdir: Path):
    if test_run_id not in cache:
        try:
            local = client.download_artifacts(test_run_id, "results/pixel_pairs.npz", str(workdir / f"{test_run_id}-px"))
            cache[test_run_id] = load_pixel_pairs(Path(local))
        except Exception:
            cache[test_run_id] = None
    return cache[test_run_id]


def compare_runs(
    run_ids: list[str] | None = None,
    experiments: list[str] | None = None,
    metric: str = "pixel_auroc",
    reference: str | None = None,
    resamples: int = bs.DEFAULT_RESAMPLES,
    tracking_uri: str | None = None,
) -> Comparison:
    if metric not in METRIC_NAMES:
        raise ConfigError(f"--metric '{metric}' is not a metric; choose one of {', '.join(METRIC_NAMES)}.")
    if resamples < 0:
        raise ConfigError(f"--bootstrap {resamples}: pass 0 (no bootstrap) or a number of resamples.")
    mlflow = connect(tracking_uri)
    try:
        client = mlflow.MlflowClient()
        exp_ids = _experiment_ids(client, experiments)
    except ConfigError:
        raise
    except Exception as exc:
        raise TrackingError(
            f"Cannot read the MLflow store '{mlflow.get_tracking_uri()}' ({type(exc).__name__}: {exc}). "
            "Check --tracking-uri / MLFLOW_TRACKING_URI."
        ) from None
    notes: list[str] = []
    if run_ids:
        runs = _resolve_runs(client, run_ids, exp_ids)
        for r in runs:
            if r.info.status != "FINISHED":
                notes.append(f"run {r.info.run_id[:8]} is {r.info.status}, not FINISHED")
    else:
        runs = [r for r in _search(client, exp_ids, "attributes.status = 'FINISHED'")
                if r.data.tags.get(f"{TAG}stage") in TRAINING_STAGES]
    if not runs:
        where = ", ".join(experiments) if experiments else "any experiment"
        raise ConfigError(
            f"No finished training runs in {where} of the store '{mlflow.get_tracking_uri()}'. Train one "
            "(`aaclip train base`), or pass --experiment / --tracking-uri."
        )
    test_exps = sorted({r.info.experiment_id for r in runs})
    tests = _latest_tests(client, test_exps, {r.info.run_id for r in runs})
    rows: list[Row] = []
    for r in sorted(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id)):
        for row in _rows_of(client, r, tests.get(r.info.run_id, {})):
            row.attrs["_parent"] = r.data.tags.get(f"{TAG}parent_run")
            rows.append(row)
    ref = _pick_reference(rows, reference)
    datasets = sorted({d for r in rows for d in r.tests})
    if not ref.tests:
        notes.append(f"the reference {ref.label} is not tested, so nothing is compared with it: run "
                     f"`{ref.test_command}` (or choose another with --reference)")

    cache: dict[str, list[bs.ImageScore] | None] = {}
    pixel_cache: dict[str, dict | None] = {}
    image_sets: dict[tuple[str, str], set[str] | None] = {}
    comparisons = []
    with tempfile.TemporaryDirectory(prefix="aaclip-compare-") as tmp:
        workdir = Path(tmp)
        for r in rows:
            for d, t in r.tests.items():
                scores = _image_scores(client, t.run_id, cache, workdir)
                image_sets[(r.key, d)] = {s.path for s in scores} if scores is not None else None
                t.n_images = len(scores) if scores is not None else None
        for r in rows:
            if r is ref:
                continue
            for d in sorted(set(r.tests) | set(ref.tests)):
                if d not in r.tests:
                    continue
                entry: dict[str, Any] = {"row": r.key, "reference": ref.key, "dataset": d}
                entry.update(fairness(r, ref, d, (image_sets.get((r.key, d)), image_sets.get((ref.key, d)))))
                if d in ref.tests:
                    a, b = r.tests[d].metrics, ref.tests[d].metrics
                    entry["delta"] = {m: a[m] - b[m] for m in METRIC_NAMES if m in a and m in b}
                    entry["bootstrap"] = None
                    entry["statement"] = None
                    sa = cache.get(r.tests[d].run_id)
                    sb = cache.get(ref.tests[d].run_id)
                    if resamples > 0 and sa is not None and sb is not None:
                        res = bs.paired_image_auroc(sa, sb, resamples)
                        if res is not None:
                            entry["bootstrap"] = res.as_dict()
                            entry["verdict_bootstrap"] = bs.verdict(res)
                            statement = bs.describe(res, r.label, ref.label, d)
                            if not entry["fair"]:
                                statement += " [UNFAIR: " + "; ".join(entry["unfair"]) + "]"
                            entry["statement"] = statement
                    elif resamples > 0:
                        entry["bootstrap_missing"] = "a test run has no results/image_scores.csv"
                else:
                    entry["delta"] = {}
                    entry["bootstrap"] = None
                    entry["statement"] = None
                entry["pixel_ci"] = {"available": False, "reason": bs.PIXEL_CI_UNAVAILABLE}
                if resamples > 0 and d in ref.tests:
                    pa = _pixel_pairs(client, r.tests[d].run_id, pixel_cache, workdir)
                    pb = _pixel_pairs(client, ref.tests[d].run_id, pixel_cache, workdir)
                    res = bs.paired_pixel_auroc(pa, pb, resamples) if pa is not None and pb is not None else None
                    if res is not None:
                        statement = bs.describe(res, r.label, ref.label, d)
                        if not entry["fair"]:
                            statement += " [UNFAIR: " + "; ".join(entry["unfair"]) + "]"
                        entry["pixel_ci"] = {"available": True, "bootstrap": res.as_dict(),
                                             "verdict": bs.verdict(res), "statement": statement}
                comparisons.append(entry)
    for r in rows:
        r.attrs.pop("_parent", None)
    return Comparison(
        rows=rows, reference=ref, datasets=datasets, metric=metric, comparisons=comparisons,
        differences=differences(rows, image_sets), groups=seed_groups(rows), bootstrap_resamples=resamples,
        notes=notes,
    )


# ------------------------------------------------------------------------------------------ plot


def plot_loops(result: Comparison, path: Path) -> Path:
    """Metric per loop of every feedback run (held-out dashed, test solid), base runs as horizontal
    lines; PNG written atomically (temporary file in the same folder, then renamed)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure

    path = Path(path).expanduser()
    if not path.parent.is_dir():
        raise ConfigError(f"--plot {path}: the folder {path.parent} does not exist.")
    m = result.metric
    fig = Figure(figsize=(7.5, 4.5), dpi=100)
    ax = fig.subplots()
    drawn = 0
    by_run: dict[str, list[Row]] = {}
    for r in result.rows:
        if r.stage == "feedback" and r.loop is not None and r.checkpoint == f"loop_{r.loop}_stage_2":
            by_run.setdefault(r.run_id, []).append(r)
    colours = iter(matplotlib.rcParams["axes.prop_cycle"].by_key()["color"] * 10)
    for run_id, rows in by_run.items():
        colour = next(colours)
        rows = sorted(rows, key=lambda r: r.loop)
        held = [(r.loop, 100 * r.held_out[m]) for r in rows if m in r.held_out]
        if held:
            ax.plot(*zip(*held), "--o", color=colour, label=f"feedback {run_id[:8]} held-out {m}")
            drawn += 1
        for d in sorted({d for r in rows for d in r.tests}):
            pts = [(r.loop, 100 * r.tests[d].metrics[m]) for r in rows if d in r.tests and m in r.tests[d].metrics]
            if pts:
                ax.plot(*zip(*pts), "-s", color=colour, label=f"feedback {run_id[:8]} test {d}")
                drawn += 1
        sel = [r.loop for r in rows if r.selected]
        if sel:
            ax.axvline(sel[0], color=colour, alpha=0.25, linewidth=6)
    styles = iter([":", "-.", (0, (5, 2)), (0, (1, 3))] * 10)
    for r in result.rows:
        if r.stage == "base" and r.selected:
            for d, t in sorted(r.tests.items()):
                if m in t.metrics:
                    ax.axhline(100 * t.metrics[m], color="black", linestyle=next(styles),
                               label=f"base {r.run_id[:8]} test {d}")
                    drawn += 1
    if not drawn:
        ax.text(0.5, 0.5, f"no {m} values to plot (no feedback loop or tested base run)", ha="center",
                va="center", transform=ax.transAxes)
    ax.set_xlabel("loop")
    ax.set_ylabel(f"{m} (x100)")
    ax.set_title(f"{m} per feedback loop (shaded: held-out selected loop)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    if drawn:
        ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    os.close(fd)
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
