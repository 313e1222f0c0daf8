"""`aaclip export --format onnx|torchscript` and `aaclip predict --model FILE`, end to end on tiny
demo runs: a base run (tested, so calibrated), a cross-attention run from it and a two-loop feedback
run all export; the exported files score the run's test images as `predict --run` does (maps and
scores within 1e-4, same thresholds and verdicts), and the ONNX files pass the ONNX checker."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from clirun import set_flags
from typer.testing import CliRunner

from aaclip_cli.main import app
from aaclip_core.predict import ROW_KEYS
from aaclip_core.recipe import load_recipe, recipe_hash

CLASS = "fabric"
TOL = 1e-4
SMALL = [f'data.train.classes=["{CLASS}"]', f'data.test.classes=["{CLASS}"]', "data.train.shot=8",
         "data.test.shot=8", "stage1.epochs=1", "stage2.epochs=1", "eval.aupro=false"]
FEEDBACK = ["feedback.loops=2", "feedback.text_epochs_per_loop=1", "feedback.image_epochs_per_loop=1",
            "feedback.warmup_epochs=1", "feedback.val_fraction=0.25"]


def _cli(args, expect: int | None = 0):
    result = CliRunner().invoke(app, [str(a) for a in args])
    if expect is not None:
        assert result.exit_code == expect, (result.exit_code, result.output, result.exception)
    return result


def _rows(path: Path) -> dict[str, dict]:
    return {r["path"]: r for r in map(json.loads, Path(path).read_text().splitlines())}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, demo_root, demo_overrides):
    """A tested base run, a cross run from it and a feedback run, in one store."""
    work = tmp_path_factory.mktemp("deploy")
    uri = f"sqlite:///{work / 'mlflow.db'}"
    sets = set_flags(demo_overrides + SMALL)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        base = _cli(["train", "base", "--recipe", "demo", *sets, "--tracking-uri", uri, "-q"]).stdout.strip()
        _cli(["test", "--run", base, "--set", "eval.aupro=false", "--tracking-uri", uri, "-q"])
        cross = _cli(["train", "cross", "--from", base, "--recipe", "cross-demo", *sets, "--tracking-uri", uri,
                      "-q"]).stdout.strip()
        feedback = _cli(["train", "feedback", "--recipe", "feedback-demo", *sets, *set_flags(FEEDBACK),
                         "--tracking-uri", uri, "-q"]).stdout.strip()
        yield {"work": work, "uri": uri, "base": base, "cross": cross, "feedback": feedback,
               "images": demo_root / "test" / CLASS / "test"}


def _export(runs, kind: str, fmt: str, *extra) -> Path:
    out = runs["work"] / f"export-{kind}-{fmt}"
    res = _cli(["export", out, "--run", runs[kind], "--format", fmt, *extra, "--tracking-uri", runs["uri"], "--json"])
    return Path(json.loads(res.stdout)["model"])


def _predict_both(runs, kind: str, model: Path, *extra) -> tuple[dict, dict, dict]:
    by_run = runs["work"] / f"pred-run-{kind}"
    by_file = runs["work"] / f"pred-{model.parent.name}"
    a = _cli(["predict", "--run", runs[kind], runs["images"], "--out", by_run, "--save-maps", *extra,
              "--tracking-uri", runs["uri"], "--json"])
    b = _cli(["predict", "--model", model, runs["images"], "--out", by_file, "--save-maps", *extra, "--json"])
    return json.loads(a.stdout), _rows(by_run / "predictions.jsonl"), _rows(by_file / "predictions.jsonl"), json.loads(b.stdout)


def _assert_same_predictions(run_rows: dict, file_rows: dict) -> None:
    assert run_rows.keys() == file_rows.keys() and len(run_rows) >= 4
    for path, a in run_rows.items():
        b = file_rows[path]
        assert set(b) == set(ROW_KEYS)
        assert a["error"] is None and b["error"] is None
        assert a["class_name"] == b["class_name"] == CLASS
        assert abs(a["image_score"] - b["image_score"]) <= TOL
        assert abs(a["raw_det"] - b["raw_det"]) <= TOL
        assert (a["threshold"], a["threshold_source"]) == (b["threshold"], b["threshold_source"])
        if a["threshold"] is not None and abs(a["image_score"] - a["threshold"]) > TOL:
            assert a["verdict"] == b["verdict"]
        map_a, map_b = np.load(a["map"]), np.load(b["map"])
        assert map_a.shape == map_b.shape and np.abs(map_a - map_b).max() <= TOL
        assert Path(b["overlay"]).is_file()


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_base_run_exports_and_scores_like_predict_run(runs, fmt):
    model = _export(runs, "base", fmt)
    if fmt == "onnx":
        onnx.checker.check_model(str(model), full_check=True)
    side = json.loads(Path(f"{model}.json").read_text())
    recipe = load_recipe("demo")[0]
    assert side["classes"] == [CLASS] and side["image_size"] == recipe.model.image_size
    assert len(side["mean"]) == len(side["std"]) == 3
    assert side["thresholds"][CLASS] == side["calibration"][CLASS]["image_threshold"]
    prov = side["provenance"]
    assert prov["run_id"] == runs["base"] and len(prov["recipe_hash"]) == 64 and prov["aaclip_version"]
    assert prov["recipe_hash"] != recipe_hash(recipe)  # the run's own recipe (its --set values), not the shipped one
    summary_run, run_rows, file_rows, summary_file = _predict_both(runs, "base", model)
    assert summary_run["calibration"] == summary_file["calibration"] is not None
    assert summary_file["threshold"] == "auto"
    _assert_same_predictions(run_rows, file_rows)


@pytest.mark.parametrize("kind", ["cross", "feedback"])
def test_cross_and_feedback_runs_export_with_per_image_anchors(runs, kind):
    model = _export(runs, kind, "onnx")
    onnx.checker.check_model(str(model), full_check=True)
    side = json.loads(Path(f"{model}.json").read_text())
    assert side["provenance"]["cross_attention"] is True
    assert side["calibration"] == {} and side["calibration_note"]  # untested: raw scale, said so
    _, run_rows, file_rows, _ = _predict_both(runs, kind, model, "--threshold", "0.5")
    _assert_same_predictions(run_rows, file_rows)


def test_int8_copy_records_its_measured_metric_change(runs):
    model = _export(runs, "base", "onnx", "--int8")
    q = model.with_name("detector.int8.onnx")
    side = json.loads(Path(f"{q}.json").read_text())
    change = side["quantization"]
    assert side["precision"] == "int8" and change["n_images"] >= 4
    for m in ("pixel_auroc", "image_auroc"):
        assert change["delta_mean"][m] == pytest.approx(change["candidate"]["mean"][m] - change["reference"]["mean"][m])
    res = _cli(["predict", "--model", q, runs["images"], "--out", runs["work"] / "pred-int8", "--json"])
    assert json.loads(res.stdout)["n_errors"] == 0


def test_bad_uses_are_one_paragraph_and_exit_2(runs, tmp_path):
    res = _cli(["predict", "--model", tmp_path / "missing.onnx", runs["images"]], expect=2)
    assert "missing.onnx does not exist" in res.output and "Traceback" not in res.output
    res = _cli(["export", tmp_path / "x", "--run", runs["cross"], "--format", "torchscript", "--int8",
                "--tracking-uri", runs["uri"]], expect=2)
    assert "--int8" in res.output and not (tmp_path / "x").exists()
    model = _export(runs, "base", "onnx")
    res = _cli(["predict", "--model", model, runs["images"], "--class", "carpet", "--out", tmp_path / "o"], expect=2)
    assert "--class carpet" in res.output and "Export the run again" in res.output
