"""`doctor --probe`: the gradient-dilution probe on a run's selected checkpoint, judged at the weights
its cross-attention was introduced on."""

from __future__ import annotations

from pathlib import Path

from aaclip_core.checkpoints.checkpoint import checkpoint_name
from aaclip_core.doctor.checks import PROBE_IMAGES, PROBE_RATIO_FAIL, PROBE_SHARE_FAIL, Check
from aaclip_core.errors import AaclipError
from aaclip_core.recipe import Recipe
from aaclip_core.record import Stage, Tag


def _probe_batch(samples, recipe: Recipe):
    from aaclip_core.training.data import fixed_batch

    half = PROBE_IMAGES // 2
    anomalous = [s for s in samples if s.label == 1]
    normal = [s for s in samples if s.label == 0]
    picked = anomalous[:half] + normal[: PROBE_IMAGES - min(half, len(anomalous))]
    picked = picked[:PROBE_IMAGES] or samples[:PROBE_IMAGES]
    return fixed_batch(picked, recipe), picked


def probe_checks(mlflow, run, recipe: Recipe | None, workdir: Path) -> list[Check]:
    from aaclip_core.checkpoints.from_run import default_checkpoint, model_from_checkpoint, run_checkpoint
    from aaclip_core.compute import select_device
    from aaclip_core.doctor.diagnostics import gradient_dilution_probe
    from aaclip_core.prompts.anchors import AnchorBank
    from aaclip_core.prompts.names import checkpoint_namer
    from aaclip_core.training.data import load_samples

    run_id = run.info.run_id
    names = ("probe: gradient-dilution ratio", "probe: cross-attention gradient share")
    if recipe is None:
        return [Check(n, "skip", None, "the run has no recipe.json to rebuild its model from") for n in names]
    try:
        ckpt_name = default_checkpoint(mlflow, run_id)
        ckpt = run_checkpoint(mlflow, run_id, ckpt_name, workdir)
    except AaclipError as exc:
        return [Check(names[0], "fail", None, f"cannot load the run's checkpoint: {exc}", "train the run to the end")]
    if not ckpt.info.cross_attention:
        return [Check(n, "skip", None, f"checkpoint '{ckpt_name}' has no cross-attention: nothing to probe")
                for n in names]
    try:
        device = select_device(recipe.runtime.device)
        trained = model_from_checkpoint(recipe, ckpt, device)
        model, origin = _introduction_model(mlflow, run, recipe, device, workdir)
        samples = load_samples(recipe.data.train, recipe.runtime.seed)
        batch, picked = _probe_batch(samples, recipe)
    except AaclipError as exc:
        return [Check(names[0], "fail", None, f"cannot set up the probe: {exc}",
                      "fix the weights / data checks above (--set data.train.root=PATH)")]
    batch = {k: (v.to(device) if hasattr(v, "to") else v) for k, v in batch.items()}
    prompt_names = checkpoint_namer(recipe, recipe.data.train, ckpt.manifest)  # the names it was trained with
    probe = gradient_dilution_probe(model, AnchorBank(model, batch["class_name"], prompt_names), recipe, batch)
    at_trained = gradient_dilution_probe(trained, AnchorBank(trained, batch["class_name"], prompt_names), recipe, batch)
    # With trained weights, switching the cross-attention off moves the model off the distribution it
    # was trained on (larger loss, larger gradients), which confounds the ratio; so the verdict is
    # taken where the starvation starts: the weights the cross-attention was introduced on.
    where = (f"measured at {origin} with image_cross_attn_weight {probe.image_weight:g} (aaclip: cross.image_weight) on {len(picked)} training "
             f"images ({sum(s.label for s in picked)} anomalous); the ratio at the trained checkpoint '{ckpt_name}' is "
             f"its own check (the share there: {100 * at_trained.cross_share:.1f} %)")
    fix = "--set cross.image_weight=0.1 and train again (SPEC §6)"
    ratio = probe.ratio
    detail = (f"image-adapter gradient norm {probe.norm_with:.4g} with / {probe.norm_without:.4g} without the image "
              f"cross-attention = {ratio:.3f} (fails < {PROBE_RATIO_FAIL}); {where}")
    out = [Check(names[0], "fail" if not ratio >= PROBE_RATIO_FAIL else "pass", ratio, detail,
                 fix if not ratio >= PROBE_RATIO_FAIL else "")]
    share = probe.cross_share
    detail = (f"the image cross-attention holds {100 * share:.1f} % of the stage-2 gradient (squared norms; fails > "
              f"{100 * PROBE_SHARE_FAIL:.0f} %: the ratio alone is unreliable on small backbones); {where}")
    out.append(Check(names[1], "fail" if share > PROBE_SHARE_FAIL else "pass", share, detail,
                     fix if share > PROBE_SHARE_FAIL else ""))
    trained = at_trained.ratio
    detail = (f"image-adapter gradient norm with / without the image cross-attention at the trained checkpoint "
              f"'{ckpt_name}' = {trained:.3f}; not the verdict above, because switching a trained cross-attention "
              "off moves the model off the distribution it was trained on (larger loss, larger gradients without "
              "it), which lowers this ratio even when nothing starves")
    low = not trained >= PROBE_RATIO_FAIL
    out.append(Check("probe: ratio at the trained checkpoint", "warn" if low else "pass", trained,
                     detail + (f"; below {PROBE_RATIO_FAIL}, so the trained model leans on its cross-attention: "
                               "compare it with its base run (`aaclip compare`) before trusting it" if low else ""),
                     "aaclip test both runs and aaclip compare them" if low else ""))
    return out


def _introduction_model(mlflow, run, recipe: Recipe, device, workdir: Path):
    """The model as it was when its cross-attention was introduced: the adapters it started from
    (a parent run's, or the last loop before `cross_attn_start_loop`, or fresh ones) and the
    cross-attention modules freshly initialised from the recipe's seed, exactly as the job did."""
    from aaclip_core.checkpoints.from_run import default_checkpoint, load_adapters, run_checkpoint
    from aaclip_core.compute import seed_everything
    from aaclip_core.model import build_model

    seed_everything(recipe.runtime.seed)
    model = build_model(recipe, device, with_cross=True)
    tags = run.data.tags
    start_loop = recipe.feedback.cross_attn_start_loop
    if tags.get(Tag.STAGE) == Stage.FEEDBACK and start_loop > 1:
        name = checkpoint_name(start_loop - 1, 2)
        ckpt = run_checkpoint(mlflow, run.info.run_id, name, workdir / "intro")
        origin = f"this run's adapters after loop {start_loop - 1} (the cross-attention starts in loop {start_loop})"
    elif tags.get(Tag.PARENT_RUN):
        parent = tags[Tag.PARENT_RUN]
        name = tags.get(Tag.PARENT_CHECKPOINT) or default_checkpoint(mlflow, parent)
        ckpt = run_checkpoint(mlflow, parent, name, workdir / "intro")
        origin = f"the base run {parent[:8]}'s adapters ('{name}') + fresh cross-attention, as at the start of training"
    else:
        return model, "fresh adapters + fresh cross-attention from the run's seed, as at the start of training"
    base = {k: v for k, v in ckpt.adapters.items() if k.startswith(("text_adapter.", "image_adapter."))}
    load_adapters(model, base)
    return model, origin


