"""A model is a folder: `export --format aaclip` writes one, and `test --model` / `predict --model` use it
with no tracking store, giving the maps and scores of the run it came from. Calibration: one object,
chosen unambiguously (the two-dataset trap is refused, naming both test runs)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from clirun import set_flags
from typer.testing import CliRunner

from aaclip_cli.main import app
from aaclip_core.checkpoints.model_folder import read_model_folder
from aaclip_core.evaluation.calibration import Calibration, ClassCalibration, choose_calibration

CLASS = "fabric"
TINY = [f'data.train.classes=["{CLASS}"]', f'data.test.classes=["{CLASS}"]', "stage1.epochs=1", "stage2.epochs=1",
        "data.train.shot=6", "model.image_size=56", "eval.aupro=false"]


def _cli(args, expect: int | None = 0):
    result = CliRunner().invoke(app, [str(a) for a in args])
    if expect is not None:
        assert result.exit_code == expect, (result.exit_code, result.output, result.exception)
    return result


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def env(tmp_path_factory, demo_root, demo_overrides):
    """A trained run tested twice on images of the same class: on 'MVTec' (the demo test images under
    another name) and on its own training data (--same-dataset); then exported as a model folder."""
    work = tmp_path_factory.mktemp("model-folder")
    uri = f"sqlite:///{work / 'mlflow.db'}"
    other = work / "mvtec"  # a second dataset: 4 images of each folder (good and defect types) of the class
    for folder in sorted((demo_root / "test" / CLASS / "test").iterdir()):
        for img in sorted(folder.glob("*.png"))[:4]:
            (other / CLASS / "test" / folder.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(img, other / CLASS / "test" / folder.name / img.name)
            mask = demo_root / "test" / CLASS / "ground_truth" / folder.name / f"{img.stem}_mask.png"
            if mask.is_file():
                (other / CLASS / "ground_truth" / folder.name).mkdir(parents=True, exist_ok=True)
                shutil.copy(mask, other / CLASS / "ground_truth" / folder.name / mask.name)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        sets = set_flags(demo_overrides + TINY)
        run = _cli(["train", "base", "--recipe", "demo", *sets, "--tracking-uri", uri, "-q"]).stdout.strip()
        common = ["--tracking-uri", uri, "--json", *set_flags(["eval.aupro=false"])]
        mvtec = json.loads(_cli(["test", "--run", run, "--dataset", "MVTec", "--data-root", other,
                                 "--layout", "mvtec", *common]).stdout)
        own = json.loads(_cli(["test", "--run", run, "--dataset", "synthetic", "--data-root",
                               demo_root / "train", "--same-dataset", *common]).stdout)
        folder = work / "model"
        exported = json.loads(_cli(["export", "--run", run, folder, "--format", "aaclip", "--tracking-uri", uri,
                                    "--json"]).stdout)
        yield {"work": work, "uri": uri, "run": run, "mvtec": mvtec, "own": own, "other": other, "folder": folder,
               "exported": exported}


@pytest.fixture
def no_store(env, monkeypatch):
    """No tracking store can be reached: the default store is in a folder that does not exist."""
    monkeypatch.chdir(env["work"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{env['work'] / 'no-such-folder' / 'mlflow.db'}")


def test_the_two_tests_are_flagged_as_they_ran(env):
    assert env["mvtec"]["training_data"] is False and env["own"]["training_data"] is True
    assert env["mvtec"]["dataset"] == "MVTec"


def test_the_exported_folder_describes_the_model(env):
    folder = read_model_folder(env["folder"])
    m = folder.manifest
    assert m.format == "aaclip-model" and folder.source == {"run_id": env["run"], "checkpoint": "final"}
    assert m.modes == {"text_cross": False, "image_cross": False, "context_source": "dpam"}
    assert folder.recipe.model.image_size == 56 and m.fidelity == folder.recipe.fidelity
    assert m.prompt_names["names"]  # the prompt names the model was trained with
    cals = {c.test_run_id: c for c in folder.calibrations}
    assert set(cals) == {env["mvtec"]["run_id"], env["own"]["run_id"]}
    assert cals[env["own"]["run_id"]].training_data and not cals[env["mvtec"]["run_id"]].training_data
    assert cals[env["mvtec"]["run_id"]].classes[CLASS].as_dict() == env["mvtec"]["calibration"][CLASS]
    assert not (env["folder"] / "optimizer.safetensors").exists()


def test_two_dataset_calibration_trap_is_refused_naming_both_test_runs(env, monkeypatch):
    monkeypatch.chdir(env["work"])
    images = env["other"] / CLASS / "test"
    res = _cli(["predict", "--run", env["run"], images, "--threshold", "auto", "--tracking-uri", env["uri"],
                "--out", env["work"] / "trap"], expect=2)
    assert env["mvtec"]["run_id"] in res.output and env["own"]["run_id"] in res.output
    assert "--calibration" in res.output and "Traceback" not in res.output
    assert not (env["work"] / "trap" / "predictions.jsonl").exists()
    # Without --threshold no verdict is silently calibrated by either: raw scores and a note saying why.
    quiet = json.loads(_cli(["predict", "--run", env["run"], images, "--tracking-uri", env["uri"], "--json",
                             "--out", env["work"] / "raw"]).stdout)
    assert quiet["calibration"] is None and quiet["threshold"] is None
    assert env["own"]["run_id"] in quiet["calibration_note"]


def _predict_named(env, *source, out: str) -> list[dict]:
    images = env["other"] / CLASS / "test"
    res = _cli(["predict", *source, images, "--calibration", env["mvtec"]["run_id"], "--threshold", "auto",
                "--save-maps", "--json", "--out", env["work"] / out])
    summary = json.loads(res.stdout)
    assert summary["calibration"]["test_run_id"] == env["mvtec"]["run_id"]
    return summary["rows"]


def test_folder_without_a_store_gives_the_runs_maps_and_scores(env, no_store):
    from_run = _predict_named(env, "--run", env["run"], "--tracking-uri", env["uri"], out="from-run")
    from_folder = _predict_named(env, "--model", env["folder"], out="from-folder")
    assert len(from_run) == len(from_folder) == len(list((env["other"] / CLASS / "test").rglob("*.png"))) > 8
    for a, b in zip(from_run, from_folder):
        assert a["path"] == b["path"] and a["error"] is None and b["error"] is None
        assert a["image_score"] == b["image_score"] and a["raw_det"] == b["raw_det"]
        assert a["threshold"] == b["threshold"] and a["verdict"] == b["verdict"]
        np.testing.assert_array_equal(np.load(a["map"]), np.load(b["map"]))
    # The calibration reproduces the MVTec test's own scores of these images.
    scores = {r["path"]: r["image_score"] for r in from_folder}
    reported = {r["path"]: r["image_score"] for r in _image_scores(env, env["mvtec"]["run_id"])}
    assert scores.keys() == reported.keys()
    for p, s in scores.items():
        assert s == pytest.approx(float(reported[p]), abs=1e-6)
    assert not (env["work"] / "no-such-folder").exists()


def _image_scores(env, test_run_id: str) -> list[dict]:
    import csv

    from aaclip_core.registry.tracking import connect

    mlflow = connect(env["uri"])
    local = mlflow.artifacts.download_artifacts(run_id=test_run_id, artifact_path="results/image_scores.csv",
                                                dst_path=str(env["work"] / "dl" / test_run_id))
    return list(csv.DictReader(open(local)))


def test_test_of_the_folder_without_a_store_matches_and_records_its_calibration(env, no_store, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(env["folder"], folder)
    res = _cli(["test", "--model", folder, "--dataset", "MVTec", "--data-root", env["other"], "--layout", "mvtec",
                "--json", *set_flags(["eval.aupro=false"])])
    report = json.loads(res.stdout)
    assert report["run_id"] is None and report["source_run_id"] == env["run"]
    assert report["mean"] == env["mvtec"]["mean"] and report["calibration"] == env["mvtec"]["calibration"]
    local = [c for c in read_model_folder(folder).calibrations if c.test_run_id is None]
    assert len(local) == 1 and local[0].dataset == "MVTec" and not local[0].training_data


def test_export_refuses_to_replace_a_folder_of_other_files(env, tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    res = _cli(["export", "--run", env["run"], tmp_path, "--format", "aaclip", "--tracking-uri", env["uri"]], expect=2)
    assert "other files" in res.output and (tmp_path / "keep.txt").read_text() == "mine"
    res = _cli(["export", "--run", env["run"], tmp_path / "x", "--format", "onnx-typo", "--tracking-uri", env["uri"]],
               expect=2)
    assert "reference, aaclip" in res.output


# ------------------------------------------------------------------------------------------ the choice rule


def _cal(run_id: str, dataset: str, training_data: bool = False, classes=(CLASS,)) -> Calibration:
    return Calibration(dataset, run_id, "final", training_data,
                       {c: ClassCalibration(0.0, 1.0, 0.0, 1.0, 0.5, 0.9) for c in classes})


def test_choice_takes_the_one_covering_test_and_never_the_training_data_silently():
    mvtec, own = _cal("t-mvtec", "MVTec"), _cal("t-own", "synthetic", training_data=True)
    assert choose_calibration([mvtec], {CLASS}, None).calibration is mvtec
    only_own = choose_calibration([own], {CLASS}, None)
    assert only_own.calibration is None and "training data" in only_own.note and "t-own" in only_own.note
    assert choose_calibration([own], {CLASS}, "t-own").calibration is own  # named: allowed
    both = choose_calibration([mvtec, own], {CLASS}, None)
    assert both.calibration is None and "t-mvtec" in both.note and "t-own" in both.note
    assert choose_calibration([mvtec, own], {CLASS}, "mvtec").calibration is mvtec  # by dataset name
    visa = _cal("t-visa", "VisA", classes=("pcb1",))
    assert choose_calibration([mvtec, visa], {CLASS}, None).calibration is mvtec  # classes tell them apart
    newer = _cal("t-mvtec-2", "MVTec")
    assert choose_calibration([newer, mvtec], {CLASS}, None).calibration is newer  # newest of a dataset
    assert "no test of this model" in choose_calibration([mvtec], {CLASS}, "nope").note
