"""`aaclip doctor`: each SPEC §10 check catches the problem it is for (recipes and runs built to fail
it), a healthy cross-attention run passes `--probe`, exit codes and the JSON document are stable."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from aaclip_cli.main import app
from aaclip_core.recipe import load_recipe

runner = CliRunner()

# Tiny runs: one class, 4 images, 56-pixel images; stage 1 skipped where it is not under test.
TINY = [
    'data.train.classes=["disc"]',
    "data.train.shot=4",
    "eval.aupro=false",
    "model.image_size=56",
    "stage1.epochs=1",
    "stage2.epochs=2",
]
CHECK_KEYS = {"name", "status", "value", "detail", "fix"}


def _doctor(*args, uri: str | None = None):
    extra = ["--tracking-uri", uri] if uri else []
    return runner.invoke(app, ["doctor", *args, "--json", *extra])


def _checks(out) -> dict[str, dict]:
    doc = json.loads(out.stdout)
    assert set(doc) == {"run_id", "checks", "summary", "notes"}
    for note in doc["notes"]:  # a caveat said once, naming the checks it covers
        assert note["text"] and set(note["covers"]) <= {c["name"] for c in doc["checks"]}
    for c in doc["checks"]:
        assert set(c) == CHECK_KEYS and c["status"] in ("pass", "warn", "fail", "skip")
    assert sum(doc["summary"].values()) == len(doc["checks"])
    return {c["name"]: c for c in doc["checks"]}


# ------------------------------------------------------------------------------------------ static


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default store ./mlflow.db must not land in the repository
    return tmp_path


@pytest.mark.parametrize(
    ("sets", "check", "status", "needle"),
    [
        (["cross.image_weight=1.0"], "cross.image_weight", "fail", ">= 0.5"),
        (["cross.text_weight=0.7"], "cross.text_weight", "fail", ">= 0.5"),
        (["cross.image_weight=0.3"], "cross.image_weight", "warn", "outside [0.05, 0.2]"),
        (["fidelity=corrected", "model.pretrained=openai", "model.quick_gelu=false"],
         "activation (QuickGELU vs fidelity vs weights)", "fail", "must use QuickGELU"),
        (["fidelity=official", "model.quick_gelu=true"],
         "activation (QuickGELU vs fidelity vs weights)", "fail", "plain GELU"),
        (["model.pretrained=/nonexistent.safetensors"], "backbone weights", "fail", "no such file"),
        (['data.train.root="/nonexistent/visa"'], "data.train", "fail", "does not exist"),
        (["runtime.precision=fp16", "runtime.device=cpu"], "device / precision", "fail", "fp16 needs a GPU"),
    ],
)
def test_static_checks_catch_bad_recipes(in_tmp, sets, check, status, needle):
    args = ["--recipe", "base"] + [x for s in sets for x in ("--set", s)]
    out = _doctor(*args)
    assert out.exit_code in (0, 1), out.output  # the base recipe's data paths do not exist here: 1 anyway
    checks = _checks(out)
    assert checks[check]["status"] == status, checks[check]
    assert needle in checks[check]["detail"]
    assert checks[check]["fix"]
    if status == "fail":
        assert out.exit_code == 1


def test_static_official_recipe_names_the_gelu_quirk_and_offline_weights(in_tmp, demo_overrides):
    checks = _checks(_doctor("--recipe", "base"))
    act = checks["activation (QuickGELU vs fidelity vs weights)"]
    assert act["status"] == "pass" and "GELU" in act["detail"] and "quick_gelu" in act["detail"]
    # The 'openai' tag: never downloaded here; either found in the cache or flagged as needing the network.
    weights = checks["backbone weights"]
    assert weights["status"] in ("pass", "warn")
    if weights["status"] == "warn":
        assert "network" in weights["detail"]
    assert checks["tracking store"]["status"] == "pass"
    assert not (in_tmp / "mlflow.db").exists()  # checking the store does not create it

    demo = _doctor("--recipe", "demo", *[x for s in demo_overrides for x in ("--set", s)])
    assert demo.exit_code == 0, demo.output
    assert _checks(demo)["data.train"]["status"] == "pass"


def test_usage_errors_exit_2(in_tmp, tracking_uri):
    probe = runner.invoke(app, ["doctor", "--probe"])
    assert probe.exit_code == 2 and "RUN_ID" in probe.output
    missing = runner.invoke(app, ["doctor", "0123456789abcdef", "--tracking-uri", tracking_uri])
    assert missing.exit_code == 2 and "0123456789abcdef" in missing.output and "Traceback" not in missing.output
    bad = runner.invoke(app, ["doctor", "--recipe", "no-such-recipe"])
    assert bad.exit_code == 2


# ------------------------------------------------------------------------------------------ runs


def _hand_made(client, exp_id: str, stage: str, metrics: dict[str, list[float]], params: dict | None = None,
               tags: dict | None = None, first_step: int = 1) -> str:
    """An MLflow run with aaclip's tags and the given per-step metric histories (no training)."""
    run = client.create_run(exp_id, tags={"aaclip.stage": stage, "aaclip.fidelity": "official",
                                          "aaclip.quick_gelu": "false", **(tags or {})})
    rid = run.info.run_id
    for k, v in (params or {}).items():
        client.log_param(rid, k, v)
    for key, values in metrics.items():
        for step, value in enumerate(values, start=first_step):
            client.log_metric(rid, key, value, step=step)
    client.set_terminated(rid, "FINISHED")
    return rid


@pytest.fixture(scope="module")
def store(demo_overrides, tmp_path_factory):
    """A tiny base run, cross runs from it at image weight 0.1 and 1.0, and hand-made runs."""
    import mlflow

    from aaclip_core.jobs.base import train_base
    from aaclip_core.jobs.cross import train_cross

    tmp = tmp_path_factory.mktemp("doctor")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)  # MLflow's default artifact folder ./mlruns lands here, not in the repository
        sets = demo_overrides + TINY
        r, p = load_recipe("demo", sets)
        ids = {"base": train_base(r, p, uri)["run_id"]}
        for key, w in (("healthy", 0.1), ("heavy", 1.0)):
            r, p = load_recipe("cross-demo", sets + [f"cross.image_weight={w}", "stage1.epochs=0", "stage2.epochs=2"])
            ids[key] = train_cross(r, p, from_run=ids["base"], tracking_uri=uri)["run_id"]

        client = mlflow.MlflowClient(uri)
        exp = client.create_experiment("doctor-hand-made")
        cross = {"cross.image_weight": "0.1", "cross.text_weight": "0.1", "model.pretrained": "none"}
        ids["vanishing"] = _hand_made(client, exp, "cross", {
            "stage2/grad_norm/image_adapters": [0.09, 0.004, 0.003],  # vanishing
            "stage2/grad_norm/image_cross_attn": [0.05, 0.0004, 0.0002],  # dead
            "stage2/grad_norm/projections": [0.12, 0.10, 0.08],  # healthy
            "stage2/loss": [3.0, 2.5, 2.0],
        }, cross)
        ids["flat"] = _hand_made(client, exp, "cross", {"stage2/loss": [3.16, 3.16, 3.17]}, cross)
        ids["nearly_flat"] = _hand_made(client, exp, "base", {"stage2/loss": [3.16, 3.15, 3.13]})
        ids["worse_loops"] = _hand_made(client, exp, "feedback", {"val/pixel_auroc": [0.80, 0.70, 0.75]},
                                        {**cross, "feedback.selection_metric": "pixel_auroc"})
        ids["mixed_loops"] = _hand_made(client, exp, "feedback", {"val/pixel_auroc": [0.80, 0.70, 0.90]},
                                        {**cross, "feedback.selection_metric": "pixel_auroc"})
        ids["bad_gelu"] = _hand_made(client, exp, "base", {"stage2/loss": [2.0, 1.0]},
                                     {"model.pretrained": "openai"},
                                     tags={"aaclip.fidelity": "corrected", "aaclip.quick_gelu": "false"})
    return uri, ids


def test_healthy_cross_run_passes_the_probe(store):
    uri, ids = store
    out = _doctor(ids["healthy"], "--probe", uri=uri)
    assert out.exit_code == 0, out.output
    checks = _checks(out)
    assert not [c for c in checks.values() if c["status"] == "fail"]
    ratio = checks["probe: gradient-dilution ratio"]
    assert ratio["status"] == "pass" and ratio["value"] >= 0.8
    share = checks["probe: cross-attention gradient share"]
    assert share["status"] == "pass" and share["value"] <= 0.5
    assert checks["run cross.image_weight"]["value"] == pytest.approx(0.1)
    assert checks["logged cross/image_weight"]["status"] == "pass"
    assert checks["stage-2 loss trend"]["status"] in ("pass", "warn")
    assert checks["gradient norm stage2/image_adapters"]["status"] == "pass"
    assert "gradient norm stage1/text_adapters" not in checks  # stage 1 did not train: skipped
    assert checks["data.train"]["status"] == "pass" and checks["backbone weights"]["status"] == "pass"


def test_weight_10_cross_run_fails_weight_and_probe(store):
    uri, ids = store
    out = _doctor(ids["heavy"], "--probe", uri=uri)
    assert out.exit_code == 1, out.output
    checks = _checks(out)
    assert checks["run cross.image_weight"]["status"] == "fail"
    assert checks["logged cross/image_weight"]["status"] == "fail"
    share = checks["probe: cross-attention gradient share"]
    assert share["status"] == "fail" and share["value"] > 0.5, share
    assert "image_cross_attn_weight 1" in share["detail"]


def test_base_run_probe_is_skipped_with_a_note(store):
    uri, ids = store
    out = _doctor(ids["base"], "--probe", uri=uri)
    assert out.exit_code == 0, out.output
    checks = _checks(out)
    assert checks["probe: gradient-dilution ratio"]["status"] == "skip"
    assert "no cross-attention" in checks["probe: gradient-dilution ratio"]["detail"]


def test_vanishing_and_dead_gradients(store):
    uri, ids = store
    out = _doctor(ids["vanishing"], uri=uri)
    assert out.exit_code == 1
    checks = _checks(out)
    adapters = checks["gradient norm stage2/image_adapters"]
    assert adapters["status"] == "warn" and "vanishing" in adapters["detail"] and adapters["value"] == 0.003
    dead = checks["gradient norm stage2/image_cross_attn"]
    assert dead["status"] == "fail" and "dead" in dead["detail"] and dead["fix"]
    assert checks["gradient norm stage2/projections"]["status"] == "pass"
    assert checks["run recipe"]["status"] == "skip"  # hand-made: no recipe.json


def test_flat_and_nearly_flat_stage2_loss(store):
    uri, ids = store
    flat = _doctor(ids["flat"], uri=uri)
    assert flat.exit_code == 1
    c = _checks(flat)["stage-2 loss trend"]
    assert c["status"] == "fail" and "flat" in c["detail"] and "2e-3" in c["fix"]
    nearly = _doctor(ids["nearly_flat"], uri=uri)
    assert nearly.exit_code == 0, nearly.output
    c = _checks(nearly)["stage-2 loss trend"]
    assert c["status"] == "warn" and "nearly flat" in c["detail"]


def test_later_loops_worse_than_loop_1(store):
    uri, ids = store
    worse = _doctor(ids["worse_loops"], uri=uri)
    assert worse.exit_code == 1
    c = _checks(worse)["held-out pixel_auroc per loop"]
    assert c["status"] == "fail" and c["value"] == 0.80 and "no later loop" in c["detail"]
    assert "best loop 1 (80.00)" in c["detail"]
    mixed = _doctor(ids["mixed_loops"], uri=uri)
    assert mixed.exit_code == 0, mixed.output
    c = _checks(mixed)["held-out pixel_auroc per loop"]
    assert c["status"] == "warn" and c["value"] == 0.90 and "2 worse than loop 1" in c["detail"]
    assert "best loop 3 (90.00)" in c["detail"]


def test_run_activation_mismatch_and_text_output(store):
    uri, ids = store
    out = runner.invoke(app, ["doctor", ids["bad_gelu"], "--tracking-uri", uri])
    assert out.exit_code == 1
    assert "FAIL" in out.output and "must use QuickGELU" in out.output and "fix:" in out.output
    assert "pass," in out.output and "fail," in out.output
