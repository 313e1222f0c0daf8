"""Training losses against numbers worked out by hand (SPEC §3-4)."""

from __future__ import annotations

import math

import pytest
import torch

from aaclip_core.training.losses import detection_loss, dice_loss, focal_loss, orthogonality_loss, segmentation_loss


def _two_pixels():
    """One image, 1x2 pixels. Pixel A: p = (normal 0.8, abnormal 0.2), mask 0.
    Pixel B: p = (0.3, 0.7), mask 1."""
    probs = torch.tensor([[[[0.8, 0.3]], [[0.2, 0.7]]]], dtype=torch.float64)  # [1, 2, 1, 2]
    mask = torch.tensor([[[[0.0, 1.0]]]], dtype=torch.float64)  # [1, 1, 1, 2]
    return probs, mask


# Focal loss by hand (gamma 2, smooth 1e-5, 2 classes so the clamp floor is 1e-5 / (2-1)):
#   A: target (1, 0) -> clamped (1 - 1e-5, 1e-5)
#      pt = 0.8 (1 - 1e-5) + 0.2e-5 + 1e-5 = 0.800004
#      -(1 - 0.800004)^2 ln 0.800004 = 0.039998400016 * 0.2231385... = 0.0089251850
#   B: target (0, 1) -> clamped (1e-5, 1 - 1e-5)
#      pt = 0.3e-5 + 0.7 (1 - 1e-5) + 1e-5 = 0.700006
#      -(1 - 0.700006)^2 ln 0.700006 = 0.089996400036 * 0.3566663... = 0.0320986895
#   mean = 0.0205119373
FOCAL_BY_HAND = 0.0205119373

# Dice (smooth 1):
#   normal channel (0.8, 0.3) vs 1 - mask (1, 0): (2*0.8 + 1) / (1.1 + 1 + 1) = 2.6/3.1 -> 1 - . = 0.5/3.1
#   abnormal channel (0.2, 0.7) vs mask (0, 1):   (2*0.7 + 1) / (0.9 + 1 + 1) = 2.4/2.9 -> 1 - . = 0.5/2.9
DICE_NORMAL_BY_HAND = 0.5 / 3.1
DICE_ABNORMAL_BY_HAND = 0.5 / 2.9


def test_focal_loss_two_pixels_by_hand():
    probs, mask = _two_pixels()
    assert float(focal_loss(probs, mask)) == pytest.approx(FOCAL_BY_HAND, abs=1e-9)
    # Same number from the formula written out once more.
    pts = [0.8 * (1 - 1e-5) + 0.2 * 1e-5 + 1e-5, 0.3 * 1e-5 + 0.7 * (1 - 1e-5) + 1e-5]
    assert float(focal_loss(probs, mask)) == pytest.approx(
        sum(-((1 - p) ** 2) * math.log(p) for p in pts) / 2, rel=1e-12
    )


def test_focal_loss_gamma_and_perfect_prediction():
    probs, mask = _two_pixels()
    # gamma 0 is cross-entropy on the smoothed pt.
    ce = -(math.log(0.800004) + math.log(0.700006)) / 2
    assert float(focal_loss(probs, mask, gamma=0.0)) == pytest.approx(ce, rel=1e-9)
    perfect = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]], dtype=torch.float64)
    # pt = 1 - 1e-5 + 1e-5 = 1 exactly -> loss 0.
    assert float(focal_loss(perfect, mask)) == pytest.approx(0.0, abs=1e-12)
    worst = 1 - perfect
    assert float(focal_loss(worst, mask)) > 5.0


def test_dice_loss_by_hand():
    pred = torch.tensor([[0.5, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    target = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    # Image 0: (2*1.5 + 1) / (1.5 + 2 + 1) = 4/4.5; image 1 (empty both): (0 + 1)/(0 + 0 + 1) = 1.
    expected = 1 - (4 / 4.5 + 1.0) / 2
    assert float(dice_loss(pred, target)) == pytest.approx(expected, rel=1e-6)
    # The smooth term is what keeps an empty image at loss 0.
    assert float(dice_loss(pred[1:], target[1:])) == pytest.approx(0.0, abs=1e-7)
    assert float(dice_loss(pred[:1], target[:1], smooth=0.0)) == pytest.approx(1 - 3 / 3.5, rel=1e-6)


def test_segmentation_loss_is_focal_plus_two_dice_terms():
    probs, mask = _two_pixels()
    total = float(segmentation_loss(probs, mask))
    assert total == pytest.approx(FOCAL_BY_HAND + DICE_NORMAL_BY_HAND + DICE_ABNORMAL_BY_HAND, abs=1e-9)
    assert total == pytest.approx(0.3542159, abs=1e-6)


def test_segmentation_loss_composition_on_random_maps():
    g = torch.Generator().manual_seed(0)
    probs = torch.randn(3, 2, 8, 8, generator=g).softmax(dim=1)
    mask = (torch.rand(3, 1, 8, 8, generator=g) > 0.7).float()
    expected = focal_loss(probs, mask) + dice_loss(probs[:, 0], 1 - mask[:, 0]) + dice_loss(probs[:, 1], mask[:, 0])
    assert torch.allclose(segmentation_loss(probs, mask), expected)


def test_orthogonality_loss_by_hand():
    anchors = torch.zeros(2, 2, 2)
    anchors[0, :, 0] = torch.tensor([1.0, 0.0])
    anchors[0, :, 1] = torch.tensor([0.6, 0.8])  # <n, a> = 0.6
    anchors[1, :, 0] = torch.tensor([0.0, 1.0])
    anchors[1, :, 1] = torch.tensor([0.0, 1.0])  # <n, a> = 1
    # (mean(0.6, 1))^2 = 0.64: the square of the mean, not the mean of squares (0.68).
    assert float(orthogonality_loss(anchors)) == pytest.approx(0.64, abs=1e-6)
    anchors[1, :, 1] = torch.tensor([1.0, 0.0])  # orthogonal -> dots 0.6, 0
    assert float(orthogonality_loss(anchors)) == pytest.approx(0.09, abs=1e-6)


def test_detection_loss_by_hand():
    det = torch.tensor([[1.0, 0.0]])
    anchors = torch.tensor([[[0.6, 0.8], [0.8, 0.6]]])  # [B=1, E=2, 2]: normal (0.6, 0.8), abnormal (0.8, 0.6)
    # logits = det @ T = (0.6, 0.8), unscaled; label 1 -> -0.8 + log(e^0.6 + e^0.8) = log(1 + e^-0.2)
    expected = math.log(1 + math.exp(-0.2))
    assert float(detection_loss(det, anchors, torch.tensor([1]))) == pytest.approx(expected, rel=1e-6)
    assert float(detection_loss(det, anchors, torch.tensor([0]))) == pytest.approx(math.log(1 + math.exp(0.2)), rel=1e-6)


def test_detection_loss_uses_each_images_anchors():
    det = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    anchors = torch.tensor([[[0.0, 1.0], [1.0, 0.0]], [[1.0, 0.0], [0.0, 1.0]]])
    # Image 0 logits (0, 1), image 1 logits (0, 1): both favour class 1.
    labels = torch.tensor([1, 1])
    expected = math.log(1 + math.exp(-1.0))
    assert float(detection_loss(det, anchors, labels)) == pytest.approx(expected, rel=1e-6)


# ---------------------------------------------------------------------------- stage losses on the model


def _stage_setup(make_model, recipe, demo_batch):
    from aaclip_core.prompts.anchors import AnchorBank

    model = make_model(recipe)
    bank = AnchorBank(model, demo_batch["class_name"], recipe.data.train.name)
    return model, bank


def test_stage1_loss_official_counts_last_level_only(make_model, demo_recipe, demo_batch):
    from aaclip_core.model.similarity import training_probs
    from aaclip_core.training.engine import stage1_loss

    assert demo_recipe.fidelity == "official"
    model, bank = _stage_setup(make_model, demo_recipe, demo_batch)
    images, masks, classes = demo_batch["image"], demo_batch["mask"], demo_batch["class_name"]
    with torch.no_grad():
        got = stage1_loss(model, bank, demo_recipe, images, masks, classes)
        feats = model.stage1_features(images)
        anchors = bank.anchors(classes)
        size = demo_recipe.model.image_size
        last = segmentation_loss(training_probs(feats[-1], anchors, size), masks)
        first = segmentation_loss(training_probs(feats[0], anchors, size), masks)
        orth = orthogonality_loss(anchors)
    assert float(got) == pytest.approx(float(last + 0.1 * orth), rel=1e-5)
    assert abs(float(first - last)) > 1e-4  # the levels really differ, so the check above means something


def test_stage1_loss_corrected_sums_all_levels(make_model, demo_overrides, demo_batch):
    from aaclip_core.model.similarity import training_probs
    from aaclip_core.recipe import load_recipe
    from aaclip_core.training.engine import stage1_loss

    recipe = load_recipe("demo", [*demo_overrides, 'fidelity="corrected"'])[0]
    model, bank = _stage_setup(make_model, recipe, demo_batch)
    images, masks, classes = demo_batch["image"], demo_batch["mask"], demo_batch["class_name"]
    with torch.no_grad():
        got = stage1_loss(model, bank, recipe, images, masks, classes)
        feats = model.stage1_features(images)
        anchors = bank.anchors(classes)
        seg = sum(segmentation_loss(training_probs(f, anchors, recipe.model.image_size), masks) for f in feats)
        expected = seg + recipe.stage1.text_norm_weight * orthogonality_loss(anchors)
    assert len(feats) == 4
    assert float(got) == pytest.approx(float(expected), rel=1e-5)


def test_stage2_loss_is_detection_plus_every_level(make_model, demo_recipe, demo_batch):
    from aaclip_core.model.similarity import training_probs
    from aaclip_core.training.engine import stage2_loss

    model, bank = _stage_setup(make_model, demo_recipe, demo_batch)
    images, masks, labels, classes = (demo_batch[k] for k in ("image", "mask", "label", "class_name"))
    with torch.no_grad():
        got = stage2_loss(model, bank, demo_recipe, images, masks, labels, classes)
        seg, det = model.encode_image(images)
        anchors = bank.anchors(classes)
        expected = detection_loss(det, anchors, labels) + sum(
            segmentation_loss(training_probs(f, anchors, demo_recipe.model.image_size), masks) for f in seg
        )
    assert float(got) == pytest.approx(float(expected), rel=1e-5)
