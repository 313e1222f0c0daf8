"""`aaclip sweep`: search a recipe's [sweep] space; the sweep's run id on stdout (or --json)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from aaclip_cli.app import (
    AaclipCommand,
    ExpOpt,
    JsonOpt,
    QuietOpt,
    RecipeOpt,
    SetOpt,
    UriOpt,
    app,
    examples,
    handle_errors,
    load_recipe_with_flags,
    speaks_for_job,
)
from aaclip_cli.display import RichReporter, err, escape, print_json


@app.command(
    "sweep",
    cls=AaclipCommand,
    epilog=examples(
        "aaclip sweep --recipe sweep-demo",
        "aaclip sweep --recipe sweep-demo --study lr-search --trials 12   # start it on several processes",
        "aaclip sweep --recipe my-sweep.toml --study lr-search --storage postgresql://user@db/optuna",
    ),
)
@handle_errors
def sweep_cmd(
    recipe: RecipeOpt = "sweep-demo",
    trials: Annotated[
        Optional[int], typer.Option("--trials", help="Trials with a result (finished or pruned); default: sweep.trials.")
    ] = None,
    study: Annotated[
        Optional[str],
        typer.Option("--study", help="Study name: every worker started with it joins one study (default: a new one)."),
    ] = None,
    storage: Annotated[
        Optional[str],
        typer.Option("--storage", help="Optuna database URL holding the study (default: beside a SQLite tracking "
                                       "store, mlflow.optuna.db; required for a tracking server)."),
    ] = None,
    set_: SetOpt = None,
    tracking_uri: UriOpt = None,
    experiment: ExpOpt = None,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
):
    """Search settings on held-out validation data (never data.test): each trial a training run, one sweep run."""
    r, path = load_recipe_with_flags(recipe, set_, None, experiment)
    from aaclip_core.recipe import require_sweep

    require_sweep(r)  # before the job (and torch) is imported
    from aaclip_core.jobs.sweep import run_sweep

    with RichReporter(quiet or json_) as rep:
        result = run_sweep(r, path, trials, study, storage, tracking_uri, rep)
    if not speaks_for_job():
        return
    if json_:
        print_json(result)
        return
    best = ("no finished trial" if result["best_trial"] is None else
            f"best trial {result['best_trial']}: held-out {result['objective']} {100 * result['best_value']:.2f}")
    err.print(f"[green]done[/green] sweep {escape(result['run_id'])} (study {escape(result['study'])}): "
              f"{result['finished']} finished, {result['pruned']} pruned, {result['failed']} failed; {escape(best)}",
              soft_wrap=True)
    typer.echo(result["run_id"])
