"""`aaclip import` / `aaclip export`: reference adapter files into and out of the run registry."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from reference_layout import reference_layout, reference_tensors
from typer.testing import CliRunner

from aaclip_cli.main import app
from aaclip_core.checkpoints.checkpoint import load_checkpoint, save_checkpoint
from aaclip_core.compute import seed_everything
from aaclip_core.model import build_model
from aaclip_core.recipe import load_recipe
from aaclip_core.registry.tracking import connect, download

# Small test split for `test`: one class, a few images (enough for every metric to be defined).
TEST_SUBSET = ['data.test.classes=["disc"]', "data.test.shot=6", "eval.aupro=false"]


class MarkerOnLoad:
    """Unpickling this object would create the marker file (it never may)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def sets(overrides: list[str]) -> list[str]:
    out = []
    for o in overrides:
        out += ["--set", o]
    return out


def run_id_of(result) -> str:
    assert result.exit_code == 0, result.output
    return result.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def own_shapes() -> dict[str, tuple[int, ...]]:
    """The demo model's adapter keys (relu off) and shapes: what aaclip has, to check against."""
    recipe, _ = load_recipe("demo")
    model = build_model(recipe, "cpu")
    return {k: tuple(v.shape) for k, v in model.adapter_state_dict().items()}


@pytest.fixture(scope="module")
def demo_layout() -> dict:
    """The demo backbone's depths and widths, for the reference's key list (never aaclip's keys)."""
    recipe, _ = load_recipe("demo")
    d = build_model(recipe, "cpu").dims
    return {"image_adapt_until": recipe.model.image_adapt_until, "text_adapt_until": recipe.model.text_adapt_until,
            "vision_width": d.vision_width, "text_width": d.text_width, "embed_dim": d.embed_dim}


def reference_state(demo_layout, kind: str, relu: bool, seed: int) -> dict[str, torch.Tensor]:
    """Random tensors under the key names the reference's code writes (tests/reference_layout.py)."""
    return reference_tensors(reference_layout(kind, relu, **demo_layout), seed)


def write_reference(directory: Path, demo_layout, relu: bool = False, epoch: int = 7, text_epoch: int = 5):
    directory.mkdir(parents=True, exist_ok=True)
    text = reference_state(demo_layout, "text", relu, 1)
    image = reference_state(demo_layout, "image", relu, 2)
    # Optimiser entries as the reference writes them (tensors and plain values only).
    torch.save(
        {"text_adapter": text, "text_optimizer": {"state": {}, "param_groups": [{"lr": 1e-5}]}, "epoch": text_epoch},
        directory / "text_adapter.pth",
    )
    torch.save(
        {"image_adapter": image, "image_optimizer": {"state": {}, "param_groups": [{"lr": 5e-4}]}, "epoch": epoch},
        directory / f"image_adapter_{epoch}.pth",
    )
    return directory / "text_adapter.pth", directory / f"image_adapter_{epoch}.pth", text, image


def run_info(tracking_uri: str, run_id: str, tmp_path: Path):
    mlflow = connect(tracking_uri)
    run = mlflow.get_run(run_id)
    ckpt = load_checkpoint(download(mlflow, run_id, "checkpoints/final", tmp_path / "dl" / run_id))
    recipe = json.loads(download(mlflow, run_id, "recipe.json", tmp_path / "dl" / run_id).read_text())
    return run, ckpt, recipe


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------ import


@pytest.mark.parametrize("relu", [False, True])
def test_import_both_relu_variants_exactly(relu, demo_layout, tmp_path, monkeypatch, tracking_uri, demo_overrides):
    monkeypatch.chdir(tmp_path)
    text_file, image_file, text, image = write_reference(tmp_path / "ref", demo_layout, relu=relu)
    res = invoke("import", "--text-adapter", text_file, "--image-adapter", image_file, "--recipe", "demo",
                 *sets(demo_overrides), "--tracking-uri", tracking_uri, "--name", "imp")
    run_id = run_id_of(res)
    # The recipe says relu off: the relu-on file's variant is adopted, and said so.
    assert ("uses model.relu = true" in " ".join(res.stderr.split())) == relu

    run, ckpt, recipe = run_info(tracking_uri, run_id, tmp_path)
    assert recipe["model"]["relu"] is relu
    for kind, state in (("text_adapter", text), ("image_adapter", image)):
        for k, v in state.items():
            assert torch.equal(ckpt.adapters[f"{kind}.{k}"], v), k
    assert len(ckpt.adapters) == len(text) + len(image)  # nothing else (no cross-attention)

    m = ckpt.manifest
    assert m["stage"] == "imported" and m["epoch"] == 7 and m["text_epoch"] == 5
    assert m["cross_attention"] is False and m["modes"]["context_source"] == "dpam"
    tags, params = run.data.tags, run.data.params
    assert tags["aaclip.stage"] == "imported"
    assert tags["aaclip.selected_checkpoint"] == "final"
    assert tags["aaclip.text_adapter"] == tags["aaclip.image_adapter"] == "imported"
    assert tags["aaclip.text_adapter.sha256"] == params["import.text_adapter.sha256"] == sha(text_file)
    assert tags["aaclip.image_adapter.sha256"] == params["import.image_adapter.sha256"] == sha(image_file)
    assert params["import.text_adapter.epoch"] == "5" and params["import.image_adapter.epoch"] == "7"
    assert params["import.backbone"] == tags["aaclip.backbone"] == "aaclip-tiny:none@112"
    assert params["import.fidelity"] == "official" and params["model.relu"] == str(relu)
    assert params["import.relu_adopted"] == str(relu).lower()
    assert run.info.run_name == "imp"

    # Export gives the source files' tensors back, in the file's variant, with the epochs.
    res = invoke("export", "--run", run_id, tmp_path / "out", "--tracking-uri", tracking_uri, "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["optimizer_state"] is False and "optimiser" in " ".join(out["notes"])
    t = torch.load(tmp_path / "out" / "text_adapter.pth", weights_only=True)
    i = torch.load(tmp_path / "out" / "image_adapter_7.pth", weights_only=True)
    assert set(t) == {"text_adapter", "epoch"} and set(i) == {"image_adapter", "epoch"}
    assert t["epoch"] == 5 and i["epoch"] == 7
    assert t["text_adapter"].keys() == text.keys() and i["image_adapter"].keys() == image.keys()
    assert all(torch.equal(t["text_adapter"][k], v) for k, v in text.items())
    assert all(torch.equal(i["image_adapter"][k], v) for k, v in image.items())


def test_import_refuses_recipe_variant_only_by_library_call(own_shapes, demo_layout, tmp_path):
    """`import_reference` (the library's strict path) keeps refusing a variant mismatch with the --set."""
    from aaclip_core.checkpoints.checkpoint import import_reference
    from aaclip_core.errors import CheckpointError

    _, image_file, _, image = write_reference(tmp_path, demo_layout, relu=True)
    own = {k: torch.zeros(s) for k, s in own_shapes.items()}
    with pytest.raises(CheckpointError, match="--set model.relu=true"):
        import_reference(image_file, "image", own, relu=False)
    own_relu = {k.replace(".fc.weight", ".fc.0.weight") if "_proj" in k else k: v for k, v in own.items()}
    got = import_reference(image_file, "image", own_relu, relu=True)
    assert got.relu is True and got.epoch == 7
    assert all(torch.equal(got.adapters[f"image_adapter.{k}"], v) for k, v in image.items())


def test_pickled_object_refused_without_running(demo_layout, tmp_path, monkeypatch, tracking_uri, demo_overrides):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "MARKER"
    text = reference_state(demo_layout, "text", False, 1)
    evil = tmp_path / "text_adapter.pth"
    torch.save({"text_adapter": text, "text_optimizer": MarkerOnLoad(marker), "epoch": 1}, evil)
    res = invoke("import", "--text-adapter", evil, "--recipe", "demo", *sets(demo_overrides),
                 "--tracking-uri", tracking_uri)
    assert res.exit_code == 2
    assert not marker.exists()
    msg = " ".join(res.stderr.split())
    assert "needs pickle" in msg and "refused without being run" in msg
    assert "weights_only=False" in msg and "torch.save(" in msg  # the one-line re-save hint
    assert "Traceback" not in res.output
    assert connect(tracking_uri).search_runs(search_all_experiments=True).empty


def test_wrong_shape_refused_naming_key(demo_layout, tmp_path, monkeypatch, tracking_uri, demo_overrides):
    monkeypatch.chdir(tmp_path)
    text_file, image_file, text, image = write_reference(tmp_path / "ref", demo_layout)
    image["seg_proj.2.fc.weight"] = torch.randn(64, 96)  # expected (64, 128)
    torch.save({"image_adapter": image, "epoch": 7}, image_file)
    res = invoke("import", "--text-adapter", text_file, "--image-adapter", image_file, "--recipe", "demo",
                 *sets(demo_overrides), "--tracking-uri", tracking_uri)
    assert res.exit_code == 2
    msg = " ".join(res.stderr.split())
    assert "'seg_proj.2.fc.weight'" in msg and "expected (64, 128)" in msg and "found (64, 96)" in msg
    assert connect(tracking_uri).search_runs(search_all_experiments=True).empty


def test_text_only_allowed_and_tagged(demo_layout, tmp_path, monkeypatch, tracking_uri, demo_overrides, demo_recipe):
    monkeypatch.chdir(tmp_path)
    text_file, _, text, _ = write_reference(tmp_path / "ref", demo_layout)
    res = invoke("import", "--text-adapter", text_file, "--recipe", "demo", *sets(demo_overrides),
                 "--tracking-uri", tracking_uri)
    run_id = run_id_of(res)
    assert "warning" in res.stderr and "untrained" in res.stderr
    run, ckpt, _ = run_info(tracking_uri, run_id, tmp_path)
    assert run.data.tags["aaclip.image_adapter"] == "untrained"
    assert run.data.tags["aaclip.text_adapter"] == "imported"
    assert "aaclip.image_adapter.sha256" not in run.data.tags
    assert ckpt.manifest["epoch"] == 0 and ckpt.manifest["text_epoch"] == 5
    assert all(torch.equal(ckpt.adapters[f"text_adapter.{k}"], v) for k, v in text.items())
    # The untrained image adapters are the Xavier initialisation drawn after seeding with the recipe's seed.
    seed_everything(demo_recipe.runtime.seed)
    fresh = build_model(demo_recipe, "cpu").adapter_state_dict()
    image_keys = [k for k in fresh if k.startswith("image_adapter.")]
    assert image_keys and all(torch.equal(ckpt.adapters[k], fresh[k]) for k in image_keys)


def test_image_only_needs_flag_and_nothing_is_a_usage_error(demo_layout, tmp_path, monkeypatch, tracking_uri,
                                                              demo_overrides):
    monkeypatch.chdir(tmp_path)
    _, image_file, _, image = write_reference(tmp_path / "ref", demo_layout)
    common = ["--recipe", "demo", *sets(demo_overrides), "--tracking-uri", tracking_uri]
    res = invoke("import", *common)
    assert res.exit_code == 2 and "Nothing to import" in res.stderr
    res = invoke("import", "--image-adapter", image_file, *common)
    assert res.exit_code == 2 and "--allow-image-only" in " ".join(res.stderr.split())
    assert connect(tracking_uri).search_runs(search_all_experiments=True).empty

    res = invoke("import", "--image-adapter", image_file, "--allow-image-only", *common)
    run_id = run_id_of(res)
    assert "untrained" in res.stderr
    run, ckpt, _ = run_info(tracking_uri, run_id, tmp_path)
    assert run.data.tags["aaclip.text_adapter"] == "untrained"
    assert run.data.tags["aaclip.image_adapter"] == "imported"
    assert all(torch.equal(ckpt.adapters[f"image_adapter.{k}"], v) for k, v in image.items())


def test_wrong_kind_of_file_refused(demo_layout, tmp_path, monkeypatch, tracking_uri, demo_overrides):
    monkeypatch.chdir(tmp_path)
    text_file, image_file, _, _ = write_reference(tmp_path / "ref", demo_layout)
    res = invoke("import", "--text-adapter", image_file, "--recipe", "demo", *sets(demo_overrides),
                 "--tracking-uri", tracking_uri)
    assert res.exit_code == 2 and "no 'text_adapter' entry" in res.stderr


@pytest.mark.parametrize("relu", [False, True])
def test_vit_l_adapters_are_the_reference_layout(relu, tmp_path):
    """ViT-L-14-336 with the reference's settings (built on the meta device: shapes, no weights): aaclip's
    adapters map onto the reference's literal key list both ways, nothing missing and nothing extra."""
    from reference_layout import REFERENCE_IMAGE_ADAPTER, REFERENCE_IMAGE_ADAPTER_RELU, REFERENCE_TEXT_ADAPTER

    from aaclip_core.checkpoints.checkpoint import map_reference, read_reference
    from aaclip_core.model.aaclip import AACLIP

    recipe, _ = load_recipe("base", [f"model.relu={str(relu).lower()}"])
    import open_clip

    with torch.device("meta"):
        clip = open_clip.create_model(recipe.model.name, pretrained=None, device="meta",
                                         force_image_size=recipe.model.image_size)
        own = AACLIP(clip, recipe.model).adapter_state_dict()
    image_ref = REFERENCE_IMAGE_ADAPTER_RELU if relu else REFERENCE_IMAGE_ADAPTER
    for kind, ref in (("text", REFERENCE_TEXT_ADAPTER), ("image", image_ref)):
        prefix = f"{kind}_adapter."
        assert {k[len(prefix):]: tuple(v.shape) for k, v in own.items() if k.startswith(prefix)} == ref, kind
        # The import path reads a file with exactly these keys onto the model.
        path = tmp_path / f"{kind}.pth"
        torch.save({f"{kind}_adapter": {k: torch.zeros(0).new_empty(v) for k, v in ref.items()}, "epoch": 1}, path)
        mapped = map_reference(read_reference(path, kind), own)
        assert sorted(mapped) == sorted(k for k in own if k.startswith(prefix))


# ------------------------------------------------------------------------------------------ round trip


def test_imported_run_tests_like_the_exported_run(demo_layout, tmp_path, monkeypatch, tracking_uri, demo_overrides):
    monkeypatch.chdir(tmp_path)
    train = ["--set", "stage1.epochs=1", "--set", "stage2.epochs=1", "--set", "data.train.shot=4"]
    res = invoke("train", "base", "--recipe", "demo", *sets(demo_overrides), *train,
                 "--tracking-uri", tracking_uri, "--quiet")
    trained = run_id_of(res)

    res = invoke("export", "--run", trained, tmp_path / "ref", "--tracking-uri", tracking_uri)
    assert res.exit_code == 0, res.output
    files = sorted(p.name for p in (tmp_path / "ref").iterdir())
    assert files == ["image_adapter_1.pth", "text_adapter.pth"]
    # A trained run's files carry exactly the keys and shapes the reference's code writes.
    for name, kind in (("text_adapter.pth", "text"), ("image_adapter_1.pth", "image")):
        state = torch.load(tmp_path / "ref" / name, weights_only=True)[f"{kind}_adapter"]
        assert {k: tuple(v.shape) for k, v in state.items()} == reference_layout(kind, **demo_layout), name

    res = invoke("import", "--text-adapter", tmp_path / "ref" / "text_adapter.pth",
                 "--image-adapter", tmp_path / "ref" / "image_adapter_1.pth",
                 "--recipe", "demo", *sets(demo_overrides), "--tracking-uri", tracking_uri)
    imported = run_id_of(res)
    assert res.stderr.count("warning") == 0

    _, a, _ = run_info(tracking_uri, trained, tmp_path)
    _, b, _ = run_info(tracking_uri, imported, tmp_path)
    assert a.adapters.keys() == b.adapters.keys()
    assert all(torch.equal(a.adapters[k], b.adapters[k]) for k in a.adapters)

    reports = []
    for run_id in (trained, imported):
        res = invoke("test", "--run", run_id, *sets(TEST_SUBSET), "--tracking-uri", tracking_uri, "--json")
        assert res.exit_code == 0, res.output
        reports.append(json.loads(res.stdout))
    ra, rb = reports
    assert rb["checkpoint_stage"] == "imported"
    assert not math.isnan(ra["mean"]["pixel_auroc"]) and not math.isnan(ra["mean"]["image_auroc"])
    assert ra["mean"].keys() == rb["mean"].keys()
    for k, v in ra["mean"].items():
        assert rb["mean"][k] == pytest.approx(v, abs=1e-6, nan_ok=True), k
    for ca, cb in zip(ra["classes"], rb["classes"]):
        for k, v in ca.items():
            if isinstance(v, float):
                assert cb[k] == pytest.approx(v, abs=1e-6, nan_ok=True), k


# ------------------------------------------------------------------------------------------ export


def test_export_refuses_cross_attention(tmp_path, monkeypatch, tracking_uri):
    monkeypatch.chdir(tmp_path)
    mlflow = connect(tracking_uri)
    adapters = {
        "text_adapter.0.fc.0.weight": torch.zeros(4, 4),
        "image_adapter.det_proj.fc.weight": torch.zeros(4, 4),
        "text_cross_attn.attn.q.weight": torch.zeros(4, 4),
    }
    local = save_checkpoint(tmp_path / "ck", adapters,
                            {"stage": "cross", "epoch": 1, "cross_attention": True, "context_source": "dpam"})
    mlflow.set_experiment("hand-made")
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(local), "checkpoints/final")
    res = invoke("export", "--run", run.info.run_id, tmp_path / "out", "--tracking-uri", tracking_uri)
    assert res.exit_code == 2
    msg = " ".join(res.stderr.split())
    assert "cross-attention" in msg and "text_cross_attn" in msg and "no place" in msg
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_export_unknown_run_is_a_clear_error(tmp_path, monkeypatch, tracking_uri):
    monkeypatch.chdir(tmp_path)
    res = invoke("export", "--run", "0" * 32, tmp_path / "out", "--tracking-uri", tracking_uri)
    assert res.exit_code == 2 and "No run" in res.stderr
