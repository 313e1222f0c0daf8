"""Regression tests for defects found in review: each failed before its fix."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from aaclip_cli.main import app
from aaclip_core.checkpoints.checkpoint import Checkpoint
from aaclip_core.compute import autocast
from aaclip_core.evaluation.protocol import predict_batch
from aaclip_core.jobs import common
from aaclip_core.model import ModelModes
from aaclip_core.prompts.anchors import AnchorBank
from aaclip_core.recipe import load_recipe
from aaclip_core.training import engine
from aaclip_core.training.data import load_samples, make_dataset, make_loader

runner = CliRunner()


@pytest.fixture
def dpam_first_level(demo_overrides):
    """Cross-attention recipe whose first level lies inside the DPAM blocks (as level 6 does for
    ViT-L-14-336: DPAM from block 6), official fidelity, dropout off."""
    recipe = load_recipe("cross-demo", demo_overrides + ["model.surgery_until_layer=5", "cross.dropout=0.0"])[0]
    assert recipe.fidelity == "official"
    return recipe


def test_stage1_cross_context_does_not_depend_on_batch_mates(make_model, dpam_first_level, demo_batch):
    model = make_model(dpam_first_level, with_cross=True)
    assert model.dpam_start < dpam_first_level.model.levels[0]
    images, classes = demo_batch["image"], list(demo_batch["class_name"])
    bank = AnchorBank(model, classes, "synthetic")
    seen = []
    original = bank.anchors
    bank.anchors = lambda names, ctx=None: seen.append(original(names, ctx).detach()) or seen[-1]
    engine.stage1_loss(model, bank, dpam_first_level, images, demo_batch["mask"], classes)
    predict_batch(model, bank, images, classes, dpam_first_level)
    # The anchors stage 1 trains against are the ones the test uses for the same images ...
    torch.testing.assert_close(seen[0], seen[1], atol=1e-6, rtol=1e-6)
    # ... and an image's anchors are the same alone as in a batch.
    alone = original(classes[:1], model.anchor_context(images[:1]))
    torch.testing.assert_close(alone[0], seen[0][0], atol=1e-5, rtol=1e-5)


def test_loader_workers_see_each_epochs_augmentation(demo_recipe):
    recipe = demo_recipe.model_copy(update={"data": demo_recipe.data.model_copy(update={"num_workers": 2})})
    samples = load_samples(recipe.data.train, recipe.runtime.seed)[:4]
    ds = make_dataset(samples, recipe, "geometric+colour")
    loader = make_loader(ds, 4, False, recipe, None)
    epochs = []
    for epoch in (1, 2):
        ds.set_epoch(epoch)
        epochs.append(next(iter(loader))["image"])
    assert not torch.equal(epochs[0], epochs[1])
    ds.set_epoch(1)  # ... and the draws are a function of the epoch, not of the worker's history
    assert torch.equal(next(iter(loader))["image"], epochs[0])


def test_eval_maps_are_fp32_under_bf16_autocast(make_model, demo_recipe, demo_batch):
    model = make_model(demo_recipe)
    classes = list(demo_batch["class_name"])
    bank = AnchorBank(model, classes, "synthetic")
    bank.freeze()
    with autocast(torch.device("cpu"), "bf16"):
        maps, det = predict_batch(model, bank, demo_batch["image"], classes, demo_recipe)
    assert maps.dtype == torch.float32 and det.dtype == torch.float32
    # bf16 would leave a few hundred distinct values per map; fp32 scoring keeps them apart.
    assert torch.unique(maps[0]).numel() > 0.5 * maps[0].numel()


def test_cross_attention_switches_survive_the_checkpoint(make_model, demo_overrides):
    recipe = load_recipe("cross-demo", demo_overrides)[0]
    model = make_model(recipe, with_cross=True)
    # A feedback loop before cross_attn_start_loop, reading the trained image path (loop >= 2).
    modes = ModelModes(text_cross=False, image_cross=False, context_source="image_path")
    model.set_modes(modes)
    meta = common.manifest(recipe, model, "stage2", 1, loop=1, prompt_names={})
    restored = common.model_from_checkpoint(recipe, Checkpoint(model.adapter_state_dict(), meta), "cpu")
    assert restored.text_cross_attn is not None
    assert restored.modes == modes and not restored.use_text_cross and not restored.use_image_cross
    # Manifests written before the modes were one declared state still restore theirs.
    old = {k: v for k, v in meta.items() if k != "modes"}
    old.update(cross_attention_on={"text": False, "image": True}, context_source="image_path")
    legacy = common.model_from_checkpoint(recipe, Checkpoint(model.adapter_state_dict(), old), "cpu")
    assert legacy.modes == ModelModes(text_cross=False, image_cross=True, context_source="image_path")


def test_random_backbone_depends_only_on_the_seed(demo_recipe):
    from aaclip_core.model.backbone import build_clip

    torch.manual_seed(1)
    a = build_clip(demo_recipe)
    torch.manual_seed(2)
    before = torch.get_rng_state()
    b = build_clip(demo_recipe)
    assert torch.equal(before, torch.get_rng_state())  # the caller's generator is untouched
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), name


def test_json_output_is_strict_json(capsys):
    from aaclip_cli.display import print_json

    print_json({"mean": {"aupro": math.nan, "pixel_auroc": 0.9}, "rows": [math.inf]})
    text = capsys.readouterr().out
    doc = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert doc == {"mean": {"aupro": None, "pixel_auroc": 0.9}, "rows": [None]}


def test_resume_refuses_other_flags_and_non_feedback_runs(tmp_path, monkeypatch, demo_overrides):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = runner.invoke(app, ["train", "feedback", "--resume", "abc", "--loops", "3", "--tracking-uri", uri])
    assert out.exit_code == 2 and "--loops" in out.output and "Traceback" not in out.output

    sets = [x for s in demo_overrides + ["stage1.epochs=1", "stage2.epochs=1", "data.train.shot=4"]
            for x in ("--set", s)]
    base = runner.invoke(app, ["train", "base", "--recipe", "demo", "--json", "--tracking-uri", uri, *sets])
    assert base.exit_code == 0, base.output
    base_id = json.loads(base.stdout)["run_id"]
    out = runner.invoke(app, ["train", "feedback", "--resume", base_id, "--tracking-uri", uri])
    assert out.exit_code == 2 and "'base' run" in out.output

    import mlflow

    run = mlflow.MlflowClient(uri).get_run(base_id)
    assert run.data.tags["aaclip.stage"] == "base"  # not taken over

    # --data-root needs --dataset; and the training data under another name is still "the same".
    out = runner.invoke(app, ["test", "--run", base_id, "--data-root", "/tmp", "--tracking-uri", uri])
    assert out.exit_code == 2 and "--dataset" in out.output
    out = runner.invoke(app, ["test", "--run", base_id, "--dataset", "Other", "--tracking-uri", uri,
                              "--data-root", str(load_recipe("demo", demo_overrides)[0].data.train.root),
                              "--set", "data.allow_same_dataset=false"])
    assert out.exit_code == 2 and "same" in out.output


def test_fp16_training_is_refused(tmp_path, monkeypatch, demo_overrides, tracking_uri):
    monkeypatch.chdir(tmp_path)
    sets = [x for s in demo_overrides + ["runtime.precision=\"fp16\""] for x in ("--set", s)]
    out = runner.invoke(app, ["train", "base", "--recipe", "demo", "--tracking-uri", tracking_uri, *sets])
    assert out.exit_code == 2 and "fp16" in out.output and "Traceback" not in out.output
