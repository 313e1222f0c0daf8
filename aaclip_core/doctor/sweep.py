"""`aaclip doctor SWEEP_ID`: what a sweep can get wrong, each with the number behind it and a fix."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

from aaclip_core.doctor.checks import Check
from aaclip_core.evaluation import bootstrap as bs
from aaclip_core.evaluation.pixel_pairs import load_pixel_pairs
from aaclip_core.names import METRIC_LABELS, PIXEL_AUROC
from aaclip_core.recipe import Recipe, SweepRange
from aaclip_core.record import Artifact, Tag
from aaclip_core.registry.sweeps import SweepView

# A trial's held-out scores (its selected checkpoint's), or None when its run keeps none.
HeldOut = Callable[[dict], bs.ScoredImages | None]
LEAD = "best trial's lead"

# A best value within this share of a range (on its own scale: log for log ranges) is at its edge.
EDGE_SHARE = 0.05


def sweep_checks(view: SweepView, recipe: Recipe | None, held_out: HeldOut | None = None) -> list[Check]:
    """``held_out(trial)``: a trial's held-out scores, for the bootstrap of the best trial's lead."""
    counted = [t for t in view.trials if t["state"] in ("COMPLETE", "PRUNED")]
    finished = [t for t in view.trials if t["state"] == "COMPLETE"]
    failed = [t for t in view.trials if t["state"] == "FAIL"]
    checks = [Check(
        "sweep trials", "pass" if len(counted) >= view.target_trials else "warn", len(counted),
        f"{len(counted)} of the {view.target_trials} trials asked ended with a result ({len(finished)} finished, "
        f"{len(counted) - len(finished)} pruned)",
        "" if len(counted) >= view.target_trials else
        f"join the study again to finish it: aaclip sweep --study {view.study} (with its recipe)",
    )]
    checks.append(Check(
        "diverged trials", "pass" if not failed else "warn", len(failed),
        "no trial failed" if not failed else
        f"{len(failed)} trial(s) failed (diverged, no finite held-out value, or their worker died): "
        + ", ".join(str(t["number"]) for t in failed[:10]),
        "" if not failed else "look at the failed trials' runs (`aaclip runs`); a learning-rate range whose top "
        "diverges should end lower",
    ))
    best = next((t for t in view.trials if t["number"] == view.best_trial), None)
    space = recipe.sweep.space if recipe is not None and recipe.sweep is not None else {}
    if best is None:
        checks.append(Check("best at a range's edge", "skip", None, "no finished trial"))
        checks.append(Check(LEAD, "skip", None, "no finished trial"))
        return checks
    edges = []
    for key, dim in space.items():
        value = best["params"].get(key)
        if isinstance(dim, SweepRange) and isinstance(value, (int, float)):
            side = _edge(dim, float(value))
            if side:
                edges.append(f"{key} = {value:.4g} at the {side} end of [{dim.low}, {dim.high}]")
    ranged = [k for k, d in space.items() if isinstance(d, SweepRange)]
    checks.append(Check(
        "best at a range's edge", "warn" if edges else ("pass" if ranged else "skip"), len(edges),
        "; ".join(edges) if edges else (f"the best trial's {', '.join(ranged)} lie inside their ranges" if ranged else
                                        "the space has no ranges"),
        "widen the range past that end (the best may lie outside it) and sweep again" if edges else "",
    ))
    checks.append(lead_check(view, best, recipe, held_out or (lambda trial: None)))
    return checks


def lead_check(view: SweepView, best: dict, recipe: Recipe | None, held_out: HeldOut) -> Check:
    """Whether the best trial's held-out lead over the runner-up (the next finished trial) is more than
    the luck of which images were held out: a bootstrap over the validation images, paired by image
    when both trials were scored on the same ones."""
    runner = next((t for t in view.trials if t["state"] == "COMPLETE" and t["number"] != best["number"]), None)
    metric = view.objective
    if runner is None:
        return Check(LEAD, "skip", None, "one finished trial: there is no runner-up to compare it with")
    if metric not in bs.BOOTSTRAPPED:
        return Check(LEAD, "skip", None, f"the objective {metric} is not bootstrapped (only {', '.join(bs.BOOTSTRAPPED)}: "
                     "the stored per-image scores and pixel pairs recompute those exactly)")
    scored = {t["number"]: held_out(t) for t in (best, runner)}
    missing = [n for n, s in scored.items() if s is None]
    if missing:
        return Check(LEAD, "skip", None, f"trial {missing[0]}'s run keeps no held-out scores ({Artifact.VALIDATION}/): "
                     "trials of sweeps run before aaclip stored them have none, so the lead cannot be bootstrapped")
    result = bs.lead(scored[best["number"]], scored[runner["number"]], metric)
    if result is None:
        return Check(LEAD, "skip", None, "no validation class has both normal and anomalous images"
                     + (" (or a trial kept no pixel pairs: eval.pixel_pairs = false)" if metric == PIXEL_AUROC else ""))
    return _lead_verdict(result, best["number"], runner["number"], recipe)


def _lead_verdict(result: bs.BootstrapResult, best: int, runner: int, recipe: Recipe | None) -> Check:
    pct = int(round(100 * result.confidence))
    how = ("paired bootstrap" if result.paired else
           "unpaired bootstrap: the two were scored on different validation images, a swept setting moved the split")
    detail = (f"trial {best} leads trial {runner} by {100 * result.diff:+.2f} points of held-out "
              f"{METRIC_LABELS.get(result.metric, result.metric)} ({pct}% CI {100 * result.ci_low:+.2f} to "
              f"{100 * result.ci_high:+.2f}; {how}, {result.resamples} resamples of {result.n_images} validation "
              f"images in {result.n_classes} class{'es' if result.n_classes != 1 else ''})")
    few = recipe is not None and result.n_images < recipe.feedback.min_val_images
    if result.ci_low > 0 and not few:
        return Check(LEAD, "pass", round(100 * result.diff, 4), detail)
    if result.ci_low > 0:
        # A percentile bootstrap of a handful of images has few distinct resamples: its interval is too narrow.
        return Check(LEAD, "warn", round(100 * result.diff, 4),
                     detail + f": outside the spread, but on fewer validation images than feedback.min_val_images "
                     f"({recipe.feedback.min_val_images}), too few for the interval itself to be trusted",
                     "score the trials on more validation images (feedback.val_fraction, data.train.shot) before "
                     "trusting the ranking")
    fraction = f" (now {recipe.feedback.val_fraction})" if recipe is not None else ""
    return Check(LEAD, "warn", round(100 * result.diff, 4), detail + ": the lead is inside the spread",
                 f"on these {result.n_images} validation images the two trials cannot be told apart: which images "
                 f"happened to be held out could reverse them. Treat the top trials as tied (test them all, or pick "
                 f"by another criterion), or score them on more validation images: raise feedback.val_fraction"
                 f"{fraction} or data.train.shot, or add labelled images, and sweep again. More trials alone do not "
                 f"narrow this interval.")


def stored_held_out(mlflow, workdir: Path) -> HeldOut:
    """Reads a trial's held-out scores from its run: those of the checkpoint it selected."""
    client = mlflow.MlflowClient()

    def read(trial: dict) -> bs.ScoredImages | None:
        if not trial.get("run_id"):
            return None
        run = client.get_run(trial["run_id"])
        folder = Artifact.validation(run.data.tags.get(Tag.SELECTED_CHECKPOINT, ""))
        stored = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, folder)}
        if Artifact.IMAGE_SCORES not in stored:
            return None
        local = Path(client.download_artifacts(run.info.run_id, folder, str(workdir / run.info.run_id)))
        pixels = load_pixel_pairs(local / Artifact.PIXEL_PAIRS) if Artifact.PIXEL_PAIRS in stored else None
        return bs.ScoredImages(bs.read_image_scores(local / Artifact.IMAGE_SCORES), pixels)

    return read


def _edge(dim: SweepRange, value: float) -> str | None:
    scale = math.log if dim.log else (lambda x: x)
    lo, hi, v = scale(float(dim.low)), scale(float(dim.high)), scale(value)
    share = (v - lo) / (hi - lo)
    return "low" if share <= EDGE_SHARE else "high" if share >= 1 - EDGE_SHARE else None
