"""`aaclip predict` and anomaly-map pictures (`test --visualize`), end to end on one tiny demo run.

One run is trained per module (one class, stage 1 x1 and stage 2 x2 epochs) and tested once with
`--visualize 2`; every test drives the CLI in-process."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from clirun import set_flags
from PIL import Image
from typer.testing import CliRunner

from aaclip_cli.main import app
from aaclip_core.evaluation import metrics
from aaclip_core.predict import ROW_KEYS, run_calibrations
from aaclip_core.registry.tracking import connect

CLASS = "fabric"
CLASS_SETS = [f'data.train.classes=["{CLASS}"]', f'data.test.classes=["{CLASS}"]']


def _cli(args: list[str], expect: int | None = 0):
    result = CliRunner().invoke(app, [str(a) for a in args])
    if expect is not None:
        assert result.exit_code == expect, (result.exit_code, result.output, result.exception)
    return result


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def env(tmp_path_factory, demo_root, demo_overrides):
    """Working dir, store (same form as the `tracking_uri` fixture, module-scoped) and a trained run."""
    work = tmp_path_factory.mktemp("predict")
    uri = f"sqlite:///{work / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        sets = set_flags(demo_overrides + CLASS_SETS + ["stage1.epochs=1", "stage2.epochs=2"])
        run_id = _cli(["train", "base", "--recipe", "demo", *sets, "--tracking-uri", uri, "-q"]).stdout.strip()
        yield {"work": work, "uri": uri, "run": run_id, "test_root": demo_root / "test" / CLASS}


@pytest.fixture(scope="module")
def uncalibrated(env):
    """Predictions before any test run: a folder with good images, a defect, an unreadable file, and an
    image in a folder that names no class; scored with batch sizes 1 and 4."""
    src = env["test_root"] / "test"
    folder = env["work"] / "inputs" / CLASS
    folder.mkdir(parents=True)
    for p in sorted((src / "good").glob("*.png"))[:3] + sorted(next(d for d in src.iterdir() if d.name != "good").glob("*.png"))[:2]:
        shutil.copy(p, folder / f"{p.parent.name}_{p.name}")
    (folder / "broken.png").write_bytes(b"not a png at all")
    stray = env["work"] / "inputs" / "misc"
    stray.mkdir()
    shutil.copy(sorted((src / "good").glob("*.png"))[0], stray / "lost.png")
    # Before any test run (the `tested` fixture depends on this one, so the order is fixed).
    out = {"auto": _cli(["predict", "--run", env["run"], folder, "--threshold", "auto", "--tracking-uri", env["uri"]],
                        expect=None)}
    for bs in (1, 4):
        res = _cli(["predict", "--run", env["run"], folder, stray / "lost.png", "--out", env["work"] / f"bs{bs}",
                    "--batch-size", bs, "--threshold", "0.0", "--save-maps", "--tracking-uri", env["uri"]], expect=None)
        out[bs] = (res, _rows(env["work"] / f"bs{bs}" / "predictions.jsonl"))
    return out


@pytest.fixture(scope="module")
def tested(env, uncalibrated):
    """A test run with --visualize 2, then calibrated predictions on the class's test images."""
    res = _cli(["test", "--run", env["run"], *set_flags(["eval.aupro=false"]), "--visualize", 2,
                "--tracking-uri", env["uri"], "--json"])
    report = json.loads(res.stdout)
    out = env["work"] / "calibrated"
    res = _cli(["predict", "--run", env["run"], env["test_root"] / "test", "--out", out, "--save-maps",
                "--tracking-uri", env["uri"], "--json"])
    return {"report": report, "summary": json.loads(res.stdout), "rows": _rows(out / "predictions.jsonl")}


# ------------------------------------------------------------------------------------------ before any test run


def test_auto_threshold_needs_a_test_run(env, uncalibrated):
    res = uncalibrated["auto"]
    assert res.exit_code == 2, res.output
    assert "no finished test run" in res.output and f"aaclip test --run {env['run']}" in res.output


def test_bad_threshold_is_a_usage_error(env):
    res = _cli(["predict", "--run", env["run"], env["test_root"], "--threshold", "high",
                "--tracking-uri", env["uri"]], expect=2)
    assert "--threshold" in res.output


def test_unreadable_file_gets_an_error_row_and_exit_1(uncalibrated):
    res, rows = uncalibrated[4]
    assert res.exit_code == 1
    assert all(set(r) == set(ROW_KEYS) for r in rows)
    by_name = {Path(r["path"]).name: r for r in rows}
    assert len(rows) == 7
    broken, lost = by_name["broken.png"], by_name["lost.png"]
    assert "cannot be read" in broken["error"] and broken["image_score"] is None and broken["overlay"] is None
    assert "--class" in lost["error"] and lost["class_name"] is None
    scored = [r for r in rows if r["error"] is None]
    assert len(scored) == 5
    for r in scored:
        assert r["class_name"] == CLASS and np.isfinite(r["image_score"])
        assert r["threshold"] == 0.0 and r["threshold_source"] == "user"
        assert r["verdict"] == ("anomalous" if r["image_score"] >= 0 else "normal")
        assert Path(r["overlay"]).is_file() and Path(r["map"]).is_file()


def test_uncalibrated_scores_are_raw(uncalibrated):
    _, rows = uncalibrated[1]
    for r in (r for r in rows if r["error"] is None):  # industrial: 0.5 * max(raw map) + 0.5 * raw det
        assert r["image_score"] == pytest.approx(0.5 * r["raw_map_max"] + 0.5 * r["raw_det"], abs=1e-5)


def test_batch_size_does_not_change_results(uncalibrated):
    (_, rows1), (_, rows4) = uncalibrated[1], uncalibrated[4]
    strip = ("overlay", "map")
    assert [{k: v for k, v in r.items() if k not in strip} for r in rows1] == [
        {k: v for k, v in r.items() if k not in strip} for r in rows4
    ]
    for a, b in zip(rows1, rows4):
        if a["map"]:
            assert np.array_equal(np.load(a["map"]), np.load(b["map"]))
            assert np.array_equal(np.asarray(Image.open(a["overlay"])), np.asarray(Image.open(b["overlay"])))


# ------------------------------------------------------------------------------------------ after `test`


def test_visualize_logs_pictures(env, tested):
    report = tested["report"]
    vis = report["visualizations"]
    assert len(vis) == 4 and all(p.startswith(f"visualizations/{CLASS}/") and p.endswith(".png") for p in vis)
    mlflow = connect(env["uri"])
    logged = {a.path for a in mlflow.MlflowClient().list_artifacts(report["run_id"], f"visualizations/{CLASS}")}
    assert logged == set(vis)
    assert sum("best-anomalous" in p for p in vis) == 2 and sum("worst-normal" in p for p in vis) == 2


def test_calibrated_predictions_match_test(env, tested):
    rows, summary, report = tested["rows"], tested["summary"], tested["report"]
    assert summary["calibration"]["test_run_id"] == report["run_id"]
    assert summary["n_errors"] == 0 and len(rows) == summary["n_images"] > 20
    source = f"auto: F1-max on synthetic test run {report['run_id']}"
    threshold = report["calibration"][CLASS]["image_threshold"]
    for r in rows:
        assert list(r) == list(ROW_KEYS)
        assert r["threshold_source"] == source and r["threshold"] == pytest.approx(threshold)
        assert r["verdict"] == ("anomalous" if r["image_score"] >= threshold else "normal")
    # Predicting the test images reproduces the scores the test run reported.
    mlflow = connect(env["uri"])
    local = mlflow.artifacts.download_artifacts(run_id=report["run_id"], artifact_path="results/image_scores.csv",
                                                dst_path=str(env["work"] / "dl"))
    reported = {row["path"]: float(row["image_score"]) for row in csv.DictReader(open(local))}
    for r in rows:
        assert r["image_score"] == pytest.approx(reported[r["path"]], abs=1e-6)


def test_anomalous_images_score_higher(tested):
    rows = tested["rows"]
    labels = torch.tensor([0 if Path(r["path"]).parent.name == "good" else 1 for r in rows])
    scores = torch.tensor([r["image_score"] for r in rows])
    assert 0 < labels.sum() < len(labels)
    assert scores[labels == 1].mean() > scores[labels == 0].mean()
    assert metrics.auroc(scores, labels) > 0.7  # 0.91 for this run


def test_overlays_have_the_titled_panel_layout(env, demo_recipe, tested):
    from aaclip_score.overlay import overlay_layout

    layout = overlay_layout(demo_recipe.model.image_size, with_ground_truth=False)  # predict has no masks
    assert list(layout.panels) == ["image", "anomaly map", "prediction"]
    for r in tested["rows"][:5]:
        with Image.open(r["overlay"]) as im:
            assert im.format == "PNG" and im.size == layout.size and im.mode == "RGB"


def test_saved_maps_equal_collect_maps(env, demo_recipe, tested):
    from aaclip_core.compute import seed_everything
    from aaclip_core.evaluation.protocol import collect_maps
    from aaclip_core.jobs import common
    from aaclip_core.prompts.anchors import AnchorBank
    from aaclip_core.prompts.names import checkpoint_namer
    from aaclip_core.training.data import load_samples, make_dataset, make_loader

    mlflow = connect(env["uri"])
    work = env["work"] / "cm"
    recipe = common.run_recipe(mlflow, env["run"], work)
    seed_everything(recipe.runtime.seed)  # the demo backbone is random: built as every job builds it
    ckpt = common.run_checkpoint(mlflow, env["run"], "final", work)
    model = common.model_from_checkpoint(recipe, ckpt, "cpu")
    samples = load_samples(recipe.data.test.model_copy(update={"classes": [CLASS]}), 0)
    picked = [s for s in samples if s.label == 1][:3] + [s for s in samples if s.label == 0][:3]
    bank = AnchorBank(model, [s.class_name for s in samples], checkpoint_namer(recipe, recipe.data.test, ckpt.manifest))
    loader = make_loader(make_dataset(picked, recipe, "none"), 4, False, recipe, None)
    cm = collect_maps(model, bank, loader, recipe, torch.device("cpu"))[CLASS]
    by_path = {r["path"]: r for r in tested["rows"]}
    for j, idx in enumerate(cm.indices):
        saved = np.load(by_path[str(picked[idx].image_path)]["map"])
        assert saved.dtype == np.float32 and saved.shape == (recipe.model.image_size,) * 2
        np.testing.assert_allclose(saved, cm.maps[j].numpy(), atol=1e-5, rtol=0)
        assert by_path[str(picked[idx].image_path)]["raw_det"] == pytest.approx(float(cm.det[j]), abs=1e-6)


def test_calibrations_of_a_checkpoint_are_its_finished_test_runs(env, tested):
    mlflow = connect(env["uri"])
    cals, note = run_calibrations(mlflow, env["run"], "final", env["work"] / "cal")
    assert note is None and cals[0].test_run_id == tested["report"]["run_id"] and CLASS in cals[0].classes
    assert cals[0].dataset == "synthetic" and cals[0].training_data is False  # demo: independent renders
    none, note = run_calibrations(mlflow, env["run"], "stage1", env["work"] / "cal2")
    assert none == [] and "stage1" in note


def test_class_option_overrides_folder_names(env, uncalibrated):
    lost = env["work"] / "inputs" / "misc" / "lost.png"
    res = _cli(["predict", "--run", env["run"], lost, "--class", CLASS, "--out", env["work"] / "forced",
                "--checkpoint", "stage1", "--tracking-uri", env["uri"], "--json"])  # stage1 is never tested
    summary = json.loads(res.stdout)
    assert summary["calibration"] is None and "stage1" in summary["calibration_note"]
    (row,) = summary["rows"]
    assert row["class_name"] == CLASS and row["error"] is None and row["verdict"] is None  # no threshold
    assert row["threshold_source"] == "none" and row["map"] is None
