"""Real data without traps: what a run trains and tests on, on datasets in the real MVTec AD and
VisA layouts (not the demo's folders).

Covers: the demo's data settings never leak into real data (same-dataset declaration, the
synthetic layout writing demo data), derived runs inherit their parent's data, and every data error
names the recipe field that fixes it."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
from clirun import set_flags
from real_layouts import listing, write_mvtec, write_visa
from typer.testing import CliRunner

from aaclip_cli.main import app
from aaclip_core.errors import ConfigError, DataError
from aaclip_core.jobs.inherit import inherit_settings
from aaclip_core.jobs.test import same_dataset_declaration, same_dataset_reason
from aaclip_core.recipe import DatasetRef, load_recipe
from aaclip_core.training.data import load_samples

runner = CliRunner()
FAST = ["stage1.epochs=1", "stage2.epochs=1", "data.train.shot=4", "eval.aupro=false", "eval.pixel_pairs=false"]


# ------------------------------------------------------------------------------------------ synthetic-root trap


def test_synthetic_layout_on_real_data_writes_nothing_and_names_the_layout_field(tmp_path):
    data = tmp_path / "datasets"
    mvtec = write_mvtec(data / "mvtec")
    before = listing(tmp_path)
    ref = DatasetRef(name="synthetic", root=str(mvtec), layout="synthetic")
    with pytest.raises(DataError, match=r"data\.train\.layout is 'synthetic'.*nothing was written.*"
                                        r"data\.train\.layout = \"auto\""):
        load_samples(ref, 0)
    # A folder named like a demo half but holding real data is refused too.
    real_train = write_mvtec(data / "train")
    before = listing(tmp_path)
    with pytest.raises(DataError, match="holds data aaclip did not generate"):
        load_samples(ref.model_copy(update={"root": str(real_train)}), 0)
    assert listing(tmp_path) == before


def test_synthetic_layout_writes_only_the_half_it_names(tmp_path):
    samples = load_samples(DatasetRef(name="synthetic", root=str(tmp_path / "demo" / "train"), layout="synthetic"), 0)
    assert samples and sorted(p.name for p in (tmp_path / "demo").iterdir()) == ["train"]


# ------------------------------------------------------------------------------------------ messages


def test_missing_visa_root_says_where_what_and_finds_the_nested_download(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_visa(tmp_path / "data" / "VisA" / "VisA_20220922")
    ref = load_recipe("base")[0].data.train  # root "data/VisA", layout "visa"
    with pytest.raises(DataError) as exc:
        load_samples(ref, 0)
    text = str(exc.value)
    for part in ("data.train.root", "working directory", str(tmp_path), "split_csv/1cls.csv",
                 'data.train.root="data/VisA/VisA_20220922"'):
        assert part in text, (part, text)
    # Unpacked beside the expected name instead of inside it.
    (tmp_path / "data" / "VisA" / "VisA_20220922").rename(tmp_path / "data" / "VisA_20220922")
    (tmp_path / "data" / "VisA").rmdir()
    with pytest.raises(DataError, match=r"does not exist.*Found one at data/VisA_20220922"):
        load_samples(ref, 0)
    # The suggested root works.
    assert load_samples(ref.model_copy(update={"root": "data/VisA_20220922", "shot": 0}), 0)


def test_k_shot_that_cannot_be_drawn_names_data_train_shot(tmp_path):
    root = write_visa(tmp_path / "visa", n_normal=3, n_anomalous=3)
    ref = DatasetRef(name="VisA", root=str(root), layout="visa", shot=8)
    with pytest.raises(DataError, match=r"data\.train\.shot = 8 .*'disc' 3 normal \+ 3 anomalous.*"
                                        r"Set data\.train\.shot to 6 or less"):
        load_samples(ref, 0)
    with pytest.raises(DataError, match=r"data\.test\.shot = 8"):
        load_samples(ref, 0, field="data.test")


# ------------------------------------------------------------------------------------------ same dataset


def test_same_dataset_is_judged_on_the_data_and_declarations_do_not_travel(tmp_path):
    visa = str(write_visa(tmp_path / "visa"))
    demo = load_recipe("demo")[0]
    # The demo's two halves are independent renders: no declaration needed, none shipped.
    assert same_dataset_reason(demo, demo.data.test) is None and not demo.data.allow_same_dataset
    real = demo.model_copy(deep=True)
    real.data.train = DatasetRef(name="VisA", root=visa, layout="auto")
    real.data.test = DatasetRef(name="VisA", root=visa, layout="auto")
    assert "training root" in same_dataset_reason(real, real.data.test)
    elsewhere = DatasetRef(name="visa", root=str(tmp_path / "copy"), layout="auto")
    assert "name 'visa'" in same_dataset_reason(real, elsewhere)
    assert same_dataset_reason(real, DatasetRef(name="MVTec", root=str(tmp_path / "m"))) is None
    assert same_dataset_declaration(real, real.data.test, flag=False) is None
    assert same_dataset_declaration(real, real.data.test, flag=True) == "--same-dataset"
    real.data.allow_same_dataset = True
    assert "data.allow_same_dataset" in same_dataset_declaration(real, real.data.test, flag=False)
    # A recipe's declaration covers the test data it names, not data pointed at elsewhere.
    assert same_dataset_declaration(real, elsewhere, flag=False) is None


@pytest.fixture(scope="module")
def visa_base(tmp_path_factory):
    """A tiny base run trained on a VisA-layout dataset through the demo recipe (its data re-pointed)."""
    work = tmp_path_factory.mktemp("traps")
    visa = write_visa(work / "VisA")
    uri = f"sqlite:///{work / 'mlflow.db'}"
    data = [f'data.train.root="{visa}"', 'data.train.layout="auto"', 'data.train.name="VisA"',
            f'data.test.root="{visa}"', 'data.test.layout="auto"', 'data.test.name="VisA"']
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        out = runner.invoke(app, ["train", "base", "--recipe", "demo", "--json", "--tracking-uri", uri,
                                  *set_flags(data + FAST)])
        assert out.exit_code == 0, out.output
        yield {"work": work, "visa": visa, "uri": uri, "run": json.loads(out.stdout)["run_id"]}


def test_testing_on_the_training_data_needs_a_declaration_and_is_tagged(visa_base, monkeypatch):
    monkeypatch.chdir(visa_base["work"])
    uri, run = visa_base["uri"], visa_base["run"]
    out = runner.invoke(app, ["test", "--run", run, "--tracking-uri", uri])
    assert out.exit_code == 2 and "training root" in out.output and "--same-dataset" in out.output
    assert "Traceback" not in out.output
    out = runner.invoke(app, ["test", "--run", run, "--same-dataset", "--json", "--tracking-uri", uri])
    assert out.exit_code == 0, out.output
    result = json.loads(out.stdout)
    assert result["same_dataset"] and result["same_dataset_declared_by"] == "--same-dataset"
    tags = mlflow.MlflowClient(uri).get_run(result["run_id"]).data.tags
    assert tags["aaclip.same_dataset"] == "true" and tags["aaclip.same_dataset_declared_by"] == "--same-dataset"


# ------------------------------------------------------------------------------------------ --from inheritance


def test_inherit_settings_keeps_what_the_recipe_file_or_set_states(tmp_path):
    parent = load_recipe("demo", ['data.train.root="/data/VisA"', 'data.train.layout="visa"',
                                  'data.train.name="VisA"'])[0]
    child, taken = inherit_settings(load_recipe("cross-demo")[0], parent, "p" * 32)
    assert taken == {"data.train.layout": "visa", "data.train.name": "VisA", "data.train.root": "/data/VisA"}
    assert child.data.train.root == "/data/VisA" and child.model == parent.model
    child, taken = inherit_settings(load_recipe("cross-demo", ['data.train.root="/mine"'])[0], parent, "p" * 32)
    assert child.data.train.root == "/mine" and "data.train.root" not in taken
    assert child.data.train.layout == "visa"


def test_cross_and_feedback_from_a_run_train_on_its_data(visa_base, monkeypatch):
    monkeypatch.chdir(visa_base["work"])
    uri, base, visa = visa_base["uri"], visa_base["run"], str(visa_base["visa"])
    client = mlflow.MlflowClient(uri)
    for cmd in (["train", "cross", "--recipe", "cross-demo"],
                ["train", "feedback", "--recipe", "feedback-demo", "--loops", "1"]):
        sets = ["stage1.epochs=1", "stage2.epochs=1", "feedback.text_epochs_per_loop=1",
                "feedback.image_epochs_per_loop=1"]
        out = runner.invoke(app, [*cmd, "--from", base, "--tracking-uri", uri, *set_flags(sets)])
        assert out.exit_code == 0, out.output
        assert f"inherited from run {base[:8]}" in out.output and "data.train.root" in out.output
        run_id = out.stdout.strip().splitlines()[-1]
        params = client.get_run(run_id).data.params
        assert params["data.train.root"] == visa and params["data.train.name"] == "VisA"
        local = client.download_artifacts(run_id, "data/train.jsonl", str(visa_base["work"] / run_id))
        classes = {json.loads(line)["class_name"] for line in Path(local).read_text().splitlines()}
        assert classes == {"plank", "disc"}  # the VisA-layout classes, not the demo's three
    # The feedback run's validation split is tiny (shot 4): the job warns and records it.
    assert "validation split has only" in out.output and "feedback.val_fraction" in out.output
    assert "validation split has only" in client.get_run(run_id).data.tags["aaclip.val_warning"]


def test_inheriting_from_an_unknown_run_is_a_usage_error(tmp_path, monkeypatch, tracking_uri):
    monkeypatch.chdir(tmp_path)
    out = runner.invoke(app, ["train", "cross", "--from", "f" * 32, "--recipe", "cross-demo",
                              "--tracking-uri", tracking_uri])
    assert out.exit_code == 2 and "Traceback" not in out.output


def test_unknown_layout_errors_stay_config_errors():
    with pytest.raises(ConfigError):
        load_recipe("demo", ['data.train.layout="nope"'])


# ------------------------------------------------------------------------------------------ data index


def test_data_index_summarises_both_splits_per_class_and_defect(tmp_path):
    root = write_mvtec(tmp_path / "mvtec", classes=("fabric", "disc"), n_normal=3, n_anomalous=4, n_train=2)
    out = runner.invoke(app, ["data", "index", str(root), "--json"])
    assert out.exit_code == 0, out.output
    doc = json.loads(out.stdout)
    assert doc["layout"] == "mvtec"
    test, train = doc["splits"]["test"], doc["splits"]["train"]
    assert (test["images"], test["normal"], test["anomalous"]) == (14, 6, 8)
    assert test["classes"]["disc"]["defects"] == {"crack": 1, "scratch": 2, "spot": 1}
    assert test["defect_types"] == ["crack", "scratch", "spot"] and test["problems"] == []
    assert (train["images"], train["anomalous"]) == (4, 0)
    human = runner.invoke(app, ["data", "index", str(root)])
    assert "layout mvtec" in human.output and "train split" in human.output and "total (2 classes)" in human.output
    # A broken file in either split is found and named, exit 2.
    (root / "fabric" / "train" / "good" / "000.png").write_bytes(b"broken")
    out = runner.invoke(app, ["data", "index", str(root)])
    assert out.exit_code == 2 and "train/good/000.png" in out.output


def test_data_index_of_a_visa_layout_reads_its_csv_splits(tmp_path):
    root = write_visa(tmp_path / "visa", n_normal=2, n_anomalous=3, n_train=1)
    doc = json.loads(runner.invoke(app, ["data", "index", str(root), "--json"]).stdout)
    assert doc["layout"] == "visa"
    assert doc["splits"]["test"]["classes"]["plank"] == {"normal": 2, "anomalous": 3, "masks": 3,
                                                         "defects": {"anomaly": 3}}
    assert doc["splits"]["train"]["images"] == 2


# ------------------------------------------------------------------------------------------ predict


def test_predict_reads_the_class_from_every_layout_in_one_call(visa_base, monkeypatch, tmp_path):
    """One call on a VisA-layout folder (two classes), an MVTec-layout folder of a class the run never
    saw, a loose file with --class, and an unreadable image: every class found, the broken one named."""
    monkeypatch.chdir(visa_base["work"])
    inputs = tmp_path / "inputs"
    write_visa(inputs / "visa", n_normal=1, n_anomalous=2, n_train=0, seed=99)
    write_mvtec(inputs / "mvtec", classes=("fabric",), n_normal=1, n_anomalous=1, n_train=0)
    (inputs / "visa" / "plank" / "Data" / "Images" / "Anomaly" / "9999.JPG").write_bytes(b"not a jpeg")
    loose = inputs / "loose.png"
    (inputs / "mvtec" / "fabric" / "test" / "good" / "000.png").rename(loose)
    out = runner.invoke(app, ["predict", "--run", visa_base["run"], str(inputs / "visa"), str(inputs / "mvtec"),
                              str(loose), "--class", "disc", "--threshold", "0.5", "--json",
                              "--out", str(tmp_path / "out"), "--tracking-uri", visa_base["uri"]])
    summary = json.loads(out.stdout)
    rows = {Path(r["path"]).relative_to(inputs).as_posix(): r for r in summary["rows"]}
    masks = [k for k in rows if "/Masks/" in k or "ground_truth" in k]
    assert not masks  # mask folders are not scored
    broken = rows.pop("visa/plank/Data/Images/Anomaly/9999.JPG")
    assert broken["error"] and "9999.JPG" in broken["error"] and out.exit_code != 0
    assert all(r["error"] is None and r["image_score"] is not None for r in rows.values())
    classes = {k: r["class_name"] for k, r in rows.items()}
    assert {c for k, c in classes.items() if k.startswith("visa/plank/")} == {"plank"}
    assert {c for k, c in classes.items() if k.startswith("visa/disc/")} == {"disc"}
    assert {c for k, c in classes.items() if k.startswith("mvtec/")} == {"fabric"}  # a class the run never saw
    assert classes["loose.png"] == "disc"  # --class only where the path says nothing
    assert len(rows) == 2 * 3 + 1 + 1


def test_predict_names_every_unreadable_image_and_scores_the_rest(visa_base, monkeypatch, tmp_path):
    monkeypatch.chdir(visa_base["work"])
    folder = write_visa(tmp_path / "visa", classes=("disc",), n_normal=2, n_anomalous=0, n_train=0, seed=5)
    images = folder / "disc" / "Data" / "Images" / "Normal"
    for i in range(55):  # more broken files than the result table shows rows (50)
        (images / f"broken{i:02d}.JPG").write_bytes(b"not a jpeg")
    out = runner.invoke(app, ["predict", "--run", visa_base["run"], str(folder), "--threshold", "0.5",
                              "--out", str(tmp_path / "out"), "--tracking-uri", visa_base["uri"]])
    assert out.exit_code == 1 and "55 image(s) could not be scored" in out.output
    for i in range(55):
        assert f"broken{i:02d}.JPG" in out.output
    rows = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert sum(r["error"] is None and r["image_score"] is not None for r in rows) == 2
