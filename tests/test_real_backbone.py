"""The real backbone path: ViT-L-14-336 read from a file in OpenCLIP's own layout, as the offline recipe
tells users (`--set model.pretrained=/path/to/open_clip_model.safetensors`).

A random-weight ViT-L-14-336 is saved once as ``open_clip_model.safetensors`` (the model's state dict under
OpenCLIP's key names: the layout of the Hugging Face hub files OpenCLIP downloads). The real CLI trains one
step per stage on one image from it at 336 px and tests two images at 336 px and at 518 px (the
reference's size: the position embedding interpolated from 24x24 to 37x37 by OpenCLIP's loader).
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path

import mlflow
import pytest
import torch
from clirun import aaclip, set_flags

from aaclip_core.checkpoints.checkpoint import load_checkpoint
from aaclip_core.record import FINAL, STAGE1, Artifact, Tag

# Real processes and a 1.7 GB model, minutes on 2 CPU cores: CI's second step (`pytest -m integration`).
pytestmark = pytest.mark.integration

NAME = "ViT-L-14-336"


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory) -> Path:
    """A random ViT-L-14-336 saved as OpenCLIP's hub files are: safetensors of the model's state dict."""
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(20261203)  # not the recipe's seed: random weights drawn by aaclip would differ
    model = open_clip.create_model(NAME, pretrained=None)
    path = tmp_path_factory.mktemp("vit-l") / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def two_images(tmp_path_factory, demo_root) -> Path:
    """One normal and one anomalous image (with its mask) of one class, for training and for test."""
    root = tmp_path_factory.mktemp("two-images")
    for split in ("train", "test"):
        src, dst = demo_root / split / "disc", root / split / "disc"
        for rel in ("test/good/000.png", "test/spot/000.png", "ground_truth/spot/000_mask.png",
                    "train/good/000.png"):
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src / rel, dst / rel)
    return root


def _overrides(weights: Path, data: Path) -> list[str]:
    return [
        f'model.pretrained="{weights}"', "model.image_size=336",
        f'data.train.root="{data / "train"}"', 'data.train.layout="mvtec"', 'data.train.name="two-train"',
        "data.train.shot=1",  # one anomalous image: one step per stage at batch 1
        f'data.test.root="{data / "test"}"', 'data.test.layout="mvtec"', 'data.test.name="two-test"',
        "stage1.epochs=1", "stage1.batch_size=1", "stage2.epochs=1", "stage2.batch_size=1",
        "eval.batch_size=2", "data.num_workers=0", 'runtime.device="cpu"',
    ]


def _adapters(uri: str, run_id: str, checkpoint: str) -> dict[str, torch.Tensor]:
    mlflow.set_tracking_uri(uri)
    local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=Artifact.checkpoint(checkpoint),
                                                dst_path=tempfile.mkdtemp())
    return load_checkpoint(Path(local)).adapters


@pytest.fixture(scope="module")
def jobs(weights_file, two_images, tmp_path_factory):
    """`train base` from the file, then `test` of its run at 336 and at 518 px (one store)."""
    work = tmp_path_factory.mktemp("real-backbone")
    uri = f"sqlite:///{work / 'mlflow.db'}"
    sets = set_flags(_overrides(weights_file, two_images))
    train = aaclip("train", "base", "--recipe", "base", *sets, "--tracking-uri", uri, "--json", timeout=900, cwd=work)
    assert train.returncode == 0, train.stderr[-3000:]
    out = {"uri": uri, "train": json.loads(train.stdout)}
    for size in (336, 518):
        test = aaclip("test", "--run", out["train"]["run_id"], *sets, "--set", f"model.image_size={size}",
                      "--tracking-uri", uri, "--json", timeout=900, cwd=work)
        assert test.returncode == 0, test.stderr[-3000:]
        out[size] = json.loads(test.stdout)
    return out


def test_training_from_the_file_moves_both_adapters(jobs, weights_file):
    uri, train = jobs["uri"], jobs["train"]
    run = mlflow.MlflowClient(uri).get_run(train["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["model.pretrained"] == str(weights_file)
    assert run.data.tags[Tag.BACKBONE] == f"{NAME}:open_clip_model.safetensors@336"
    # Stage 1 took its step: the probe loss (fixed batch, eval mode) changed, so the text adapter moved.
    probe = train["stage1_probe_loss"]
    assert len(probe) == 2 and all(math.isfinite(v) for v in probe) and probe[0] != probe[1], probe
    # Stage 2 took its step: the image adapter left where stage 1 left it (as initialised).
    before, after = _adapters(uri, train["run_id"], STAGE1), _adapters(uri, train["run_id"], FINAL)
    image = [k for k in after if k.startswith("image_adapter.")]
    assert len(image) == 6 + 4 + 1  # 6 layer adapters, 4 seg projections, 1 det projection
    assert max(float((after[k] - before[k]).abs().max()) for k in image) > 1e-5


@pytest.mark.parametrize("size", [336, 518])
def test_the_run_tests_two_images_at_both_sizes(jobs, size):
    report = jobs[size]
    assert report["dataset"] == "two-test"
    for metric in ("pixel_auroc", "pixel_ap", "image_auroc", "image_ap"):
        assert math.isfinite(report["mean"][metric]), (size, metric, report["mean"])
    run = mlflow.MlflowClient(jobs["uri"]).get_run(report["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["protocol.model.image_size"] == str(size)
    assert run.data.tags[Tag.BACKBONE] == f"{NAME}:open_clip_model.safetensors@{size}"


def test_the_backbone_is_the_files_with_its_grid_interpolated_to_37(jobs, weights_file, two_images):
    """aaclip's builder at 518 px holds exactly the file's tensors (nothing re-randomised), the vision
    position embedding is OpenCLIP's interpolation of the file's 24x24 grid, and patches form 37x37."""
    from open_clip.model import resize_pos_embed
    from safetensors.torch import load_file

    from aaclip_core.model.backbone import build_clip
    from aaclip_core.recipe import load_recipe

    recipe, _ = load_recipe("base", [*_overrides(weights_file, two_images), "model.image_size=518"])
    clip = build_clip(recipe)
    state = clip.state_dict()
    saved = load_file(str(weights_file))
    assert clip.visual.grid_size == (37, 37)
    assert state["visual.positional_embedding"].shape == (37 * 37 + 1, 1024)
    assert saved["visual.positional_embedding"].shape == (24 * 24 + 1, 1024)
    expected = {"visual.positional_embedding": saved["visual.positional_embedding"]}
    resize_pos_embed(expected, clip)  # what OpenCLIP's loader does to a file made for another size
    assert torch.equal(state["visual.positional_embedding"], expected["visual.positional_embedding"])
    assert set(saved) == set(state)
    different = [k for k in saved if k != "visual.positional_embedding" and not torch.equal(state[k], saved[k])]
    assert not different, different[:5]
