"""doctor on what a run trained with: gradient norms far above the healthy band, and a validation
split too small to select a loop on (hand-made MLflow runs, no training)."""

from __future__ import annotations

import json

import mlflow
from typer.testing import CliRunner

from aaclip_cli.main import app

runner = CliRunner()


def _run(client, exp: str, stage: str, metrics: dict[str, list[float]], params: dict, tags: dict | None = None) -> str:
    run = client.create_run(exp, tags={"aaclip.stage": stage, "aaclip.fidelity": "official",
                                       "aaclip.quick_gelu": "false", **(tags or {})})
    rid = run.info.run_id
    for k, v in params.items():
        client.log_param(rid, k, v)
    for key, values in metrics.items():
        for step, value in enumerate(values, start=1):
            client.log_metric(rid, key, value, step=step)
    client.set_terminated(rid, "FINISHED")
    return rid


def _report(uri: str, run_id: str) -> dict:
    out = runner.invoke(app, ["doctor", run_id, "--json", "--tracking-uri", uri])
    assert out.exit_code in (0, 1), out.output
    return json.loads(out.stdout)


def _checks(uri: str, run_id: str) -> dict[str, dict]:
    return {c["name"]: c for c in _report(uri, run_id)["checks"]}


def test_gradient_norms_far_above_the_band_warn_and_say_what_training_does_with_them(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("doctor-data")
    norms = {"stage2/grad_norm/image_adapters": [30.0, 12.0, 9.0],  # 200x the band's top
             "stage2/grad_norm/projections": [0.4, 0.3, 0.2],  # above, within 10x
             "stage2/grad_norm/text_adapters": [0.1, 0.1, 0.1],  # in the band
             "stage2/loss": [3.0, 2.0, 1.0]}
    base = _run(client, exp, "base", norms, {"model.name": "ViT-L-14-336"})
    report = _report(uri, base)
    checks = {c["name"]: c for c in report["checks"]}
    far = checks["gradient norm stage2/image_adapters"]
    assert far["status"] == "warn" and far["value"] == 30.0 and "200x its top" in far["detail"] and far["fix"]
    near = checks["gradient norm stage2/projections"]
    assert near["status"] == "pass" and "above the band" in near["detail"]
    # What training does with large norms is said once, in a note naming the checks it covers.
    [note] = report["notes"]
    assert note["covers"] == ["gradient norm stage2/image_adapters", "gradient norm stage2/projections"]
    assert "do not clip" in note["text"] and "only vanishing" not in note["text"]
    assert not any("do not clip" in c["detail"] for c in report["checks"])
    # On another backbone the band does not apply, and the note says so instead of passing silently.
    tiny = _report(uri, _run(client, exp, "base", norms, {"model.name": "aaclip-tiny"}))
    other = {c["name"]: c for c in tiny["checks"]}["gradient norm stage2/image_adapters"]
    assert other["status"] == "pass" and "200x its top" in other["detail"]
    [note] = tiny["notes"]
    assert "not this run's backbone (aaclip-tiny)" in note["text"] and "only vanishing and dead" in note["text"]
    assert not any("only vanishing" in c["detail"] for c in tiny["checks"])


def test_feedback_run_with_a_small_validation_split_warns(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("doctor-data")
    params = {"feedback.selection_metric": "pixel_auroc", "feedback.grad_clip": "1.0", "feedback.min_val_images": "30"}
    metrics = {"val/pixel_auroc": [0.8, 0.9]}
    small = _run(client, exp, "feedback", metrics, {**params, "val_images": "6"},
                 {"aaclip.val_warning": "the validation split has only 6 images (normal+anomalous per class: a 1+1)"})
    _run(client, exp, "feedback-loop", {"stage2/grad_norm/image_adapters": [3.0, 2.0]}, {},
         {"aaclip.loop": "1", "mlflow.parentRunId": small})
    check = _checks(uri, small)["validation split"]
    assert check["status"] == "warn" and check["value"] == 6 and "only 6 images" in check["detail"]
    assert "feedback.val_fraction" in check["fix"]
    [note] = _report(uri, small)["notes"]
    assert note["covers"] == ["gradient norm stage2/image_adapters"] and "feedback.grad_clip = 1.0" in note["text"]
    large = _run(client, exp, "feedback", metrics, {**params, "val_images": "40"})
    assert _checks(uri, large)["validation split"]["status"] == "pass"
