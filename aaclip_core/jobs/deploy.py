"""`aaclip export --format onnx|torchscript`: a run's checkpoint as one file from image tensor to
anomaly map and image score (see `aaclip_core.deploy.graph`), with its sidecar JSON, and optionally
its dynamic int8 quantisation with the metric change measured on the run's own test data.

Classes and anchors are those `predict --run` would use: the calibration test run's classes and the
run's training classes (or ``classes`` when given), with the calibration's dataset name for the
prompt names. The calibration is the one `predict --run` would choose among the run's tests at that checkpoint
(:func:`aaclip_core.evaluation.calibration.choose_calibration`: unambiguous, never a test on the training data);
without one the file scores on the raw scale and the sidecar says why.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from aaclip_score.contract import INPUT_NAMES, OUTPUT_NAMES

from aaclip_core.checkpoints.from_run import (
    chosen_calibration,
    default_checkpoint,
    model_from_checkpoint,
    run_checkpoint,
    run_recipe,
    training_classes,
)
from aaclip_core.deploy.export import FORMATS, OPSET, SUFFIX, export_graph, quantize_int8, write_sidecar
from aaclip_core.deploy.graph import DetectorGraph
from aaclip_core.errors import ConfigError
from aaclip_core.model import ModelModes
from aaclip_core.model.backbone import backbone_id
from aaclip_core.pictures.visualize import CLIP_MEAN, CLIP_STD
from aaclip_core.prompts.anchors import AnchorBank
from aaclip_core.prompts.names import scoring_namer
from aaclip_core.recipe import Recipe, recipe_hash
from aaclip_core.registry.tracking import aaclip_version, connect, get_run, git_commit
from aaclip_core.reporter import Reporter

STEM = "detector"


def _check_target(directory: Path, fmt: str, int8: bool) -> None:
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt} is not a graph format; choose one of: {', '.join(FORMATS)}.")
    if int8 and fmt != "onnx":
        raise ConfigError("--int8 quantises the ONNX file with ONNX Runtime: use it with --format onnx.")
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"'{directory}' exists and is not a directory; pass a directory to export into.")


def _classes(mlflow, run_id: str, recipe: Recipe, calibration, workdir: Path, wanted: list[str] | None) -> list[str]:
    known = set(calibration.classes if calibration else {}) | training_classes(mlflow, run_id, recipe, workdir)
    if not wanted:
        if not known:
            raise ConfigError(
                f"Run {run_id} names no classes (no training sample list, no test run): pass the classes to "
                "export with --class NAME (repeatable)."
            )
        return sorted(known)
    return sorted(set(wanted))


def _sidecar(recipe: Recipe, run_id: str, ckpt_name: str, ckpt, calibration, note: str | None, classes: list[str],
             dataset: str, fmt: str, precision: str) -> dict:
    meta = ckpt.info
    tables = calibration.tables() if calibration else {}
    cal = {c: tables[c] for c in classes if c in tables}
    return {
        "format": fmt,
        "precision": precision,
        "inputs": {"image": ["batch", 3, recipe.model.image_size, recipe.model.image_size], "class_index": ["batch"]},
        "outputs": list(OUTPUT_NAMES),
        "input_names": list(INPUT_NAMES),
        "image_size": recipe.model.image_size,
        "resize": "bicubic",
        "mean": list(CLIP_MEAN),
        "std": list(CLIP_STD),
        "classes": classes,
        "prompt_dataset": dataset,
        "domain": recipe.data.domain,
        "batch_size": recipe.eval.batch_size,
        "calibration": cal,
        "thresholds": {c: cal.get(c, {}).get("image_threshold") for c in classes},
        "calibration_source": (
            {"test_run_id": calibration.test_run_id, "dataset": calibration.dataset} if calibration else None
        ),
        "calibration_note": note,
        "provenance": {
            "run_id": run_id,
            "checkpoint": ckpt_name,
            "stage": meta.stage,
            "epoch": meta.epoch,
            "loop": meta.loop,
            "recipe": recipe.name,
            "recipe_hash": recipe_hash(recipe),
            "backbone": backbone_id(recipe),
            "fidelity": recipe.fidelity,
            "cross_attention": bool(meta.cross_attention),
            "modes": ModelModes.from_manifest(meta).as_dict(),
            "aaclip_version": aaclip_version(),
            "git_commit": git_commit(),
            "torch_version": torch.__version__,
            "onnx_opset": OPSET if fmt == "onnx" else None,
        },
    }


def export_detector(
    run_id: str,
    directory: Path,
    fmt: str = "onnx",
    checkpoint: str | None = None,
    classes: list[str] | None = None,
    int8: bool = False,
    tracking_uri: str | None = None,
    reporter: Reporter | None = None,
) -> dict:
    """Write ``DIR/detector.onnx`` (or ``.pt``) + ``.json``; with ``int8`` also
    ``detector.int8.onnx`` + ``.json``, whose sidecar holds the measured metric change."""
    reporter = reporter or Reporter()
    directory = Path(directory)
    _check_target(directory, fmt, int8)
    mlflow = connect(tracking_uri)
    run_id = get_run(mlflow, run_id).info.run_id  # the full id, when given a prefix
    with tempfile.TemporaryDirectory(prefix="aaclip-export-") as tmp:
        workdir = Path(tmp)
        recipe = run_recipe(mlflow, run_id, workdir)
        ckpt_name = checkpoint or default_checkpoint(mlflow, run_id)
        calibration, note = chosen_calibration(mlflow, run_id, ckpt_name, workdir)
        names = _classes(mlflow, run_id, recipe, calibration, workdir, classes)
        ckpt = run_checkpoint(mlflow, run_id, ckpt_name, workdir)
    # Exported on the CPU: a graph traced on a GPU would carry the device into the file.
    device = torch.device("cpu")
    model = model_from_checkpoint(recipe, ckpt, device)
    dataset = calibration.dataset if calibration else recipe.data.test.name
    bank = AnchorBank(model, names, scoring_namer(recipe, dataset, ckpt.manifest, calibration and calibration.prompt_names))
    graph = DetectorGraph(model, bank, calibration.tables() if calibration else {}, recipe.model.image_size,
                          recipe.data.domain)
    path = directory / f"{STEM}{SUFFIX[fmt]}"
    reporter.info(f"exporting run {run_id} checkpoint '{ckpt_name}' as {fmt} ({len(names)} classes) to {path}")
    try:
        export_graph(graph, path, fmt)
    except OSError as exc:
        raise ConfigError(f"Cannot write into '{directory}': {exc.strerror or exc}.") from None
    info = _sidecar(recipe, run_id, ckpt_name, ckpt, calibration, note, names, dataset, fmt, "fp32")
    files = [path, write_sidecar(path, info)]
    result = {
        "run_id": run_id,
        "checkpoint": ckpt_name,
        "format": fmt,
        "model": str(path.resolve()),
        "classes": names,
        "calibrated": sorted(info["calibration"]),
        "calibration_note": note,
    }
    if int8:
        result["int8"] = _quantize(path, info, recipe, reporter)
        files += [Path(result["int8"]["model"]), Path(result["int8"]["sidecar"])]
    result["files"] = [str(f.resolve()) for f in files]
    return result


def _quantize(path: Path, info: dict, recipe: Recipe, reporter: Reporter) -> dict:
    from aaclip_core.deploy.quality import compare_precisions
    from aaclip_core.deploy.scorer import load_detector
    from aaclip_core.training.data import load_samples

    q_path = path.with_name(f"{STEM}.int8{path.suffix}")
    reporter.info(f"quantising to int8: {q_path}")
    quantize_int8(path, q_path)
    samples = load_samples(recipe.data.test, recipe.runtime.seed, field="data.test")
    reporter.info(f"measuring fp32 vs int8 on the run's test data ({recipe.data.test.name}, {len(samples)} images)")
    change = compare_precisions(load_detector(path), load_detector(q_path, info={**info, "precision": "int8"}), samples, recipe,
                                recipe.eval.batch_size, reporter.eval_progress)
    change["test_dataset"] = recipe.data.test.name
    side = write_sidecar(q_path, {**info, "precision": "int8", "quantization": change})
    return {"model": str(q_path.resolve()), "sidecar": str(side.resolve()), "change": change}
