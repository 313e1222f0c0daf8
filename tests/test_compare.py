"""`aaclip compare`: runs side by side with fairness checked, paired-bootstrap intervals, mean ± std
over seeds, the per-loop plot, and the exactness of the bootstrap's AUROC."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from aaclip_cli.main import app
from aaclip_core.evaluation import bootstrap as bs
from aaclip_core.evaluation import metrics
from aaclip_core.recipe import load_recipe
from aaclip_core.training.schedule import loop_epochs

runner = CliRunner()

# Tiny runs: one training class, a few images, one or two epochs, 56-pixel images.
TINY = [
    'data.train.classes=["disc"]',
    "data.train.shot=4",
    "eval.aupro=false",
    "stage1.epochs=1",
    "stage2.epochs=2",
    "model.image_size=56",
]
FEEDBACK = [
    "data.train.shot=8",
    "feedback.loops=2",
    "feedback.text_epochs_per_loop=1",
    "feedback.image_epochs_per_loop=1",
    "feedback.warmup_epochs=1",
    "feedback.val_fraction=0.25",
]
TEST_CLASSES = ("disc", "fabric")
PER_FOLDER = 3  # images per test folder: 3 good + 3 per defect type


def _small_test_set(src: Path, dst: Path) -> Path:
    """A fixed 24-image MVTec-layout test set (2 classes) cut from the synthetic test data: the same
    images for every run, whatever its seed (a k-shot test subset would differ per seed)."""
    for c in TEST_CLASSES:
        for folder in sorted((src / c / "test").iterdir()):
            for img in sorted(folder.glob("*.png"))[:PER_FOLDER]:
                out = dst / c / "test" / folder.name / img.name
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(img, out)
                mask = src / c / "ground_truth" / folder.name / f"{img.stem}_mask.png"
                if mask.is_file():
                    (dst / c / "ground_truth" / folder.name).mkdir(parents=True, exist_ok=True)
                    shutil.copy(mask, dst / c / "ground_truth" / folder.name / mask.name)
    return dst


@pytest.fixture(scope="module")
def store(demo_root, demo_overrides, tmp_path_factory):
    """Base (seeds 111 and 112), base with fidelity=corrected, cross from the first base and a
    2-loop feedback run, each tested on the same 24 synthetic test images of two classes."""
    from aaclip_core.jobs.base import train_base
    from aaclip_core.jobs.cross import train_cross
    from aaclip_core.jobs.feedback import train_feedback
    from aaclip_core.jobs.test import test_run

    tmp = tmp_path_factory.mktemp("compare")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    test_root = _small_test_set(demo_root / "test", tmp / "test-data")
    # The test set is cut from the synthetic dataset the runs train on (another render, same name), so
    # the recipe declares the same-dataset test for exactly that test data.
    sets = demo_overrides + TINY + [f'data.test.root="{test_root}"', "data.test.layout=mvtec",
                                    "data.allow_same_dataset=true"]

    def base(*extra):
        r, p = load_recipe("demo", sets + list(extra))
        return train_base(r, p, uri)["run_id"]

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)  # MLflow's default artifact folder ./mlruns lands here, not in the repository
        ids = {"base": base(), "base_seed": base("runtime.seed=112"), "corrected": base("fidelity=corrected")}
        r, p = load_recipe("cross-demo", sets)
        ids["cross"] = train_cross(r, p, from_run=ids["base"], tracking_uri=uri)["run_id"]
        r, p = load_recipe("feedback-demo", sets + FEEDBACK)
        fb = train_feedback(r, p, tracking_uri=uri)
        ids["feedback"] = fb["run_id"]
        ids["selected_loop"] = fb["selected_loop"]
        for key in ("base", "base_seed", "corrected", "cross", "feedback"):
            test_run(ids[key], tracking_uri=uri)
    return uri, ids, tmp


def _compare(uri, *args):
    out = runner.invoke(app, ["compare", "--tracking-uri", uri, *args])
    return out


def _by_key(doc, run_id, loop=None):
    rows = [r for r in doc["rows"] if r["run_id"] == run_id and (loop is None or r["loop"] == loop)]
    assert rows, (run_id, loop)
    return rows[0]


def test_side_by_side_with_fairness_bootstrap_and_seeds(store):
    uri, ids, _ = store
    out = _compare(uri, "--json", "--bootstrap", "300")
    assert out.exit_code == 0, out.output
    doc = json.loads(out.stdout)
    assert set(doc) >= {"rows", "reference", "datasets", "comparisons", "differences", "groups", "bootstrap"}
    assert doc["datasets"] == ["synthetic"]

    # Rows: every training run, one row per feedback loop, the base run as the reference.
    base = _by_key(doc, ids["base"])
    assert doc["reference"] == base["key"]
    stages = sorted(r["stage"] for r in doc["rows"])
    assert stages == ["base", "base", "base", "cross", "feedback", "feedback"]
    loops = sorted(r["loop"] for r in doc["rows"] if r["stage"] == "feedback")
    assert loops == [1, 2]
    sel = _by_key(doc, ids["feedback"], ids["selected_loop"])
    assert sel["selected"] and sel["selection"] == "held-out" and sel["tested"]
    other = _by_key(doc, ids["feedback"], 3 - ids["selected_loop"])
    assert other["selection"] == "test-set" and not other["tested"]
    assert other["test_command"] == f"aaclip test --run {ids['feedback']} --loop {other['loop']}"
    assert set(sel["held_out"]) >= {"pixel_auroc", "image_auroc"}
    for r in doc["rows"]:
        for m in r["held_out"].values():
            assert 0.0 <= m <= 1.0  # raw floats, not x100

    # Epochs: stage1 + stage2; feedback summed over loops; cross includes its base run's.
    assert base["epochs"] == 3
    assert _by_key(doc, ids["cross"])["epochs"] == 3 + 3  # its own 1 + 2 on top of the base run's 1 + 2
    assert sel["epochs"] == sum(loop_epochs(1, 0.8, k) + loop_epochs(1, 0.8, k) for k in range(1, sel["loop"] + 1))

    # What differs, and the verdicts against the base run.
    fields = {d["field"]: d for d in doc["differences"]}
    assert fields["fidelity"]["severity"] == "unfair"
    assert fields["seed"]["severity"] == "note"
    assert fields["trainable parameters"]["severity"] == "note"
    comps = {(c["row"], c["dataset"]): c for c in doc["comparisons"]}
    corrected = comps[(_by_key(doc, ids["corrected"])["key"], "synthetic")]
    assert corrected["verdict"] == "UNFAIR" and any("fidelity" in u for u in corrected["unfair"])
    seeded = comps[(_by_key(doc, ids["base_seed"])["key"], "synthetic")]
    assert seeded["fair"] and any("seed" in n for n in seeded["notes"])
    fbc = comps[(sel["key"], "synthetic")]
    assert fbc["fair"], fbc["unfair"]
    assert any("selection differs" in n for n in fbc["notes"])

    # Paired bootstrap: present, on all 24 paired images, containing the point difference,
    # which equals the difference of the logged mean image AUROCs (same images, same classes).
    for c in doc["comparisons"]:
        b = c["bootstrap"]
        assert b is not None and b["resamples"] == 300 and b["n_images"] == 24 and b["n_classes"] == 2
        assert b["ci_low"] <= b["diff"] <= b["ci_high"]
        assert b["diff"] == pytest.approx(c["delta"]["image_auroc"], abs=1e-9)
        assert "CI" in c["statement"] and "image AUROC" in c["statement"]
        # Pixel AUROC: from the exact pixel pair counts, the point difference is the logged one.
        px = c["pixel_ci"]
        assert px["available"], px
        pb = px["bootstrap"]
        assert pb["metric"] == "pixel_auroc" and pb["n_images"] == 24
        assert pb["ci_low"] <= pb["diff"] <= pb["ci_high"]
        assert pb["diff"] == pytest.approx(c["delta"]["pixel_auroc"], abs=1e-9)
        assert "pixel AUROC" in px["statement"]

    # Mean ± std over the two seeds of the base configuration.
    groups = [g for g in doc["groups"] if g["stage"] == "base"]
    assert len(groups) == 1 and groups[0]["seeds"] == [111, 112]
    vals = [_by_key(doc, ids[k])["test"]["synthetic"]["metrics"]["image_auroc"] for k in ("base", "base_seed")]
    stat = groups[0]["test"]["synthetic"]["image_auroc"]
    assert stat["mean"] == pytest.approx(np.mean(vals)) and stat["std"] == pytest.approx(np.std(vals, ddof=1))

    # Stable: the same store gives the same document.
    again = _compare(uri, "--json", "--bootstrap", "300")
    assert again.stdout == out.stdout


def test_table_statements_and_plot(store):
    from PIL import Image

    uri, ids, tmp = store
    png = tmp / "loops.png"
    out = _compare(uri, "--plot", str(png), "--bootstrap", "200", "--metric", "image_auroc")
    assert out.exit_code == 0, out.output
    text = out.output
    assert "Runs compared" in text and "mean ± std" in text
    assert "UNFAIR" in text and "fidelity differs" in text
    assert "95% CI" in text and "paired bootstrap" in text
    assert "pixel AUROC +" in text or "pixel AUROC -" in text  # the pixel-level interval is stated too
    assert f"aaclip test --run {ids['feedback']} --loop" in text  # the untested loop
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 100
    assert not [p for p in tmp.iterdir() if p.name.startswith(".loops.png")]  # no temporary left


def test_reference_selection_and_usage_errors(store):
    uri, ids, _ = store
    out = _compare(uri, ids["base"], ids["cross"], "--reference", ids["cross"][:8], "--json", "--bootstrap", "50")
    assert out.exit_code == 0, out.output
    doc = json.loads(out.stdout)
    assert doc["reference"] == ids["cross"][:8]
    assert [c["row"] for c in doc["comparisons"]] == [ids["base"][:8]]
    assert any("trainable parameters differs" in n for n in doc["comparisons"][0]["notes"])

    for args, needle in (
        (["--metric", "nope"], "--metric"),
        (["--reference", "ffffffff"], "--reference"),
        (["0123456789abcdef"], "0123456789abcdef"),
        (["--experiment", "no-such-experiment"], "no-such-experiment"),
    ):
        bad = _compare(uri, *args)
        assert bad.exit_code == 2, (args, bad.output)
        assert needle in bad.output and "Traceback" not in bad.output


# ------------------------------------------------------------------------------------------ bootstrap


def _scores(values, labels, classes):
    return [bs.ImageScore(f"img{i}.png", c, int(lab), float(v))
            for i, (v, lab, c) in enumerate(zip(values, labels, classes))]


def test_resampled_auroc_is_exactly_the_metric_on_the_resample():
    rng = np.random.default_rng(3)
    pos = np.round(rng.random(9), 1)  # rounded: ties on purpose
    neg = np.round(rng.random(7) - 0.2, 1)
    m = bs.pair_matrix(pos, neg)
    a = rng.multinomial(9, np.full(9, 1 / 9), size=20).astype(float)
    b = rng.multinomial(7, np.full(7, 1 / 7), size=20).astype(float)
    fast = bs.resampled_auroc(m, a, b)
    for k in range(20):
        s = np.r_[np.repeat(pos, a[k].astype(int)), np.repeat(neg, b[k].astype(int))]
        y = np.r_[np.ones(9), np.zeros(7)]
        assert fast[k] == pytest.approx(metrics.auroc(s, y), abs=1e-12)


def test_paired_bootstrap_identical_better_and_unpaired():
    rng = np.random.default_rng(0)
    labels = np.r_[np.ones(20), np.zeros(20), np.ones(15), np.zeros(15)]
    classes = ["a"] * 40 + ["b"] * 30
    noisy = rng.random(70) + 0.3 * labels
    ref = _scores(noisy, labels, classes)
    same = bs.paired_image_auroc(ref, ref, 200)
    assert same.diff == 0 and same.ci_low == 0 and same.ci_high == 0 and bs.verdict(same) == "no significant difference"

    better = _scores(noisy + 2.0 * labels, labels, classes)  # separates perfectly
    res = bs.paired_image_auroc(better, ref, 500)
    assert res.diff > 0 and res.ci_low > 0 and bs.verdict(res) == "better"
    assert res.n_images == 70 and res.n_classes == 2
    assert bs.describe(res, "feedback", "base", "MVTec").startswith("feedback beats base on MVTec")
    assert bs.paired_image_auroc(better, ref, 500).ci_low == res.ci_low  # seeded

    partial = bs.paired_image_auroc(better[:60], ref, 100)
    assert partial.unpaired_images == 10 and partial.n_images == 60


def test_a_test_run_with_other_model_settings_than_its_training_run_is_unfair(store, tmp_path, monkeypatch):
    """Each test run is judged by its own protocol: a test at another image size or fidelity than the run
    was trained with is UNFAIR, although the training runs' tags are identical. (On a copy of the store's
    database, so the other tests keep theirs; the artifacts stay where they are.)"""
    uri, ids, tmp = store
    shutil.copy(tmp / "mlflow.db", tmp_path / "mlflow.db")
    copy = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.chdir(tmp)
    for run, change in ((ids["base_seed"], "model.image_size=48"), (ids["cross"], "fidelity=corrected")):
        res = runner.invoke(app, ["test", "--run", run, "--set", change, "--tracking-uri", copy, "-q"])
        assert res.exit_code == 0, res.output
    out = _compare(copy, "--json", "--bootstrap", "0")
    assert out.exit_code == 0, out.output
    doc = json.loads(out.stdout)
    comps = {c["row"]: c for c in doc["comparisons"]}
    sized = comps[_by_key(doc, ids["base_seed"])["key"]]
    assert sized["verdict"] == "UNFAIR"
    assert any("image size 48" in u and "trained with 56" in u for u in sized["unfair"]), sized["unfair"]
    assert any("protocol model.image_size differs" in u for u in sized["unfair"])
    fid = comps[_by_key(doc, ids["cross"])["key"]]
    assert fid["verdict"] == "UNFAIR" and any("fidelity corrected" in u for u in fid["unfair"]), fid["unfair"]
