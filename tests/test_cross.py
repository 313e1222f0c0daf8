"""Cross-attention: train/test consistency, batch independence, gradient dilution, and the
`train cross` job (parent link, untouched base run, stage-2 loss, `test` on the result)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from aaclip_cli.main import app
from aaclip_core.doctor.diagnostics import gradient_dilution_probe
from aaclip_core.evaluation.protocol import predict_batch
from aaclip_core.prompts.anchors import AnchorBank
from aaclip_core.recipe import load_recipe
from aaclip_core.training import engine

runner = CliRunner()


@pytest.fixture
def cross_recipe(demo_overrides):
    # Dropout off so that training-mode forwards are deterministic and comparable.
    return load_recipe("cross-demo", demo_overrides + ["cross.dropout=0.0"])[0]


@pytest.fixture
def cross_model(make_model, cross_recipe):
    model = make_model(cross_recipe, with_cross=True)
    # Fresh cross-attention is Xavier-initialised, so it already changes every output.
    return model


def _batch_of_four(demo_batch):
    return demo_batch["image"], list(demo_batch["class_name"])


def test_anchors_at_test_time_are_produced_as_in_training(cross_model, cross_recipe, demo_batch):
    """The text cross-attention runs at test time too, on the same context as in stage 2."""
    images, classes = _batch_of_four(demo_batch)
    bank = AnchorBank(cross_model, classes, "synthetic")
    seen = []
    original = bank.anchors

    def spy(names, context=None):
        out = original(names, context)
        seen.append(out.detach().clone())
        return out

    bank.anchors = spy
    engine.stage2_loss(cross_model, bank, cross_recipe, images, demo_batch["mask"], demo_batch["label"], classes)
    predict_batch(cross_model, bank, images, classes, cross_recipe)
    assert len(seen) == 2
    torch.testing.assert_close(seen[0], seen[1])
    # ... and the module is not silently skipped: switching it off changes the anchors.
    cross_model.use_text_cross = False
    plain = bank.anchors(classes, None)
    assert (plain - seen[1]).abs().max() > 1e-4


@pytest.mark.parametrize("training_mode", [False, True])
def test_each_image_is_independent_of_its_batch_mates(cross_model, cross_recipe, demo_batch, training_mode):
    images, classes = _batch_of_four(demo_batch)
    bank = AnchorBank(cross_model, classes, "synthetic")
    cross_model.train(training_mode)
    with torch.no_grad():
        maps_all, det_all = predict_batch(cross_model, bank, images, classes, cross_recipe)
        for i in range(len(classes)):
            maps_one, det_one = predict_batch(cross_model, bank, images[i : i + 1], classes[i : i + 1], cross_recipe)
            torch.testing.assert_close(maps_one[0], maps_all[i], atol=1e-4, rtol=1e-5)
            torch.testing.assert_close(det_one[0], det_all[i], atol=1e-5, rtol=1e-5)
            # Training-path features too (stage-2 forward with the image cross-attention).
            ctx = bank.text_context(classes)
            seg_all, _ = cross_model.encode_image(images, ctx)
            seg_one, _ = cross_model.encode_image(images[i : i + 1], ctx[i : i + 1])
            torch.testing.assert_close(seg_one[-1][0], seg_all[-1][i], atol=1e-5, rtol=1e-5)


def test_gradient_dilution_probe_separates_weight_01_from_10(make_model, demo_overrides, demo_batch):
    """At 0.1 the image adapters keep (nearly) their gradient and the cross-attention takes a small
    share; at 1.0 the cross-attention takes most of the stage-2 gradient. On this random tiny
    backbone the adapters' own norm at 1.0 is not consistently lower (measured ratios 0.67-1.25
    over seeds), so the ratio at 1.0 is reported, not asserted; the share is the stable signal."""
    ratios, shares = {}, {}
    for w in (0.1, 1.0):
        recipe = load_recipe("cross-demo", demo_overrides + [f"cross.image_weight={w}"])[0]
        model = make_model(recipe, with_cross=True, seed=0)
        bank = AnchorBank(model, demo_batch["class_name"], "synthetic")
        probe = gradient_dilution_probe(model, bank, recipe, demo_batch)
        ratios[w], shares[w] = probe.ratio, probe.cross_share
        # The probe leaves the model as it found it.
        assert model.use_image_cross and not any(p.requires_grad for p in model.parameters())
    assert ratios[0.1] >= 0.8
    assert shares[1.0] > 0.5 > 0.2 > shares[0.1], shares
    assert shares[1.0] > 4 * shares[0.1]


def _artifact_digest(client, run_id: str, dst: Path) -> dict[str, str]:
    import mlflow

    local = Path(mlflow.artifacts.download_artifacts(run_id=run_id, dst_path=str(dst), tracking_uri=client._tracking_client.tracking_uri))
    return {
        str(p.relative_to(local)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(local.rglob("*")) if p.is_file()
    }


def test_train_cross_from_a_base_run_end_to_end(demo_overrides, tmp_path, monkeypatch):
    import mlflow

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sets = [x for s in demo_overrides for x in ("--set", s)]
    base = runner.invoke(app, ["train", "base", "--recipe", "demo", "--json", "--tracking-uri", uri, *sets,
                               "--set", "stage1.epochs=1", "--set", "stage2.epochs=2"])
    assert base.exit_code == 0, base.output
    base_id = json.loads(base.stdout)["run_id"]
    client = mlflow.MlflowClient(uri)
    before = _artifact_digest(client, base_id, tmp_path / "before")

    cross = runner.invoke(app, ["train", "cross", "--from", base_id, "--recipe", "cross-demo", "--json",
                                "--tracking-uri", uri, *sets, "--set", "cross.learnable_weight=true"])
    assert cross.exit_code == 0, cross.output
    result = json.loads(cross.stdout)
    losses = result["stage2_loss"]
    assert len(losses) == 4 and losses[-1] < losses[0], losses

    run = client.get_run(result["run_id"])
    assert run.data.tags["aaclip.stage"] == "cross"
    assert run.data.tags["aaclip.parent_run"] == base_id
    assert run.data.tags["mlflow.parentRunId"] == base_id
    assert run.data.params["cross.image_weight"] == "0.1" and run.data.params["cross.text_weight"] == "0.1"
    for group in ("text_cross_attn", "text_adapters"):
        assert f"stage1/grad_norm/{group}" in run.data.metrics
    for group in ("image_cross_attn", "image_adapters", "projections"):
        assert f"stage2/grad_norm/{group}" in run.data.metrics
    weights = [m.value for m in client.get_metric_history(result["run_id"], "cross/image_weight")]
    assert len(weights) == 6 and weights[0] != pytest.approx(0.1, abs=1e-9)  # learnable: it moved

    after = _artifact_digest(client, base_id, tmp_path / "after")
    assert after == before

    tested = runner.invoke(app, ["test", "--run", result["run_id"], "--json", "--tracking-uri", uri,
                                 "--set", "eval.aupro=false"])
    assert tested.exit_code == 0, tested.output
    assert json.loads(tested.stdout)["mean"]["pixel_auroc"] > 0.5


def test_train_cross_without_a_base_is_a_usage_error(tmp_path, monkeypatch, tracking_uri, demo_overrides):
    monkeypatch.chdir(tmp_path)
    sets = [x for s in demo_overrides for x in ("--set", s)]
    out = runner.invoke(app, ["train", "cross", "--recipe", "cross-demo", "--tracking-uri", tracking_uri, *sets])
    assert out.exit_code == 2
    assert "--from" in out.output and "Traceback" not in out.output
