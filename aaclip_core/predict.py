"""`aaclip predict`: score new images with a trained run, on the scale `aaclip test` reports.

Scale. `test` min-max normalises the raw pixel maps and detection scores over each class's test set
(SPEC §5). A new image has no test set around it, so it is normalised with the ranges that test
stored (``results/report.json`` -> ``calibration[class]``: map_min/max, det_min/max and the
F1-optimal image threshold) of the most recent FINISHED test run of the same run *and checkpoint*
(tags ``aaclip.source_run`` / ``aaclip.checkpoint``). With that calibration, predicting an image of
that test set reproduces its test image score exactly. Normalised values are not clipped, so a new
image can score below 0 or above 1.

Without calibration (no such test run, or a class the test run did not have) the score is the same
formula on the raw values: industrial ``0.5 * max(raw map) + 0.5 * raw det``, medical
``max(raw map)``. Such scores are not on the test scale, so a verdict is only given for a numeric
``--threshold`` (compared as is), and the overlay's heat map is normalised by the image's own map.

Threshold. A number is used as is ("user"); ``auto`` takes each class's F1-optimal image threshold
of the calibration test run (an error when there is none); no threshold means ``auto`` when a
calibration exists and no verdict otherwise. Verdict: anomalous when score >= threshold.

Class of an image, per image: where it sits in an indexed layout (MVTec AD / MPDD / BTAD
``<class>/test/<defect>/x``, VisA ``<class>/Data/Images/Anomaly/x``, the plain ``<class>/normal/x``),
else the nearest of its parent, grandparent and great-grandparent folders that is a known class of
the run (the calibration's classes and the run's training classes), else ``class_name``
(``--class``); else the image gets an error row. A folder of several classes is one call. Folders are searched recursively for image files, skipping mask
folders (``ground_truth``, VisA ``Masks``, ``masks``), hidden files and folders, and the output folder.

Preprocessing is `load_image_tensor` (as `test`), and `predict_batch` treats every image
independently, so results do not depend on the batch size.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .config import Recipe
from .data.layouts import IMAGE_EXTENSIONS, MASK_FOLDERS
from .data.prompt_names import PROMPT_NAMES_ARTIFACT, scoring_namer
from .errors import ConfigError, DataError
from .tracking import TAG, connect, download, get_run

SKIP_DIRS = MASK_FOLDERS
CLASS_SEARCH_DEPTH = 3
PREDICTIONS_FILE = "predictions.jsonl"
ROW_KEYS = (
    "path",
    "class_name",
    "image_score",
    "raw_map_max",
    "raw_det",
    "threshold",
    "threshold_source",
    "verdict",
    "overlay",
    "map",
    "error",
)


@dataclass
class Calibration:
    """Per-class ranges and thresholds of one `test` run (see `EvalReport.calibration`)."""

    test_run_id: str
    dataset: str
    checkpoint: str
    classes: dict[str, dict[str, float]] = field(default_factory=dict)
    # class -> the prompt name the test run used (empty for test runs that predate recorded names)
    prompt_names: dict[str, str] = field(default_factory=dict)

    @property
    def source(self) -> str:
        return f"auto: F1-max on {self.dataset} test run {self.test_run_id}"


@dataclass
class ImageJob:
    path: Path
    key: Path  # output location relative to the output folder, without suffix
    class_name: str | None = None
    error: str | None = None


# ------------------------------------------------------------------------------------------ calibration


def _search_test_runs(mlflow, run_id: str, checkpoint: str | None) -> list:
    client = mlflow.MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return []
    filt = f"tags.\"{TAG}source_run\" = '{run_id}' and attributes.status = 'FINISHED'"
    if checkpoint is not None:
        filt += f" and tags.\"{TAG}checkpoint\" = '{checkpoint}'"
    return client.search_runs(experiments, filt, order_by=["attributes.start_time DESC"], max_results=50)


def find_calibration(mlflow, run_id: str, checkpoint: str, workdir: Path) -> tuple[Calibration | None, str | None]:
    """The calibration of the most recent FINISHED test run of ``run_id`` at ``checkpoint``, and a note
    when there is none (or only test runs of another checkpoint)."""
    for run in _search_test_runs(mlflow, run_id, checkpoint):
        try:
            path = download(mlflow, run.info.run_id, "results/report.json", workdir / "calibration" / run.info.run_id)
            report = json.loads(path.read_text(encoding="utf-8"))
        except Exception:  # an older test run without a report: try the next one
            continue
        classes = report.get("calibration") or {}
        if classes:
            calibration = Calibration(run.info.run_id, run.data.tags.get(f"{TAG}dataset", "?"), checkpoint, classes)
            calibration.prompt_names = _test_prompt_names(mlflow, run.info.run_id, workdir)
            return calibration, None
    others = _search_test_runs(mlflow, run_id, None)
    if others:
        ck = sorted({r.data.tags.get(f"{TAG}checkpoint", "?") for r in others})
        return None, f"run {run_id} has finished test runs only of checkpoint(s) {', '.join(ck)}, not '{checkpoint}'"
    return None, f"run {run_id} has no finished test run"


def _test_prompt_names(mlflow, test_run_id: str, workdir: Path) -> dict[str, str]:
    try:
        path = download(mlflow, test_run_id, PROMPT_NAMES_ARTIFACT, workdir / "calibration" / test_run_id)
    except Exception:  # a test run from before prompt names were logged
        return {}
    classes = json.loads(path.read_text(encoding="utf-8")).get("classes", {})
    return {c: v["name"] for c, v in classes.items()}


def parse_threshold(value: str | float | None) -> float | str | None:
    """None, the string 'auto', or a finite number; anything else is a usage error."""
    if value is None or isinstance(value, float | int):
        return None if value is None else float(value)
    text = str(value).strip()
    if text.lower() == "auto":
        return "auto"
    try:
        x = float(text)
    except ValueError:
        x = math.nan
    if not math.isfinite(x):
        raise ConfigError(f"--threshold must be a number or 'auto', got {value!r}.")
    return x


def score_image(raw_map: torch.Tensor, raw_det: float, cal: dict[str, float] | None, domain: str) -> tuple[float, np.ndarray]:
    """(image score, heat map in [0, 1] for display) under the rule in the module docstring; the
    normalisation mirrors `evaluation.image_scores` operation for operation."""
    raw_map = raw_map.float()
    if cal is not None:
        lo, hi = torch.tensor(cal["map_min"]), torch.tensor(cal["map_max"])
        nmap = (raw_map - lo) / (hi - lo) if hi > lo else torch.zeros_like(raw_map)
        dlo, dhi = torch.tensor(cal["det_min"]), torch.tensor(cal["det_max"])
        det = torch.tensor(raw_det)
        ndet = (det - dlo) / (dhi - dlo) if dhi > dlo else torch.zeros_like(det)
        pmax = nmap.max()
        score = pmax if domain == "medical" else 0.5 * pmax + 0.5 * ndet
        heat = nmap.clamp(0, 1).numpy()
    else:
        pmax = raw_map.max()
        score = pmax if domain == "medical" else 0.5 * pmax + 0.5 * torch.tensor(raw_det)
        lo, hi = raw_map.min(), raw_map.max()
        heat = ((raw_map - lo) / (hi - lo)).numpy() if hi > lo else np.zeros(tuple(raw_map.shape), np.float32)
    return float(score), heat


# ------------------------------------------------------------------------------------------ inputs


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS


def collect_images(inputs: list[Path], out_dir: Path) -> list[ImageJob]:
    """Files as given; folders searched recursively (sorted), skipping ground-truth folders, hidden
    entries and the output folder. Output keys mirror the inputs (folder name / relative path) and never collide."""
    out_res = out_dir.resolve()
    jobs: list[ImageJob] = []
    used: set[str] = set()

    def add(path: Path, key: Path) -> None:
        stem, k = key.with_suffix(""), 1
        candidate = stem
        while candidate.as_posix().lower() in used:
            k += 1
            candidate = stem.with_name(f"{stem.name}_{k}")
        used.add(candidate.as_posix().lower())
        jobs.append(ImageJob(path=path, key=candidate))

    for given in inputs:
        p = Path(given).expanduser()
        if p.is_dir():
            found = []
            for f in sorted(p.rglob("*")):
                rel = f.relative_to(p)
                if any(part in SKIP_DIRS or part.startswith(".") for part in rel.parts):
                    continue
                if f.suffix.lower() not in IMAGE_EXTENSIONS or not f.is_file():
                    continue
                if out_res in f.resolve().parents:
                    continue
                found.append(f)
            if not found:
                raise DataError(f"Folder {p} holds no image files ({', '.join(IMAGE_EXTENSIONS)}).")
            name = p.resolve().name or "input"
            for f in found:
                add(f, Path(name) / f.relative_to(p))
        elif p.exists():
            add(p, Path(p.name))
        else:
            raise DataError(f"{p} does not exist: pass image files or folders of images.")
    return jobs


def resolve_class(path: Path, fallback: str | None, known: set[str]) -> str:
    """The class of one image: where it sits in an indexed layout (`class_of_image`: MVTec AD, MPDD,
    BTAD, VisA, the plain folder layout), else the nearest of its parent folders that is a known class
    of the run, else ``fallback`` (``--class``). Each image is resolved on its own, so one call scores a
    folder of several classes."""
    from .data.layouts import class_of_image

    resolved = Path(path).resolve()
    by_layout = class_of_image(resolved)
    if by_layout is not None:
        return by_layout
    parents = [q.name for q in resolved.parents][:CLASS_SEARCH_DEPTH]
    for name in parents:
        if name in known:
            return name
    if fallback:
        return fallback
    raise DataError(
        f"cannot tell the class of {path}: it sits in no dataset layout (<class>/test/<defect>/, "
        f"<class>/Data/Images/Anomaly/, <class>/normal/, ...) and none of its folders ({', '.join(parents) or '-'}) "
        f"is a known class of the run ({', '.join(sorted(known)) or 'none'}); pass --class NAME"
    )


def training_classes(mlflow, run_id: str, recipe: Recipe, workdir: Path) -> set[str]:
    """Classes the run was trained on (its logged sample list), else those its recipe names."""
    try:
        path = download(mlflow, run_id, "data/train.jsonl", workdir / "train-meta")
        return {json.loads(line)["class_name"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()}
    except Exception:
        return set(recipe.data.train.classes or [])


# ------------------------------------------------------------------------------------------ predict


def _row(job: ImageJob, **values) -> dict:
    row = dict.fromkeys(ROW_KEYS)
    row.update(path=str(job.path.resolve() if job.path.exists() else job.path), class_name=job.class_name)
    row.update(values)
    return row


def predict_images(
    run_id: str,
    inputs: list[Path],
    out_dir: Path | None = None,
    threshold: str | float | None = None,
    class_name: str | None = None,
    checkpoint: str | None = None,
    save_maps: bool = False,
    batch_size: int | None = None,
    tracking_uri: str | None = None,
    reporter=None,
    contour_level: float = 0.5,
) -> dict:
    """Score images with a run; write overlays (and raw maps) and ``predictions.jsonl`` under
    ``out_dir``. Returns a summary with every row; unreadable images are rows with an ``error``."""
    from .data.dataset import load_image_tensor
    from .evaluation import predict_batch
    from .anchors import AnchorBank
    from .model_io import default_checkpoint, model_from_checkpoint, run_checkpoint, run_recipe
    from .reporter import Reporter
    from .runtime import autocast, configure_threads, seed_everything, select_device
    from .visualize import CLIP_MEAN, CLIP_STD, denormalise, save_overlay, verdict_line

    thr = parse_threshold(threshold)
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}.")
    mlflow = connect(tracking_uri)
    run_id = get_run(mlflow, run_id).info.run_id  # the full id, when given a prefix
    out_dir = Path(out_dir) if out_dir is not None else Path(f"aaclip-predict-{run_id[:8]}")
    jobs = collect_images(list(inputs), out_dir)

    with tempfile.TemporaryDirectory(prefix="aaclip-predict-") as tmp:
        workdir = Path(tmp)
        recipe = run_recipe(mlflow, run_id, workdir)
        ckpt_name = checkpoint or default_checkpoint(mlflow, run_id)
        calibration, note = find_calibration(mlflow, run_id, ckpt_name, workdir)
        hint = f"aaclip test --run {run_id}" + (f" --checkpoint {ckpt_name}" if checkpoint else "")
        note_full = None
        if note:
            note_full = f"{note}: scores are raw, not on the test scale (calibrate with `{hint}`)"
        if thr == "auto" and calibration is None:
            raise ConfigError(
                f"--threshold auto takes the F1-optimal threshold of a finished test run of run {run_id} "
                f"(checkpoint '{ckpt_name}'), but {note}. Run `{hint}` first, or pass a numeric --threshold."
            )
        cal_classes = calibration.classes if calibration else {}
        if thr == "auto" and class_name and "image_threshold" not in cal_classes.get(class_name, {}):
            raise ConfigError(
                f"--threshold auto: test run {calibration.test_run_id} has no F1-optimal threshold for class "
                f"'{class_name}' (it has: {', '.join(sorted(cal_classes)) or 'none'}). Pass a numeric --threshold."
            )
        mode = thr if thr is not None else ("auto" if calibration is not None else None)
        known = set(cal_classes) | training_classes(mlflow, run_id, recipe, workdir)
        for job in jobs:
            try:
                job.class_name = resolve_class(job.path, class_name, known)
            except DataError as exc:
                job.error = str(exc)

        configure_threads(recipe.runtime.threads)
        seed_everything(recipe.runtime.seed)
        device = select_device(recipe.runtime.device)
        reporter = reporter or Reporter()
        ckpt = run_checkpoint(mlflow, run_id, ckpt_name, workdir)
        model = model_from_checkpoint(recipe, ckpt, device)
        model.eval()
        dataset_name = calibration.dataset if calibration else recipe.data.test.name
        # The test run's own class set and names when calibrated, so the anchors are exactly as in `test`.
        classes = sorted({j.class_name for j in jobs if j.error is None} | set(cal_classes))
        names = scoring_namer(recipe, dataset_name, ckpt.manifest, calibration and calibration.prompt_names)
        bank = AnchorBank(model, classes, names) if classes else None
        if bank is not None:
            bank.freeze()
        size = recipe.model.image_size
        bs = batch_size or recipe.eval.batch_size
        reporter.info(
            f"predicting {len(jobs)} images with run {run_id} checkpoint '{ckpt_name}'"
            + (f", calibrated by {calibration.dataset} test run {calibration.test_run_id}" if calibration else "")
        )

        rows: list[dict | None] = [None] * len(jobs)
        out_dir.mkdir(parents=True, exist_ok=True)

        def threshold_for(c: str) -> tuple[float | None, str]:
            if isinstance(mode, float):
                return mode, "user"
            if mode == "auto":
                t = cal_classes.get(c, {}).get("image_threshold")
                return (float(t), calibration.source) if t is not None else (None, calibration.source)
            return None, "none"

        def flush(batch: list[tuple[int, ImageJob, torch.Tensor]]) -> None:
            images = torch.stack([b[2] for b in batch]).to(device)
            with torch.no_grad(), autocast(device, recipe.runtime.precision):
                maps, det = predict_batch(model, bank, images, [b[1].class_name for b in batch], recipe)
            maps, det = maps.float().cpu(), det.float().cpu()
            for (pos, job, image), raw_map, raw_det in zip(batch, maps, det):
                cal = cal_classes.get(job.class_name)
                score, heat = score_image(raw_map, float(raw_det), cal, recipe.data.domain)
                t, source = threshold_for(job.class_name)
                error = None
                if mode == "auto" and t is None:
                    error = (f"no F1-optimal threshold for class '{job.class_name}' in test run "
                             f"{calibration.test_run_id}; pass a numeric --threshold")
                verdict = None if t is None else ("anomalous" if score >= t else "normal")
                footer = verdict_line(score, t, source, verdict)
                if cal is None:
                    footer += "   |   raw (uncalibrated) scale"
                overlay = save_overlay(out_dir / "overlays" / job.key.with_suffix(".png"),
                                       denormalise(image, CLIP_MEAN, CLIP_STD), heat, contour_level,
                                       footer=f"{job.class_name}   |   {footer}")
                map_path = None
                if save_maps:
                    map_path = out_dir / "overlays" / job.key.with_suffix(".npy")
                    np.save(map_path, raw_map.numpy().astype(np.float32))
                rows[pos] = _row(
                    job,
                    image_score=score,
                    raw_map_max=float(raw_map.max()),
                    raw_det=float(raw_det),
                    threshold=t,
                    threshold_source=source,
                    verdict=verdict,
                    overlay=str(overlay.resolve()),
                    map=str(map_path.resolve()) if map_path else None,
                    error=error,
                )

        batch: list[tuple[int, ImageJob, torch.Tensor]] = []
        todo = [i for i, j in enumerate(jobs) if j.error is None]
        n_batches, done = max(1, math.ceil(len(todo) / bs)), 0
        for pos, job in enumerate(jobs):
            if job.error is None:
                try:
                    batch.append((pos, job, load_image_tensor(job.path, size, CLIP_MEAN, CLIP_STD)))
                except DataError as exc:
                    job.error = str(exc)
            if job.error is not None:
                t, source = threshold_for(job.class_name)
                rows[pos] = _row(job, threshold=t, threshold_source=source, error=job.error)
            if len(batch) == bs:
                flush(batch)
                batch = []
                done += 1
                reporter.eval_progress(done, n_batches)
        if batch:
            flush(batch)
            reporter.eval_progress(n_batches, n_batches)

    final = [r for r in rows if r is not None]
    pred_path = out_dir / PREDICTIONS_FILE
    with open(pred_path, "w", encoding="utf-8") as fh:
        for r in final:
            fh.write(json.dumps(r, sort_keys=False) + "\n")
    errors = [r for r in final if r["error"] is not None]
    return {
        "run_id": run_id,
        "checkpoint": ckpt_name,
        "calibration": (
            {"test_run_id": calibration.test_run_id, "dataset": calibration.dataset} if calibration else None
        ),
        "calibration_note": note_full if calibration is None else None,
        "threshold": mode,
        "out_dir": str(out_dir.resolve()),
        "predictions": str(pred_path.resolve()),
        "n_images": len(final),
        "n_errors": len(errors),
        "n_anomalous": sum(r["verdict"] == "anomalous" for r in final),
        "rows": final,
    }
