"""Similarity maps and the reference evaluation protocol (SPEC §2, §5)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score
from torchvision.transforms.functional import gaussian_blur

from aaclip_core.evaluation.protocol import (
    ClassMaps,
    ClassResult,
    evaluate,
    image_scores,
    mean_over_classes,
    predict_batch,
    score_class,
)
from aaclip_core.model.similarity import patch_logits, training_probs
from aaclip_core.model.similarity import test_map as similarity_test_map
from aaclip_core.prompts.anchors import AnchorBank
from aaclip_core.training.data import load_samples, make_dataset, make_loader


def _unit(shape, seed):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def _anchors(b, e, seed):
    return F.normalize(torch.randn(b, e, 2, generator=torch.Generator().manual_seed(seed)), dim=1)


# ---------------------------------------------------------------------------- maps


def test_patch_logits_layout():
    patches = _unit((2, 9, 4), 0)
    anchors = _anchors(2, 4, 1)
    s = patch_logits(patches, anchors)
    assert s.shape == (2, 2, 3, 3)
    # Row-major grid: patch p -> (p // 3, p % 3); value 100 * <patch, anchor column>.
    assert torch.allclose(s[1, 1, 2, 0], 100 * patches[1, 6] @ anchors[1, :, 1])
    assert torch.allclose(s[0, 0, 0, 1], 100 * patches[0, 1] @ anchors[0, :, 0])
    with pytest.raises(ValueError, match="square"):
        patch_logits(_unit((1, 8, 4), 0), _anchors(1, 4, 0))


def test_training_probs_softmax_after_upsampling():
    patches = _unit((2, 16, 8), 2)
    anchors = _anchors(2, 8, 3)
    probs = training_probs(patches, anchors, 20)
    assert probs.shape == (2, 2, 20, 20)
    assert torch.allclose(probs.sum(dim=1), torch.ones(2, 20, 20), atol=1e-6)
    logits = F.interpolate(patch_logits(patches, anchors), size=20, mode="bilinear", align_corners=True)
    assert torch.allclose(probs, logits.softmax(dim=1), atol=1e-6)


@pytest.mark.parametrize("domain,k,sigma", [("industrial", 7, 1.0), ("medical", 9, 1.5)])
def test_test_map_manual_with_torchvision_blur(domain, k, sigma):
    patches = _unit((2, 25, 8), 4)
    anchors = _anchors(2, 8, 5)
    got = similarity_test_map(patches, anchors, 23, domain)
    s = 100 * torch.einsum("bpe,bec->bcp", patches, anchors).reshape(2, 2, 5, 5)
    score = (s[:, 1] + 1 - s[:, 0]) / 2  # no softmax
    blurred = gaussian_blur(score[:, None], [k, k], [sigma, sigma])
    want = F.interpolate(blurred, size=23, mode="bilinear", align_corners=True)[:, 0]
    assert got.shape == (2, 23, 23)
    assert torch.allclose(got, want, atol=1e-4)
    # align_corners=True: the corner pixels are exactly the blurred grid's corners.
    assert torch.allclose(got[:, 0, 0], blurred[:, 0, 0, 0], atol=1e-4)
    assert torch.allclose(got[:, -1, -1], blurred[:, 0, -1, -1], atol=1e-4)


@pytest.mark.parametrize("domain,k,sigma", [("industrial", 7, 1.0), ("medical", 9, 1.5)])
def test_test_map_blur_kernel_from_first_principles(domain, k, sigma):
    """A single abnormal patch on a 15x15 grid of normal ones: the map is the normal score plus
    100 x the 2-D Gaussian kernel (size k, std sigma) around it; the map is at grid resolution."""
    g = 15
    anchors = torch.eye(2)[None]  # normal e0, abnormal e1
    patches = torch.zeros(1, g * g, 2)
    patches[..., 0] = 1.0
    c = g // 2
    patches[0, c * g + c] = torch.tensor([0.0, 1.0])
    out = similarity_test_map(patches, anchors, g, domain)[0]
    # Normal patch: (0 + 1 - 100)/2 = -49.5; the abnormal one: (100 + 1 - 0)/2 = 50.5.
    x = torch.arange(k, dtype=torch.float64) - (k - 1) / 2
    k1 = torch.exp(-0.5 * (x / sigma) ** 2)
    k1 = k1 / k1.sum()
    r = k // 2
    expected = -49.5 + 100 * torch.outer(k1, k1)
    assert torch.allclose(out[c - r : c + r + 1, c - r : c + r + 1].double(), expected, atol=1e-3)
    # Beyond the kernel radius the map is the plain normal score.
    assert torch.allclose(out[0, 0], torch.tensor(-49.5), atol=1e-4)
    assert float(out[c, c + r + 1]) == pytest.approx(-49.5, abs=1e-4)


# ---------------------------------------------------------------------------- image scores


def _hand_class() -> ClassMaps:
    maps = torch.tensor([[[0.0, 2.0]], [[4.0, 1.0]], [[1.0, 1.0]]])  # [3, 1, 2]
    det = torch.tensor([0.2, 0.6, 0.4])
    masks = torch.tensor([[[False, True]], [[True, False]], [[False, False]]])
    labels = torch.tensor([1, 1, 0])
    return ClassMaps(maps=maps, det=det, masks=masks, labels=labels, indices=[0, 1, 2])


def test_image_scores_industrial_by_hand():
    maps, score = image_scores(_hand_class(), "industrial")
    # Maps min-max over the whole class (0..4): [0, .5], [1, .25], [.25, .25] -> max .5, 1, .25.
    assert torch.allclose(maps, torch.tensor([[[0.0, 0.5]], [[1.0, 0.25]], [[0.25, 0.25]]]))
    # det min-max (0.2..0.6): 0, 1, 0.5; score = 0.5 max + 0.5 det.
    assert torch.allclose(score, torch.tensor([0.25, 1.0, 0.375]))


def test_image_scores_medical_is_map_max():
    _, score = image_scores(_hand_class(), "medical")
    assert torch.allclose(score, torch.tensor([0.5, 1.0, 0.25]))


def test_image_scores_constant_detection_does_not_divide_by_zero():
    cm = _hand_class()
    cm.det = torch.full((3,), 0.7)
    _, score = image_scores(cm, "industrial")
    assert torch.all(torch.isfinite(score))
    assert torch.allclose(score, torch.tensor([0.25, 0.5, 0.125]))


def _random_class(seed: int, labels: list[int]) -> ClassMaps:
    g = torch.Generator().manual_seed(seed)
    n = len(labels)
    masks = torch.zeros(n, 12, 12, dtype=torch.bool)
    maps = torch.randn(n, 12, 12, generator=g)
    for i, lab in enumerate(labels):
        if lab:
            r, c = (int(v) for v in torch.randint(0, 8, (2,), generator=g))
            masks[i, r : r + 4, c : c + 3] = True
            maps[i][masks[i]] += 1.5  # informative but imperfect
    det = torch.rand(n, generator=g) + 0.3 * torch.tensor(labels, dtype=torch.float32)
    return ClassMaps(maps=maps * 7 + 3, det=det, masks=masks, labels=torch.tensor(labels), indices=list(range(n)))


def _f1_max_sklearn(y, s) -> float:
    p, r, _ = precision_recall_curve(y, s)
    f1 = np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-300), 0)
    return float(f1.max())


def test_score_class_equals_sklearn(demo_recipe):
    cm = _random_class(0, [0, 1, 0, 1, 1, 0, 1])
    res = score_class("c", cm, demo_recipe)
    maps, score = image_scores(cm, demo_recipe.data.domain)
    y_pix = cm.masks.flatten().numpy()
    s_pix = maps.flatten().numpy()
    y_img = cm.labels.numpy()
    s_img = score.numpy()
    assert res.n_images == 7 and res.n_anomalous == 4
    assert res.pixel_auroc == pytest.approx(roc_auc_score(y_pix, s_pix), abs=1e-9)
    assert res.pixel_ap == pytest.approx(average_precision_score(y_pix, s_pix), abs=1e-9)
    assert res.image_auroc == pytest.approx(roc_auc_score(y_img, s_img), abs=1e-9)
    assert res.image_ap == pytest.approx(average_precision_score(y_img, s_img), abs=1e-9)
    assert res.pixel_f1_max == pytest.approx(_f1_max_sklearn(y_pix, s_pix), abs=1e-6)
    assert res.image_f1_max == pytest.approx(_f1_max_sklearn(y_img, s_img), abs=1e-6)
    assert 0.5 < res.pixel_auroc < 1.0  # informative, not trivially perfect
    assert 0.0 < res.aupro <= 1.0


def test_single_label_class_gives_nan_not_zero(demo_recipe):
    normal_only = _random_class(1, [0, 0, 0])
    res = score_class("n", normal_only, demo_recipe)
    for m in ("pixel_auroc", "pixel_ap", "image_auroc", "image_ap", "aupro", "pixel_f1_max", "image_f1_max"):
        assert math.isnan(getattr(res, m)), m
    anomalous_only = _random_class(2, [1, 1, 1])
    res2 = score_class("a", anomalous_only, demo_recipe)
    assert math.isnan(res2.image_auroc) and math.isnan(res2.image_ap)
    assert not math.isnan(res2.pixel_auroc)  # pixels of both kinds exist


def _result(name, **metrics) -> ClassResult:
    base = dict(pixel_auroc=math.nan, pixel_ap=math.nan, image_auroc=math.nan, image_ap=math.nan,
                aupro=math.nan, pixel_f1_max=math.nan, image_f1_max=math.nan)
    base.update(metrics)
    return ClassResult(class_name=name, n_images=1, n_anomalous=0, **base)


def test_mean_over_classes_skips_nan():
    results = [
        _result("a", pixel_auroc=0.9, image_auroc=0.6),
        _result("b", pixel_auroc=0.7),
        _result("c", pixel_auroc=0.8, image_auroc=0.8),
    ]
    mean = mean_over_classes(results)
    assert mean["pixel_auroc"] == pytest.approx(0.8)
    assert mean["image_auroc"] == pytest.approx(0.7)  # (0.6 + 0.8) / 2, not / 3
    assert math.isnan(mean["pixel_ap"])


# ---------------------------------------------------------------------------- with the model


def test_predict_batch_is_independent_of_batch_mates(make_model, demo_recipe, demo_batch):
    model = make_model()
    assert demo_recipe.fidelity == "official"
    bank = AnchorBank(model, demo_batch["class_name"], demo_recipe.data.train.name)
    bank.freeze()
    images, classes = demo_batch["image"], demo_batch["class_name"]
    assert images.shape[0] == 4
    maps, det = predict_batch(model, bank, images, classes, demo_recipe)
    size = demo_recipe.model.image_size
    assert maps.shape == (4, size, size) and det.shape == (4,)
    assert torch.all((det >= 0) & (det <= 1))
    for i in range(4):
        m1, d1 = predict_batch(model, bank, images[i : i + 1], classes[i : i + 1], demo_recipe)
        assert torch.allclose(m1[0], maps[i], atol=1e-5, rtol=0)
        assert torch.allclose(d1[0], det[i], atol=1e-5, rtol=0)


def test_predict_batch_with_cross_attention_is_independent(make_model, demo_recipe, demo_batch):
    """The cross-attention model conditions anchors on each image (official DPAM context): still
    no image may see its batch-mates (SPEC §6 pitfalls)."""
    model = make_model(with_cross=True)
    assert model.conditions_text
    bank = AnchorBank(model, demo_batch["class_name"], demo_recipe.data.train.name)
    images, classes = demo_batch["image"], demo_batch["class_name"]
    maps, det = predict_batch(model, bank, images, classes, demo_recipe)
    for i in (0, 3):
        m1, d1 = predict_batch(model, bank, images[i : i + 1], classes[i : i + 1], demo_recipe)
        assert torch.allclose(m1[0], maps[i], atol=1e-4, rtol=0)
        assert torch.allclose(d1[0], det[i], atol=1e-5, rtol=0)


def test_evaluate_end_to_end_matches_per_image_protocol(make_model, demo_recipe):
    """evaluate() over a loader whose batches straddle classes equals the protocol computed image
    by image, class by class, with sklearn."""
    samples = load_samples(demo_recipe.data.test, demo_recipe.runtime.seed)
    picked = []
    for c in ("disc", "plank"):
        cls = [s for s in samples if s.class_name == c]
        picked += [s for s in cls if s.label == 0][:2] + [s for s in cls if s.label == 1][:2]
    ds = make_dataset(picked, demo_recipe, "none")
    loader = make_loader(ds, 3, False, demo_recipe, None)
    model = make_model()
    bank = AnchorBank(model, [s.class_name for s in picked], "synthetic")
    report = evaluate(model, bank, loader, demo_recipe, torch.device("cpu"), sample_paths=[str(s.image_path) for s in picked])
    assert [r.class_name for r in report.classes] == ["disc", "plank"]
    assert [(r.n_images, r.n_anomalous) for r in report.classes] == [(4, 2), (4, 2)]
    assert len(report.image_scores) == 8
    for r in report.classes:
        idx = [i for i, s in enumerate(picked) if s.class_name == r.class_name]
        items = [ds[i] for i in idx]
        maps, dets = zip(*(predict_batch(model, bank, it["image"][None], [r.class_name], demo_recipe) for it in items))
        maps = torch.cat(maps)
        dets = torch.cat(dets)
        masks = torch.stack([it["mask"][0] > 0.5 for it in items])
        labels = np.array([int(it["label"]) for it in items])
        nm = (maps - maps.min()) / (maps.max() - maps.min())
        nd = (dets - dets.min()) / (dets.max() - dets.min())
        score = 0.5 * nm.flatten(1).max(1).values + 0.5 * nd
        assert r.pixel_auroc == pytest.approx(roc_auc_score(masks.flatten().numpy(), nm.flatten().numpy()), abs=1e-4)
        assert r.image_auroc == pytest.approx(roc_auc_score(labels, score.numpy()), abs=1e-6)
        assert r.image_ap == pytest.approx(average_precision_score(labels, score.numpy()), abs=1e-6)
    for m in ("pixel_auroc", "image_auroc"):
        assert report.mean[m] == pytest.approx(np.mean([getattr(r, m) for r in report.classes]))


def test_pixel_pair_counts_give_exact_pixel_auroc_for_any_resample():
    """The stored pair counts reproduce sklearn's pixel AUROC on the images and on a resample."""
    from aaclip_core.evaluation.pixel_pairs import pixel_pairs

    g = torch.Generator().manual_seed(3)
    maps = (torch.rand(7, 12, 12, generator=g) * 10).round() / 10  # many ties
    masks = torch.rand(7, 12, 12, generator=g) > 0.85
    masks[4:] = False  # three normal images
    pp = pixel_pairs(maps, masks)
    assert pp.auroc() == pytest.approx(roc_auc_score(masks.flatten().numpy(), maps.flatten().numpy()), abs=1e-12)
    w = np.array([2, 0, 1, 3, 1, 0, 2], dtype=float)
    idx = np.repeat(np.arange(7), w.astype(int))
    expected = roc_auc_score(masks[idx].flatten().numpy(), maps[idx].flatten().numpy())
    assert pp.auroc(w) == pytest.approx(expected, abs=1e-12)


def test_pixel_pairs_round_trip_without_pickle(tmp_path):
    from aaclip_core.evaluation.pixel_pairs import load_pixel_pairs, pixel_pairs, save_pixel_pairs

    maps = torch.rand(3, 5, 5)
    masks = torch.zeros(3, 5, 5, dtype=torch.bool)
    masks[0, 1:3, 1:3] = True
    pp = pixel_pairs(maps, masks)
    save_pixel_pairs(tmp_path / "p.npz", {"bottle": (["a.png", "b.png", "c.png"], pp)})
    paths, back = load_pixel_pairs(tmp_path / "p.npz")["bottle"]
    assert paths == ["a.png", "b.png", "c.png"]
    np.testing.assert_array_equal(back.counts, pp.counts)
    np.testing.assert_array_equal(back.pos, pp.pos)
