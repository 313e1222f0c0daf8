"""`aaclip register` and `aaclip predict --model models:/...`: a run's detector in the MLflow Model
Registry, and back out of it.

Registering exports the run's detector exactly as `aaclip export --format onnx [--int8]` does
(:func:`aaclip_core.jobs.deploy.export_detector`), logs it as an MLflow Model with a ``pyfunc``
flavour (:mod:`aaclip_core.deploy.served`, torch-free) linked to the run, and registers a new version
of the name with version tags (:class:`aaclip_core.record.VersionTag`) and a description; an alias
moves to it when asked.

A run that was never tested has no calibration: it is registered with raw scores (no thresholds, no
verdicts), and the version's description, its ``aaclip.calibrated=false`` tag and a warning say so.
Refusing would block the cross-attention and feedback runs a team often registers before their test,
and a raw-score detector is still useful with a threshold chosen by its user; the tag lets a
deployment check refuse it.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from aaclip_score.contract import sidecar_of
from aaclip_score.detector import read_sidecar

from aaclip_core.deploy import served
from aaclip_core.errors import ConfigError, TrackingError
from aaclip_core.jobs.deploy import export_detector
from aaclip_core.names import METRIC_NAMES
from aaclip_core.record import TRAINING_STAGES, Tag, VersionTag
from aaclip_core.registry.models import (
    check_registry_uri,
    download_version,
    log_served_model,
    parse_model_uri,
    register_version,
    registry_client,
    resolve_version,
)
from aaclip_core.registry.tracking import connect, get_run
from aaclip_core.reporter import Reporter

# MLflow's rules for registered model names and aliases, checked before any work.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,254}$")
_ALIAS = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]{0,254}$")


def _check_names(name: str, alias: str | None) -> None:
    if not _NAME.match(name or ""):
        raise ConfigError(f"--name {name!r} is not a model name: use letters, digits, '-', '_' and '.', starting with "
                          "a letter or digit (e.g. --name bottle-detector).")
    if alias is not None and (not _ALIAS.match(alias) or re.fullmatch(r"v\d+", alias, re.IGNORECASE)
                              or alias.lower() == "latest"):
        raise ConfigError(f"--alias {alias!r} is not an alias: use letters, digits, '_' and '-', starting with a "
                          "letter or '_', and not 'latest' or v<number> (MLflow reserves them), e.g. --alias champion.")


def served_requirements() -> list[str]:
    """The served model's pip requirements, pinned to what is installed here: torch-free."""
    pins = []
    for package in served.SERVED_REQUIREMENTS:
        try:
            pins.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            pins.append(package)
    return pins


def _test_metrics(mlflow, test_run_id: str | None) -> dict[str, str]:
    if not test_run_id:
        return {}
    metrics = get_run(mlflow, test_run_id).data.metrics
    return {VersionTag.test_metric(m): f"{metrics[m]:.6f}" for m in METRIC_NAMES if m in metrics}


def _version_tags(mlflow, info: dict, stage: str) -> dict[str, str]:
    prov, source = info["provenance"], info.get("calibration_source") or {}
    calibrated = sorted(info.get("calibration") or {})
    tags = {
        VersionTag.SOURCE_RUN: prov["run_id"],
        VersionTag.CHECKPOINT: prov["checkpoint"],
        VersionTag.STAGE: stage,
        VersionTag.RECIPE_HASH: prov["recipe_hash"],
        VersionTag.VERSION: prov["aaclip_version"],
        VersionTag.PRECISION: info.get("precision", "fp32"),
        VersionTag.CALIBRATED: "true" if calibrated else "false",
        VersionTag.CLASSES: ",".join(info["classes"]),
        VersionTag.CALIBRATED_CLASSES: ",".join(calibrated),
    }
    if calibrated:
        tags[VersionTag.CALIBRATION_RUN] = source.get("test_run_id") or ""
        tags[VersionTag.CALIBRATION_DATASET] = source.get("dataset") or ""
        tags.update(_test_metrics(mlflow, source.get("test_run_id")))
    return tags


def _description(info: dict, stage: str) -> str:
    prov, source = info["provenance"], info.get("calibration_source") or {}
    head = (f"aaclip {stage} detector from run {prov['run_id']} (checkpoint '{prov['checkpoint']}', "
            f"{info.get('precision', 'fp32')}), classes {', '.join(info['classes'])}.")
    if info.get("calibration"):
        return (f"{head} Calibrated by the {source.get('dataset')} test run {source.get('test_run_id')}: scores on "
                "that test's scale, verdicts at its F1-optimal thresholds.")
    return (f"{head} UNCALIBRATED: raw scores, no thresholds and no verdicts ({info.get('calibration_note') or 'no test'})."
            f" Test the run (`aaclip test --run {prov['run_id']}`) and register it again for calibrated scores.")


def register_run(run_id: str, name: str, alias: str | None = None, int8: bool = False, checkpoint: str | None = None,
                 classes: list[str] | None = None, tracking_uri: str | None = None,
                 reporter: Reporter | None = None) -> dict:
    """Export run ``run_id``'s detector, log it as a pyfunc MLflow Model and register it as a new
    version of ``name`` (with ``alias`` moved to it)."""
    reporter = reporter or Reporter()
    _check_names(name, alias)
    check_registry_uri(tracking_uri)
    mlflow = connect(tracking_uri, write=True)
    registry_client(mlflow)  # a store without a registry is refused before the export
    run = get_run(mlflow, run_id)
    run_id = run.info.run_id
    stage = run.data.tags.get(Tag.STAGE, "")
    if stage not in TRAINING_STAGES:
        source = run.data.tags.get(Tag.SOURCE_RUN)
        raise ConfigError(f"Run {run_id} is a {stage or 'non-aaclip'} run, not a trained model: register the training "
                          f"run{f' it tested ({source})' if source else ''} with --run.")
    with tempfile.TemporaryDirectory(prefix="aaclip-register-") as tmp:
        exported = export_detector(run_id, Path(tmp) / "export", "onnx", checkpoint, classes, int8, tracking_uri,
                                   reporter)
        model_file = Path(exported["int8"]["model"] if int8 else exported["model"])
        folder = Path(tmp) / served.DETECTOR_ARTIFACT
        folder.mkdir()
        for f in (model_file, sidecar_of(model_file)):
            shutil.copy2(f, folder / f.name)
        info = json.loads(sidecar_of(model_file).read_text(encoding="utf-8"))
        tags = _version_tags(mlflow, info, stage)
        description = _description(info, stage)
        reporter.info(f"logging the detector as an MLflow Model (pyfunc) of run {run_id}")
        logged = log_served_model(mlflow, run, name, Path(served.__file__), {served.DETECTOR_ARTIFACT: str(folder)},
                                  served.signature(), served_requirements(), served.code_paths())
    mv = register_version(mlflow, name, logged.model_uri, run_id, logged.model_id, tags, description, alias)
    notes = []
    if tags[VersionTag.CALIBRATED] == "false":
        notes.append(f"run {run_id} has no calibration, so version {mv.version} scores on the raw scale with no "
                     f"verdicts ({info.get('calibration_note') or 'no test'}); test the run and register it again.")
    return {
        "name": name,
        "version": int(mv.version),
        "model_uri": f"models:/{name}/{mv.version}",
        "alias": alias,
        "alias_uri": f"models:/{name}@{alias}" if alias else None,
        "run_id": run_id,
        "stage": stage,
        "precision": tags[VersionTag.PRECISION],
        "calibrated": tags[VersionTag.CALIBRATED] == "true",
        "tags": tags,
        "description": description,
        "logged_model": logged.model_uri,
        "notes": notes,
    }


def registered_detector(model_uri: str, tracking_uri: str | None, dst: Path) -> tuple[Path, dict]:
    """Download the detector file of the version ``model_uri`` names into ``dst``: (its path, what the
    version is)."""
    ref = parse_model_uri(model_uri)
    check_registry_uri(tracking_uri)
    mlflow = connect(tracking_uri)
    mv = resolve_version(mlflow, ref)
    folder = download_version(mlflow, mv, served.DETECTOR_ARTIFACT, dst)
    files = sorted(folder.glob("*.onnx"))
    if len(files) != 1:
        raise TrackingError(f"{ref.uri} (version {mv.version}) holds no single detector file under "
                            f"artifacts/{served.DETECTOR_ARTIFACT} (found {len(files)}): was it registered with "
                            "`aaclip register`?")
    try:
        read_sidecar(files[0])  # the file's sha256 against the one recorded at export
    except ConfigError:
        raise ConfigError(
            f"The detector of {ref.uri} (version {mv.version} of run {mv.run_id}) does not match its sidecar JSON "
            "(sha256 differs): the stored file was changed or damaged after it was registered. Register the run "
            f"again (`aaclip register --run {mv.run_id} --name {mv.name}`) and use the new version."
        ) from None
    return files[0], {"name": mv.name, "version": int(mv.version), "run_id": mv.run_id, "uri": ref.uri}


def predict_registered(model_uri: str, inputs: list[Path], out_dir: Path | None = None, tracking_uri: str | None = None,
                       **options) -> dict:
    """`aaclip predict --model models:/...`: the registered detector, downloaded, scored by
    :func:`aaclip_core.deploy.predict.predict_with_file` (the path of `--model FILE`)."""
    from aaclip_core.deploy.predict import predict_with_file

    with tempfile.TemporaryDirectory(prefix="aaclip-registered-") as tmp:
        path, mv = registered_detector(model_uri, tracking_uri, Path(tmp))
        out_dir = Path(out_dir) if out_dir is not None else Path(f"aaclip-predict-{mv['name']}-v{mv['version']}")
        result = predict_with_file(path, inputs, out_dir, **options)
    result["model"] = mv["uri"]
    result["registered"] = mv
    return result
