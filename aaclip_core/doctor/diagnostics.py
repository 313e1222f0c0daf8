"""Measurements behind `doctor`: the gradient-dilution probe (SPEC §6, §10)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from aaclip_core.model import AACLIP
from aaclip_core.prompts.anchors import AnchorBank
from aaclip_core.recipe import Recipe
from aaclip_core.training.engine import stage2_loss
from aaclip_core.training.groups import grad_norms, set_trainable


@dataclass
class DilutionProbe:
    image_weight: float
    norm_with: float  # image-adapter gradient norm with image cross-attention
    norm_without: float  # ... and without, same weights, same batch
    cross_share: float  # the cross-attention's share of the stage-2 gradient (squared norms)

    @property
    def ratio(self) -> float:
        return self.norm_with / self.norm_without if self.norm_without > 0 else float("nan")


def _stage2_grads(model: AACLIP, bank: AnchorBank, recipe: Recipe, batch: dict) -> dict[str, float]:
    model.zero_grad(set_to_none=True)
    loss = stage2_loss(model, bank, recipe, batch["image"], batch["mask"], batch["label"], list(batch["class_name"]))
    loss.backward()
    norms = grad_norms(model)
    model.zero_grad(set_to_none=True)
    return norms


def gradient_dilution_probe(model: AACLIP, bank: AnchorBank, recipe: Recipe, batch: dict) -> DilutionProbe:
    """Run one stage-2 batch with and without the image cross-attention from the same weights and
    compare the image adapters' gradient norms. Dropout is off so the two passes differ only in
    the module under test. The model's switches and trainable flags are restored afterwards."""
    if model.image_cross_attn is None:
        raise ValueError("the model has no image cross-attention to probe")
    was = model.modes
    bank.freeze()
    try:
        set_trainable(model, 2)
        model.train(False)
        model.set_modes(replace(was, image_cross=True))
        with_ca = _stage2_grads(model, bank, recipe, batch)
        model.set_modes(replace(was, image_cross=False))
        without = _stage2_grads(model, bank, recipe, batch)
    finally:
        model.set_modes(was)
        for p in model.parameters():
            p.requires_grad_(False)
    total_sq = sum(v**2 for k, v in with_ca.items())
    cross_sq = with_ca.get("image_cross_attn", 0.0) ** 2
    return DilutionProbe(
        image_weight=float(model.image_cross_attn.weight),
        norm_with=with_ca.get("image_adapters", 0.0),
        norm_without=without.get("image_adapters", 0.0),
        cross_share=cross_sq / total_sq if total_sq > 0 else 0.0,
    )
