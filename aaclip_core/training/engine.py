"""The two training stages as plain loops over a loader (SPEC §3-4, §7).

Optimiser, scheduler and clipping are passed in, so the base recipe (Adam, MultiStepLR) and the
feedback schedule (AdamW, warm-up + cosine, clipping) share one implementation of each stage.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import DataLoader

from aaclip_core import distributed
from aaclip_core.compute import autocast
from aaclip_core.errors import TrainingDiverged
from aaclip_core.model import AACLIP
from aaclip_core.model.similarity import training_probs
from aaclip_core.prompts.anchors import AnchorBank
from aaclip_core.recipe import Recipe
from aaclip_core.training.groups import grad_norms, set_trainable
from aaclip_core.training.losses import LossTerms, anchor_dots, detection_per_sample

# progress(stage, epoch, epochs, batch, batches, loss)
ProgressFn = Callable[[str, int, int, int, int, float], None]
# epoch_end(stage, epoch, epochs, mean loss, lr)
EpochFn = Callable[[str, int, int, float, float], None]
# log(metrics, step)
LogFn = Callable[[dict[str, float], int], None]


@dataclass
class StageHistory:
    losses: list[float] = field(default_factory=list)
    # Loss on a fixed, un-augmented probe batch before the stage (index 0) and after each epoch:
    # a paired measurement of whether the stage lowers its objective, free of augmentation noise.
    probe_losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    grad_norms: list[dict[str, float]] = field(default_factory=list)


@dataclass
class StageSchedule:
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    grad_clip: float | None = None


def _batch_to(batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    return (
        batch["image"].to(device, non_blocking=True),
        batch["mask"].to(device, non_blocking=True),
        batch["label"].to(device, non_blocking=True),
        list(batch["class_name"]),
    )


def _step(loss: torch.Tensor, model: AACLIP, params: list, schedule: StageSchedule) -> dict[str, float]:
    schedule.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    norms = grad_norms(model)
    if schedule.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(params, schedule.grad_clip)
    schedule.optimizer.step()
    if schedule.scheduler is not None:
        schedule.scheduler.step()
    return norms


def cross_weights(model: AACLIP) -> dict[str, float]:
    """Current cross-attention residual weights (fixed or learnable), for logging."""
    out = {}
    for key, mod in (("cross/text_weight", model.text_cross_attn), ("cross/image_weight", model.image_cross_attn)):
        if mod is not None:
            out[key] = float(mod.weight.detach())
    return out


def _mean_dicts(ds: list[dict[str, float]]) -> dict[str, float]:
    keys = {k for d in ds for k in d}
    return {k: sum(d[k] for d in ds if k in d) / sum(1 for d in ds if k in d) for k in sorted(keys)}


def stage1_terms(model: AACLIP, bank: AnchorBank, recipe: Recipe, images, masks, class_names) -> LossTerms:
    """Segmentation loss of frozen image features against trainable text anchors + orthogonality.

    The image features come from where the model's modes say (``context_source``): the DPAM path,
    or, from feedback loop 2 on, the trained image path. ``official`` counts only the last level's
    segmentation term (the reference overwrote the loss in its level loop); ``corrected`` sums all
    levels. One orthogonality term either way.
    """
    dpam = model.context_source == "dpam"
    feats = model.stage1_features(images) if dpam else model.image_path_features(images)
    context = None
    if model.conditions_text:
        # The official DPAM features mix batch-mates (the reproduced quirk, loss features only);
        # the cross-attention context is each image's own, exactly as in stage 2 and at test.
        mixed = dpam and model.fidelity == "official"
        context = model.anchor_context(images) if mixed else feats[0]
    anchors = bank.anchors(class_names, context)
    size = recipe.model.image_size
    terms = LossTerms()
    for f in feats[-1:] if recipe.fidelity == "official" else feats:
        terms.add_segmentation(training_probs(f, anchors, size), masks)
    terms.squared.append((recipe.stage1.text_norm_weight, anchor_dots(anchors)))
    return terms


def stage2_terms(model: AACLIP, bank: AnchorBank, recipe: Recipe, images, masks, labels, class_names) -> LossTerms:
    """Detection cross-entropy + the segmentation loss of every level (SPEC §4)."""
    with torch.no_grad():
        context = model.anchor_context(images) if model.conditions_text else None
        anchors = bank.anchors(class_names, context)
    text_ctx = bank.text_context(class_names) if model.image_cross_attn is not None and model.use_image_cross else None
    seg, det = model.encode_image(images, text_ctx)
    terms = LossTerms(added=[detection_per_sample(det, anchors, labels)])
    size = recipe.model.image_size
    for f in seg:
        terms.add_segmentation(training_probs(f, anchors, size), masks)
    return terms


def _local_loss(terms: LossTerms) -> torch.Tensor:
    values = terms.values()
    return terms.loss(values.mean(dim=0))


def stage1_loss(model: AACLIP, bank: AnchorBank, recipe: Recipe, images, masks, class_names) -> torch.Tensor:
    """The stage-1 loss of one batch in this process (see `stage1_terms`)."""
    return _local_loss(stage1_terms(model, bank, recipe, images, masks, class_names))


def stage2_loss(model: AACLIP, bank: AnchorBank, recipe: Recipe, images, masks, labels, class_names) -> torch.Tensor:
    """The stage-2 loss of one batch in this process (see `stage2_terms`)."""
    return _local_loss(stage2_terms(model, bank, recipe, images, masks, labels, class_names))


def stage_loss(stage: int, model: AACLIP, bank: AnchorBank, recipe: Recipe, batch: dict, device: torch.device
               ) -> torch.Tensor:
    """The loss a stage optimises on one loader batch, under the recipe's precision.

    The batch may be this rank's share of a global batch (its ``weight`` marks padding samples
    with 0): the loss is then the global batch's, from means reduced over all ranks.
    """
    images, masks, labels, classes = _batch_to(batch, device)
    weights = batch.get("weight")
    weights = torch.ones(len(classes), device=device) if weights is None else weights.to(device)
    with autocast(device, recipe.runtime.precision):
        if stage == 1:
            terms = stage1_terms(model, bank, recipe, images, masks, classes)
        else:
            terms = stage2_terms(model, bank, recipe, images, masks, labels, classes)
    return terms.loss(distributed.batch_means(terms.values(), weights))


class StageObjective(nn.Module):
    """One stage's loss as a module, so DistributedDataParallel can wrap it: DDP needs the forward
    pass to go through its wrapper to synchronise the gradients of the backward pass."""

    def __init__(self, stage: int, model: AACLIP, bank: AnchorBank, recipe: Recipe, device: torch.device) -> None:
        super().__init__()
        self.model = model
        self.stage, self.bank, self.recipe, self.device = stage, bank, recipe, device

    def forward(self, batch: dict) -> torch.Tensor:
        return stage_loss(self.stage, self.model, self.bank, self.recipe, batch, self.device)


def _switched_off(model: AACLIP, stage: int) -> bool:
    if stage == 1:
        return model.text_cross_attn is not None and not model.use_text_cross
    return model.image_cross_attn is not None and not model.use_image_cross


def synchronised(objective: StageObjective, device: torch.device) -> nn.Module:
    """The objective wrapped in DDP over the stage's trainable parameters only (adapters,
    projections, cross-attention): the frozen backbone is neither broadcast nor all-reduced."""
    if not distributed.active():
        return objective
    from torch.nn.parallel import DistributedDataParallel

    frozen = [f"model.{n}" for n, p in objective.model.named_parameters() if not p.requires_grad]
    frozen += [f"model.{n}" for n, _ in objective.model.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(objective, frozen)
    return DistributedDataParallel(
        objective,
        device_ids=[device.index] if device.type == "cuda" else None,
        # A cross-attention module switched off for a loop is trainable but unused.
        find_unused_parameters=_switched_off(objective.model, objective.stage),
    )


@torch.no_grad()
def probe_loss(stage: int, model: AACLIP, bank: AnchorBank, recipe: Recipe, batch: dict, device: torch.device
               ) -> float:
    """The stage's loss on a fixed batch, in eval mode (no dropout, no random draws)."""
    was_training = model.training
    model.train(False)
    images, masks, labels, classes = _batch_to(batch, device)
    try:
        with autocast(device, recipe.runtime.precision):
            if stage == 1:
                return float(stage1_loss(model, bank, recipe, images, masks, classes))
            return float(stage2_loss(model, bank, recipe, images, masks, labels, classes))
    finally:
        model.train(was_training)


def run_stage(
    stage: int,
    model: AACLIP,
    bank: AnchorBank,
    loader: DataLoader,
    schedule: StageSchedule,
    epochs: int,
    recipe: Recipe,
    device: torch.device,
    *,
    augment_epoch_base: int = 0,
    log: LogFn | None = None,
    progress: ProgressFn | None = None,
    epoch_end: EpochFn | None = None,
    probe_batch: dict | None = None,
) -> StageHistory:
    """Train one stage for ``epochs`` epochs; logs loss, lr and gradient norms per epoch."""
    params = set_trainable(model, stage)
    # Gradients left from the other stage would otherwise be counted in this stage's norms.
    model.zero_grad(set_to_none=True)
    model.train(True)
    if stage == 1:
        bank.unfreeze()
    else:
        bank.freeze()
    objective = synchronised(StageObjective(stage, model, bank, recipe, device), device)
    name = f"stage{stage}"
    hist = StageHistory()

    def probe(epoch: int) -> None:
        if probe_batch is None or not distributed.is_main():
            return
        value = probe_loss(stage, model, bank, recipe, probe_batch, device)
        hist.probe_losses.append(value)
        if log is not None:
            log({f"{name}/probe_loss": value}, epoch)

    try:
        probe(0)
        for epoch in range(epochs):
            # Augmentation draws depend only on (seed, epoch id, index): reproducible and resumable.
            if hasattr(loader.dataset, "set_epoch"):
                loader.dataset.set_epoch(augment_epoch_base + epoch + 1)
            losses: list[float] = []
            norms: list[dict[str, float]] = []
            for b, batch in enumerate(loader):
                loss = objective(batch)
                if not torch.isfinite(loss):
                    raise TrainingDiverged(
                        f"The {name} loss became {loss.item()} at epoch {epoch + 1}, batch {b + 1}: training "
                        f"diverged. Lower the learning rate (stage{stage}.lr, or feedback."
                        f"{'text' if stage == 1 else 'image'}_lr for feedback runs), or use runtime.precision"
                        " = \"fp32\" if it runs in reduced precision."
                    )
                norms.append(_step(loss, model, params, schedule))
                losses.append(float(loss.detach()))
                if progress is not None:
                    progress(name, epoch + 1, epochs, b + 1, len(loader), losses[-1])
            lr = schedule.optimizer.param_groups[0]["lr"]
            epoch_loss = sum(losses) / max(len(losses), 1)
            epoch_norms = _mean_dicts(norms)
            hist.losses.append(epoch_loss)
            hist.lrs.append(lr)
            hist.grad_norms.append(epoch_norms)
            if log is not None:
                metrics = {f"{name}/loss": epoch_loss, f"{name}/lr": lr}
                metrics.update({f"{name}/grad_norm/{k}": v for k, v in epoch_norms.items()})
                metrics.update(cross_weights(model))
                log(metrics, epoch + 1)
            if epoch_end is not None:
                epoch_end(name, epoch + 1, epochs, epoch_loss, lr)
            probe(epoch + 1)
    finally:
        model.train(False)
        for p in model.parameters():
            p.requires_grad_(False)
    return hist
