"""Checks of a run's logged history: status, gradient norms per module group, stage-2 loss per loop,
held-out metric per loop and the cross-attention weights it trained with."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

from aaclip_core.checkpoints.from_run import loop_validation
from aaclip_core.doctor.checks import (
    GRAD_BAND,
    GRAD_BAND_BACKBONE,
    GRAD_DEAD,
    GRAD_FAR_ABOVE,
    GRAD_VANISHING,
    LOSS_NEARLY_FLAT,
    Check,
    Note,
)
from aaclip_core.doctor.static import (
    check_activation,
    check_cross_weight,
    check_data,
    check_device,
    check_prompt_names,
    check_weights,
)
from aaclip_core.evaluation.selection import select_loop
from aaclip_core.names import PIXEL_AUROC
from aaclip_core.prompts.names import PROMPT_PARAM, PromptNamer, reference_dataset, reference_table
from aaclip_core.recipe import Recipe
from aaclip_core.recipe_aliases import both_names
from aaclip_core.record import Stage, Tag
from aaclip_core.registry.runs import describe_owner, run_liveness
from aaclip_core.registry.tracking import loop_runs


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((int(m.step), float(m.value)) for m in client.get_metric_history(run_id, key))


def _loop_runs(client, run) -> dict[int, Any]:
    """loop -> the MLflow run holding that loop's per-epoch metrics."""
    if run.data.tags.get(Tag.STAGE) != Stage.FEEDBACK:
        return {1: run}
    return loop_runs(client, run)


def _clipping(feedback: bool, grad_clip: str | None) -> str:
    if feedback:
        return (f"feedback clips the total gradient norm at feedback.grad_clip = {grad_clip or '?'} before each "
                "step, so larger norms shorten the step but do not change its direction")
    return "base and cross training do not clip gradients (the reference optimisers), so a large norm is a large step"


def gradient_checks(client, loops: dict[int, Any], feedback: bool, grad_clip: str | None = None,
                    backbone: str | None = None) -> tuple[list[Check], Note | None]:
    """A check per module group's logged gradient norm, and the note (said once) on what the norms
    above the band mean: what training does with them, and whether the band applies to this backbone."""
    series: dict[str, list[tuple[int, int, float]]] = {}
    for loop, r in sorted(loops.items()):
        for key in sorted(r.data.metrics):
            if "/grad_norm/" in key:
                series.setdefault(key, []).extend((loop, step, v) for step, v in _history(client, r.info.run_id, key))
    checks, above_band = [], []
    lo, hi = GRAD_BAND
    reference = backbone == GRAD_BAND_BACKBONE
    for key in sorted(series):
        stage, _, group = key.partition("/grad_norm/")
        vals = series[key]
        name = f"gradient norm {stage}/{group}"

        def where(item):
            return (f"loop {item[0]} " if feedback else "") + f"epoch {item[1]}"

        bad = [v for v in vals if not math.isfinite(v[2])]
        if bad:
            checks.append(Check(name, "fail", bad[0][2], f"non-finite gradient norm at {where(bad[0])}",
                                "lower the learning rate; check the data for broken images"))
            continue
        low = min(vals, key=lambda v: v[2])
        top = max(v[2] for v in vals)
        below = sum(v[2] < lo for v in vals)
        above = sum(v[2] > hi for v in vals)
        detail = (f"{len(vals)} epochs, range {low[2]:.3g}-{top:.3g} (healthy band {lo}-{hi}; "
                  f"{below} below, {above} above)")
        fix = (f"raise the stage's learning rate ({both_names('feedback.image_lr')}: try 2e-3 per SPEC §7), keep "
               "cross.*_weight at 0.1, run `aaclip doctor RUN_ID --probe`")
        high = max(vals, key=lambda v: v[2])
        far = reference and high[2] > GRAD_FAR_ABOVE * hi
        if above:
            detail += f"; above the band (up to {high[2] / hi:.0f}x its top; see the note on gradient norms)"
            above_band.append(name)
        if low[2] < GRAD_DEAD:
            checks.append(Check(name, "fail", low[2], f"dead: {low[2]:.2g} < {GRAD_DEAD} at {where(low)}; " + detail,
                                fix))
        elif low[2] < GRAD_VANISHING:
            checks.append(Check(name, "warn", low[2],
                                f"vanishing: {low[2]:.2g} < {GRAD_VANISHING} at {where(low)}; " + detail, fix))
        elif far:
            checks.append(Check(name, "warn", high[2],
                                f"far above the band: {high[2]:.3g} at {where(high)} is {high[2] / hi:.0f}x its top; "
                                + detail,
                                "if the loss jumps or diverges, lower the stage's learning rate"
                                + ("" if feedback else " (or train with feedback, which clips)")))
        else:
            checks.append(Check(name, "pass", low[2], f"lowest {low[2]:.3g} at {where(low)}; " + detail))
    if not above_band:
        return checks, None
    text = f"Gradient norms above the band: {_clipping(feedback, grad_clip)}"
    if not reference:
        text += (f". The band is SPEC §7's for {GRAD_BAND_BACKBONE}, not this run's backbone "
                 f"({backbone or 'unknown'}), so here only vanishing and dead norms are judged")
    return checks, Note(above_band, text + ".")


def loss_checks(client, loops: dict[int, Any], feedback: bool, lr_key: str) -> list[Check]:
    """Stage-2 loss within each loop. Where the run logged ``stage2/probe_loss`` (the loss on one fixed
    batch in eval mode, step 0 = before the stage trained) that is judged, being free of augmentation
    and batch-order noise; otherwise the per-epoch mean ``stage2/loss``, first epoch against last."""
    checks = []
    for loop, r in sorted(loops.items()):
        name = "stage-2 loss trend" + (f" loop {loop}" if feedback else "")
        hist = _history(client, r.info.run_id, "stage2/probe_loss")
        what = "fixed-batch probe loss, before training -> after the last epoch"
        if len(hist) < 2:
            hist = _history(client, r.info.run_id, "stage2/loss")
            what = "epoch-mean loss, first -> last epoch"
        if not hist:
            checks.append(Check(name, "skip", None, "no stage-2 loss logged"))
            continue
        if len(hist) < 2:
            checks.append(Check(name, "skip", hist[0][1], "one epoch: no trend to judge"))
            continue
        first, last = hist[0][1], hist[-1][1]
        change = (last - first) / abs(first) if first else 0.0
        detail = f"{what}: {first:.4f} -> {last:.4f} ({len(hist)} points, {100 * change:+.1f} %)"
        fix = (f"raise {both_names(lr_key)} (SPEC §7: try 2e-3 if the image loss stays flat), keep "
               f"{both_names('cross.image_weight')} at 0.1, run `aaclip doctor RUN_ID --probe`")
        if not last < first:
            checks.append(Check(name, "fail", change, "flat: the last epoch's loss is not below the first; " + detail,
                                fix))
        elif -change < LOSS_NEARLY_FLAT:
            checks.append(Check(name, "warn", change,
                                f"nearly flat (< {100 * LOSS_NEARLY_FLAT:.0f} % drop; SPEC §6's starved run went "
                                "3.16 -> 3.13); " + detail, fix))
        else:
            checks.append(Check(name, "pass", change, detail))
    return checks


def _loop_validation(client, mlflow, run, metric: str) -> dict[int, dict[str, float]]:
    """What the run kept with each loop's checkpoint; runs from before that, their logged history."""
    with tempfile.TemporaryDirectory(prefix="aaclip-doctor-val-") as tmp:
        val = loop_validation(mlflow, run.info.run_id, Path(tmp))
    return val or {k: {metric: v} for k, v in _history(client, run.info.run_id, f"val/{metric}")}


def loop_metric_check(val_by_loop: dict[int, dict[str, float]], metric: str) -> Check:
    """The held-out metric per loop, judged with the selection rule `train feedback` uses."""
    name = f"held-out {metric} per loop"
    selection = select_loop(val_by_loop, metric)
    hist = selection.values or {}
    if selection.fallback and val_by_loop:
        return Check(name, "fail", None, selection.reason,
                     "choose a feedback.selection_metric the validation split defines (eval.aupro = true for aupro)")
    if len(hist) < 2:
        return Check(name, "skip", None, f"{len(hist)} loop(s) with a held-out {metric}: nothing to compare")
    listing = ", ".join(f"{k}: {100 * v:.2f}" for k, v in sorted(hist.items()))
    best = selection.loop
    first = hist[min(hist)]
    worse = [k for k in sorted(hist) if k > min(hist) and hist[k] < first]
    value = hist[best]
    detail = f"best loop {best} ({100 * hist[best]:.2f}); x100 per loop: {listing}"
    fix = ("fewer loops or a lower feedback.lr_decay_per_loop/learning rate; check the stage-2 loss and "
           "gradient checks; the selected loop is the held-out best")
    if best == min(hist):
        return Check(name, "fail", value, "no later loop beats loop 1 on held-out data; " + detail, fix)
    if worse:
        return Check(name, "warn", value, f"loop(s) {', '.join(map(str, worse))} worse than loop 1; " + detail, fix)
    return Check(name, "pass", value, detail)


def _bool(x) -> bool | None:
    return None if x is None else str(x).lower() == "true"


def _run_cross_checks(client, run, loops: dict[int, Any], recipe: Recipe | None) -> list[Check]:
    p = run.data.params
    checks = []
    for kind in ("image", "text"):
        # What the run trained with (its params), else its recipe.
        if f"cross.{kind}_weight" in p:
            w = float(p[f"cross.{kind}_weight"])
        else:
            w = getattr(recipe.cross, f"{kind}_weight") if recipe is not None else None
        checks.append(check_cross_weight(kind, w, f"run cross.{kind}_weight"))
        logged = []
        for _, r in sorted(loops.items()):
            logged += [v for _, v in _history(client, r.info.run_id, f"cross/{kind}_weight")]
        if logged:
            c = check_cross_weight(kind, logged[-1], f"logged cross/{kind}_weight")
            c.detail = f"last of {len(logged)} logged values (first {logged[0]:g}); " + c.detail
            checks.append(c)
    return checks


def _run_prompt_check(run, recipe: Recipe | None, fidelity: str | None) -> Check:
    """The names the run trained with (its prompt.<class> params); a run without them predates
    recorded names and used aaclip's old table."""
    dataset = run.data.tags.get(Tag.DATASET) or (recipe.data.train.name if recipe else "?")
    names = {k[len(PROMPT_PARAM):]: v for k, v in run.data.params.items() if k.startswith(PROMPT_PARAM)}
    legacy = not names
    if legacy:
        key = reference_dataset(dataset)
        old = PromptNamer(dataset, "legacy")
        names = {c: old.resolve(c).name for c in (reference_table().get(key, {}) if key else {})}
    return check_prompt_names(fidelity, dataset, names, "run prompt names", legacy)


def run_checks(client, mlflow, run, recipe: Recipe | None,
               tracking_uri: str | None) -> tuple[list[Check], list[Note]]:
    """The checks of a run's logged history, and the notes said once for several of them."""
    t, p = run.data.tags, run.data.params
    notes: list[Note] = []
    stage = t.get(Tag.STAGE, "?")
    status = run.info.status
    checks = []
    if status == "FINISHED":
        checks.append(Check("run status", "pass", status, f"{stage} run, finished"))
    elif status == "FAILED":
        why = t.get(Tag.FAILURE)  # torchrun jobs: which rank failed and why
        checks.append(Check("run status", "fail", status, f"{stage} run ended FAILED" + (f": {why}" if why else ""),
                            "read the error of the failed command and train again"))
    elif run_liveness(run) == "live":
        checks.append(Check("run status", "warn", status, f"{stage} run still training ({describe_owner(run)})",
                            "wait for it to finish, then run doctor again"))
    else:
        stale = run_liveness(run) == "stale"
        fix = f"aaclip train feedback --resume {run.info.run_id}" if stage == Stage.FEEDBACK else "train it again"
        if stale:
            fix = f"aaclip runs --mark-dead {run.info.run_id}, or " + fix
        what = f"RUNNING but stale: its process is gone or silent ({describe_owner(run)})" if stale else f"ended {status}"
        checks.append(Check("run status", "warn", "stale" if stale else status, f"{stage} run {what}", fix))

    if recipe is not None:
        checks += [check_weights(recipe), check_data(recipe, "train"), check_device(recipe)]
        fidelity, quick, pretrained = recipe.fidelity, recipe.quick_gelu, recipe.model.pretrained
    else:
        checks.append(Check("run recipe", "skip", None, "the run has no recipe.json (not made by `aaclip train`): "
                                                       "weights, data and device checks skipped"))
        fidelity, pretrained = t.get(Tag.FIDELITY), p.get("model.pretrained")
        quick = _bool(t.get(Tag.QUICK_GELU))
    if t.get(Tag.QUICK_GELU) is not None:
        quick = _bool(t.get(Tag.QUICK_GELU))  # the activation the run actually used
    checks.append(check_activation(fidelity, quick, pretrained, "run activation (QuickGELU vs fidelity vs weights)"))
    if stage != Stage.IMPORTED:
        checks.append(_run_prompt_check(run, recipe, fidelity))

    loops = _loop_runs(client, run)
    feedback = stage == Stage.FEEDBACK
    if stage in (Stage.CROSS, Stage.FEEDBACK):
        checks += _run_cross_checks(client, run, loops, recipe)
    else:
        checks.append(Check("run cross-attention weights", "skip", None, f"a {stage} run has no cross-attention"))
    if stage == Stage.IMPORTED:
        checks.append(Check("logged training history", "skip", None, "imported runs carry no training history"))
        return checks, notes
    backbone = p.get("model.name") or (t.get(Tag.BACKBONE) or "").split(":")[0] or None
    grads, note = gradient_checks(client, loops, feedback, p.get("feedback.grad_clip"), backbone)
    checks += grads
    notes += [note] if note else []
    if feedback:
        checks.append(validation_check(run, recipe))
    checks += loss_checks(client, loops, feedback, "feedback.image_lr" if feedback else "stage2.lr")
    if feedback:
        metric = p.get("feedback.selection_metric") or (recipe.feedback.selection_metric if recipe else PIXEL_AUROC)
        checks.append(loop_metric_check(_loop_validation(client, mlflow, run, metric), metric))
    return checks, notes




def validation_check(run, recipe: Recipe | None) -> Check:
    """A feedback run's validation split against ``feedback.min_val_images``: too few images and the
    held-out metric a loop is selected on can barely move."""
    name = "validation split"
    t, p = run.data.tags, run.data.params
    try:
        n = int(p["val_images"])
    except (KeyError, ValueError):
        return Check(name, "skip", None, "the run logged no val_images")
    minimum = p.get("feedback.min_val_images") or (str(recipe.feedback.min_val_images) if recipe else None)
    if minimum is None:
        return Check(name, "skip", n, "the run records no feedback.min_val_images")
    fix = "raise feedback.val_fraction (or data.train.shot), or add labelled images, and train again"
    if n < int(minimum):
        detail = t.get(Tag.VAL_WARNING) or f"the validation split has only {n} images, fewer than {minimum}"
        return Check(name, "warn", n, detail, fix)
    return Check(name, "pass", n, f"{n} validation images (feedback.min_val_images = {minimum})")
