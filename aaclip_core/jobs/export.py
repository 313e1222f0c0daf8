"""`aaclip export`: a run's checkpoint written out in one of several formats.

``reference`` (the default): the reference ``text_adapter.pth`` / ``image_adapter_N.pth`` files
(:func:`aaclip_core.jobs.transfer.export_run`). ``aaclip``: a model folder that loads with no
tracking store, carrying the calibrations of the run's tests of that checkpoint
(:mod:`aaclip_core.checkpoints.model_folder`). ``onnx`` / ``torchscript``: one scoring graph and its sidecar
(:mod:`aaclip_core.jobs.deploy`). A new format is one more name in
:data:`aaclip_core.names.EXPORT_FORMATS` and one more entry in :data:`EXPORTERS`.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

from aaclip_core.checkpoints.checkpoint import ADAPTERS, MANIFEST
from aaclip_core.checkpoints.from_run import (
    default_checkpoint,
    run_calibrations,
    run_checkpoint,
    run_recipe,
    training_classes,
)
from aaclip_core.checkpoints.model_folder import write_model_folder
from aaclip_core.errors import ConfigError
from aaclip_core.files import sha256_of
from aaclip_core.jobs.deploy import export_detector
from aaclip_core.jobs.transfer import export_run
from aaclip_core.names import EXPORT_FORMATS
from aaclip_core.registry.tracking import connect, get_run
from aaclip_core.reporter import Reporter

DEFAULT_FORMAT = "reference"


def export_model_folder(run_id: str, directory: Path, checkpoint: str | None = None, tracking_uri: str | None = None,
                        reporter: Reporter | None = None) -> dict:
    """Write a run's checkpoint as a model folder with the calibrations of its finished tests."""
    reporter = reporter or Reporter()
    mlflow = connect(tracking_uri)
    get_run(mlflow, run_id)
    name = checkpoint or default_checkpoint(mlflow, run_id)
    with tempfile.TemporaryDirectory(prefix="aaclip-export-") as tmp:
        ckpt = run_checkpoint(mlflow, run_id, name, Path(tmp))
        calibrations, note = run_calibrations(mlflow, run_id, name, Path(tmp))
        recipe = run_recipe(mlflow, run_id, Path(tmp))
        classes = training_classes(mlflow, run_id, recipe, Path(tmp))
    reporter.info(f"exporting run {run_id} checkpoint '{name}' (stage {ckpt.info.stage}) as a model folder "
                  f"to {directory}")
    written = write_model_folder(Path(directory), ckpt, {"run_id": run_id, "checkpoint": name}, calibrations, classes)
    notes = ["Load it with `aaclip test --model DIR` or `aaclip predict --model DIR`; no tracking store is needed."]
    if note:
        notes.append(f"No calibration: {note}. `aaclip test --model DIR ...` records one in the folder.")
    return {
        "format": "aaclip",
        "run_id": run_id,
        "checkpoint": name,
        "stage": ckpt.info.stage,
        "directory": str(written.resolve()),
        "files": [{"path": str((written / f).resolve()), "sha256": sha256_of(written / f)} for f in (ADAPTERS, MANIFEST)],
        "calibrations": [c.label for c in calibrations],
        "backbone": ckpt.info.backbone,
        "fidelity": ckpt.info.fidelity,
        "notes": notes,
    }


def _graph(fmt: str) -> Callable[..., dict]:
    def export_graph_file(run_id, directory, checkpoint=None, tracking_uri=None, reporter=None, classes=None,
                          int8=False) -> dict:
        return export_detector(run_id, directory, fmt, checkpoint, classes, int8, tracking_uri, reporter)

    return export_graph_file


# Formats whose exporter takes the graph options (--class, --int8).
GRAPH_FORMATS = ("onnx", "torchscript")
# format name (aaclip_core.names.EXPORT_FORMATS) -> exporter(run_id, directory, checkpoint,
# tracking_uri, reporter, **options) -> result dict
EXPORTERS: dict[str, Callable[..., dict]] = {
    "reference": export_run,
    "aaclip": export_model_folder,
    **{fmt: _graph(fmt) for fmt in GRAPH_FORMATS},
}
assert tuple(EXPORTERS) == EXPORT_FORMATS, "one exporter per name in aaclip_core.names.EXPORT_FORMATS"


def export(fmt: str, run_id: str, directory: Path, checkpoint: str | None = None, tracking_uri: str | None = None,
           reporter: Reporter | None = None, **options) -> dict:
    """Export with the format's exporter; ``options`` are a graph format's (classes, int8)."""
    if fmt not in EXPORTERS:
        raise ConfigError(f"--format {fmt!r} is not an export format; choose one of {', '.join(EXPORTERS)}.")
    result = EXPORTERS[fmt](run_id, directory, checkpoint, tracking_uri, reporter, **options)
    result.setdefault("format", fmt)
    return result
