"""A recipe's ``[sweep]`` as Optuna's own objects: a trial's settings drawn from the search space
(``suggest``), the sampler and the pruner. The space was validated with the recipe
(:func:`aaclip_core.recipe.check_sweep_space`); what only the sampler can refuse is refused here."""

from __future__ import annotations

import math
from typing import Any

import optuna

from aaclip_core.errors import ConfigError
from aaclip_core.recipe import Recipe, SweepConfig, SweepRange


def suggest(trial: optuna.Trial, sweep: SweepConfig) -> dict[str, Any]:
    """One value per ``sweep.space`` key, drawn by the study's sampler (key -> value)."""
    out: dict[str, Any] = {}
    for key, dim in sweep.space.items():
        if isinstance(dim, list):
            out[key] = trial.suggest_categorical(key, dim)
        elif dim.is_int:
            out[key] = trial.suggest_int(key, int(dim.low), int(dim.high), step=int(dim.step or 1), log=dim.log)
        else:
            out[key] = trial.suggest_float(key, float(dim.low), float(dim.high), step=dim.step, log=dim.log)
    return out


def grid(sweep: SweepConfig) -> dict[str, list[Any]]:
    """The grid sampler's points: a list of choices as it is, a range with a step as its steps."""
    out: dict[str, list[Any]] = {}
    for key, dim in sweep.space.items():
        if isinstance(dim, list):
            out[key] = list(dim)
        elif dim.step is None:
            raise ConfigError(
                f"sweep.sampler = 'grid' needs a grid for every key, and sweep.space '{key}' is a range without a "
                "step. Give it a step (e.g. { low = ..., high = ..., step = ... }) or a list of choices, or use "
                "sampler 'tpe' or 'random'."
            )
        else:
            out[key] = _steps(dim)
    return out


def _steps(dim: SweepRange) -> list[Any]:
    n = int(math.floor((dim.high - dim.low) / dim.step + 1e-9)) + 1
    values = [dim.low + i * dim.step for i in range(n)]
    return [int(v) for v in values] if dim.is_int else [float(v) for v in values]


def grid_size(sweep: SweepConfig) -> int:
    return math.prod(len(v) for v in grid(sweep).values())


def target_trials(sweep: SweepConfig, trials: int | None = None) -> int:
    """How many trials with a result (finished or pruned) the study runs to: ``trials`` (the
    ``--trials`` flag) or the recipe's, and for a grid no more than it has points."""
    wanted = trials if trials is not None else sweep.trials
    return min(wanted, grid_size(sweep)) if sweep.sampler == "grid" else wanted


def sampler(sweep: SweepConfig, recipe: Recipe, founder: bool = True) -> optuna.samplers.BaseSampler:
    """The study's sampler, seeded by ``sweep.seed`` (default ``runtime.seed``) in the worker that
    creates the study; a worker that joins it draws its own seed, or it would suggest the very
    settings the first worker tried (the study is then not reproducible, whatever the seed)."""
    seed = (sweep.seed if sweep.seed is not None else recipe.runtime.seed) if founder else None
    if sweep.sampler == "grid":
        return optuna.samplers.GridSampler(grid(sweep), seed=seed)
    if sweep.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(1, min(10, sweep.trials // 3)))


def pruner(sweep: SweepConfig) -> optuna.pruners.BasePruner:
    """Feedback trials report each loop's held-out value (step = loop); base and cross trials report none."""
    if sweep.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=sweep.pruner_startup_trials,
                                           n_warmup_steps=sweep.pruner_warmup_loops)
    if sweep.pruner == "successive-halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=max(1, sweep.pruner_warmup_loops),
                                                      reduction_factor=2)
    return optuna.pruners.NopPruner()
