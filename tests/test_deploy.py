"""Exported detectors at the library level: the graph equals the eager protocol exactly, the ONNX
file passes the checker and ONNX Runtime reproduces it, TorchScript too, for the base model and both
cross-attention context sources; the scorer needs neither open_clip nor MLflow (nor torch for ONNX).

Models are the tiny demo backbone with random adapters (no training needed for equality)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from aaclip_score.contract import sidecar_of
from aaclip_score.detector import preprocess
from torchvision.transforms.functional import gaussian_blur as tv_blur

from aaclip_core.data.dataset import load_image_tensor
from aaclip_core.deploy.export import export_onnx, export_torchscript, quantize_int8, write_sidecar
from aaclip_core.deploy.graph import DetectorGraph
from aaclip_core.deploy.scorer import load_detector
from aaclip_core.errors import AaclipError
from aaclip_core.evaluation.protocol import predict_batch
from aaclip_core.model.similarity import gaussian_blur
from aaclip_core.pictures.visualize import CLIP_MEAN, CLIP_STD, denormalise
from aaclip_core.predict import score_image
from aaclip_core.prompts.anchors import AnchorBank

CLASSES = ["fabric", "tile", "wood"]
# fabric calibrated (a range that the random model's maps straddle), tile and wood raw.
CAL = {"fabric": {"map_min": -20.0, "map_max": 40.0, "det_min": 0.45, "det_max": 0.55, "image_threshold": 0.5}}
NAMES = ["fabric", "tile", "fabric", "wood"]
TOL = 1e-4


def _graph(make_model, demo_recipe, variant: str) -> DetectorGraph:
    model = make_model(with_cross=variant != "base", seed=3)
    if variant == "cross-image-path":
        model.context_source = "image_path"
    bank = AnchorBank(model, CLASSES, "synthetic")
    return DetectorGraph(model, bank, CAL, demo_recipe.model.image_size, demo_recipe.data.domain)


def _sidecar(path, fmt, demo_recipe):
    return write_sidecar(path, {
        "format": fmt, "classes": CLASSES, "image_size": demo_recipe.model.image_size, "mean": list(CLIP_MEAN),
        "std": list(CLIP_STD), "domain": demo_recipe.data.domain, "calibration": CAL,
    })


def _reference(graph: DetectorGraph, demo_recipe, images: torch.Tensor):
    """What `predict --run` computes: predict_batch with a fresh bank, then score_image per image."""
    bank = AnchorBank(graph.model, CLASSES, "synthetic")
    bank.freeze()
    with torch.no_grad():
        maps, det = predict_batch(graph.model, bank, images, NAMES, demo_recipe)
    scores = [score_image(maps[i], float(det[i]), CAL.get(c), "industrial")[0] for i, c in enumerate(NAMES)]
    return maps.numpy(), det.numpy(), np.asarray(scores)


@pytest.fixture
def images(demo_batch):
    return demo_batch["image"]


@pytest.mark.parametrize("variant", ["base", "cross-dpam", "cross-image-path"])
def test_exported_graph_equals_predict(variant, make_model, demo_recipe, images, tmp_path):
    graph = _graph(make_model, demo_recipe, variant)
    maps, det, scores = _reference(graph, demo_recipe, images)
    index = torch.tensor([CLASSES.index(c) for c in NAMES])
    with torch.no_grad():
        eager = [t.numpy() for t in graph(images, index)]
    # The eager graph is the protocol itself: identical, not just close.
    assert np.array_equal(eager[0], maps) and np.array_equal(eager[1], det)
    assert np.allclose(eager[3], scores, atol=1e-6, rtol=0)

    formats = ["onnx", "torchscript"] if variant != "cross-image-path" else ["onnx"]
    for fmt in formats:
        path = tmp_path / f"detector.{fmt}"
        (export_onnx if fmt == "onnx" else export_torchscript)(graph, path)
        if fmt == "onnx":
            onnx.checker.check_model(str(path), full_check=True)
        _sidecar(path, fmt, demo_recipe)
        detector = load_detector(path)
        out = detector.score(images.numpy(), NAMES)
        assert np.abs(out["raw_map"] - maps).max() <= TOL, fmt
        assert np.abs(out["raw_det"] - det).max() <= TOL, fmt
        assert np.abs(out["score"] - scores).max() <= TOL, fmt
        assert np.abs(out["map"] - eager[2]).max() <= TOL, fmt
        # Batch-mates do not matter and the batch dimension is free: one image alone, same result.
        alone = detector.score(images.numpy()[1:2], NAMES[1:2])
        assert np.abs(alone["raw_map"][0] - out["raw_map"][1]).max() <= TOL


def test_uncalibrated_class_scores_on_the_raw_scale(make_model, demo_recipe, images):
    graph = _graph(make_model, demo_recipe, "base")
    with torch.no_grad():
        raw_map, raw_det, nmap, score = graph(images, torch.tensor([1, 2, 1, 2]))  # tile, wood: no calibration
    assert torch.equal(nmap, raw_map)
    assert torch.allclose(score, 0.5 * raw_map.flatten(1).max(1).values + 0.5 * raw_det)


def test_int8_quantisation_keeps_the_graph_usable(make_model, demo_recipe, images, tmp_path):
    graph = _graph(make_model, demo_recipe, "base")
    fp32 = export_onnx(graph, tmp_path / "detector.onnx")
    int8 = quantize_int8(fp32, tmp_path / "detector.int8.onnx")
    onnx.checker.check_model(str(int8))
    ops = {n.op_type for n in onnx.load(str(int8)).graph.node}
    assert "MatMulInteger" in ops and "ConvInteger" not in ops  # only the matrix multiplications
    _sidecar(fp32, "onnx", demo_recipe)
    _sidecar(int8, "onnx", demo_recipe)
    a = load_detector(fp32).score(images.numpy(), NAMES)
    b = load_detector(int8).score(images.numpy(), NAMES)
    assert np.isfinite(b["raw_map"]).all()
    assert int8.stat().st_size < fp32.stat().st_size
    # Close to fp32 in ranking terms: the maps correlate strongly.
    assert np.corrcoef(a["raw_map"].ravel(), b["raw_map"].ravel())[0, 1] > 0.95


def test_blur_is_bit_identical_to_torchvision():
    x = torch.randn(3, 1, 37, 37) * 50
    for k, sigma in ((7, 1.0), (9, 1.5)):
        assert torch.equal(gaussian_blur(x, k, sigma), tv_blur(x, [k, k], [sigma, sigma]))


def test_preprocess_equals_load_image_tensor(demo_root):
    path = next((demo_root / "test").rglob("*.png"))
    x, picture = preprocess(path, 112, CLIP_MEAN, CLIP_STD)
    want = load_image_tensor(path, 112, CLIP_MEAN, CLIP_STD)
    assert np.array_equal(x, want.numpy())
    assert np.array_equal(picture, denormalise(want))


def test_sidecar_mismatch_and_absence_are_clear_errors(make_model, demo_recipe, tmp_path):
    graph = _graph(make_model, demo_recipe, "base")
    path = export_onnx(graph, tmp_path / "detector.onnx")
    with pytest.raises(AaclipError, match="detector.onnx.json is missing"):
        load_detector(path)
    side = _sidecar(path, "onnx", demo_recipe)
    doc = json.loads(side.read_text())
    side.write_text(json.dumps({**doc, "sha256": "0" * 64}))
    with pytest.raises(AaclipError, match="sha256 differs"):
        load_detector(path)
    side.write_text(json.dumps(doc))
    with pytest.raises(AaclipError, match="no class 'carpet'"):
        load_detector(path).score(np.zeros((1, 3, 112, 112), np.float32), ["carpet"])
    assert sidecar_of(path).name == "detector.onnx.json"


def test_scorer_imports_no_training_stack(make_model, demo_recipe, demo_root, tmp_path):
    """Score an image through ONNX Runtime in a fresh interpreter where importing torch, open_clip or
    mlflow fails: the runtime path must not touch them."""
    graph = _graph(make_model, demo_recipe, "base")
    path = export_onnx(graph, tmp_path / "detector.onnx")
    _sidecar(path, "onnx", demo_recipe)
    image = next((demo_root / "test" / "fabric").rglob("*.png"))
    code = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'open_clip', 'mlflow', 'torchvision'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
from aaclip_core.deploy.scorer import load_detector
d = load_detector({str(path)!r})
x, _ = d.preprocess({str(image)!r})
print(float(d.score(x[None], ['fabric'])['score'][0]))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert np.isfinite(float(res.stdout.strip()))


def test_predict_from_file_imports_no_open_clip_or_mlflow(make_model, demo_recipe, demo_root, tmp_path):
    """`predict --model FILE` (overlays, JSON lines) in a fresh interpreter where open_clip and mlflow
    cannot be imported."""
    graph = _graph(make_model, demo_recipe, "base")
    path = export_onnx(graph, tmp_path / "detector.onnx")
    _sidecar(path, "onnx", demo_recipe)
    images = demo_root / "test" / "fabric" / "test" / "good"
    code = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('open_clip', 'mlflow'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
from aaclip_core.deploy.predict import predict_with_file
out = predict_with_file({str(path)!r}, [{str(images)!r}], {str(tmp_path / 'out')!r}, threshold=0.5, class_name='fabric')
print(out['n_images'], out['n_errors'])
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    n, errors = map(int, res.stdout.split())
    assert n > 0 and errors == 0
    assert len(list((tmp_path / "out" / "overlays").rglob("*.png"))) == n


def test_image_of_a_class_not_in_the_file_gets_an_error_row(make_model, demo_recipe, demo_root, tmp_path):
    from aaclip_core.deploy.predict import predict_with_file

    model = make_model(seed=3)
    graph = DetectorGraph(model, AnchorBank(model, ["fabric"], "synthetic"), {}, demo_recipe.model.image_size,
                          demo_recipe.data.domain)
    path = export_onnx(graph, tmp_path / "detector.onnx")
    write_sidecar(path, {"format": "onnx", "classes": ["fabric"], "image_size": demo_recipe.model.image_size,
                         "mean": list(CLIP_MEAN), "std": list(CLIP_STD), "domain": demo_recipe.data.domain})
    disc = sorted((demo_root / "test" / "disc" / "test" / "good").glob("*.png"))[:1]
    fabric = sorted((demo_root / "test" / "fabric" / "test" / "good").glob("*.png"))[:1]
    out = predict_with_file(path, disc + fabric, tmp_path / "out", threshold=0.5)
    by_class = {r["class_name"]: r for r in out["rows"]}
    assert "export the run again with --class disc" in by_class["disc"]["error"]
    assert by_class["fabric"]["error"] is None and by_class["fabric"]["verdict"] in ("normal", "anomalous")
