"""`aaclip train base|cross|feedback`: the run id on stdout (or the whole result with --json)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from aaclip_cli.app import (
    AaclipCommand,
    ExpOpt,
    JsonOpt,
    QuietOpt,
    RecipeOpt,
    RunNameOpt,
    SeedOpt,
    SetOpt,
    UriOpt,
    examples,
    handle_errors,
    load_recipe_with_flags,
    loss_summary,
    speaks_for_job,
    train_app,
)
from aaclip_cli.display import RichReporter, err, escape, print_json


@train_app.command(
    "base",
    cls=AaclipCommand,
    epilog=examples(
        "aaclip train base --recipe demo",
        'RUN=$(aaclip train base --recipe base --set data.train.root=/data/VisA --set stage2.epochs=10)',
    ),
)
@handle_errors
def train_base_cmd(
    recipe: RecipeOpt = "base",
    set_: SetOpt = None,
    seed: SeedOpt = None,
    tracking_uri: UriOpt = None,
    experiment: ExpOpt = None,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
    run_name: RunNameOpt = None,
):
    """Train base AA-CLIP: stage 1 (text anchors) then stage 2 (patch features); prints the run id."""
    r, path = load_recipe_with_flags(recipe, set_, seed, experiment)
    from aaclip_core.jobs.base import train_base

    with RichReporter(quiet or json_) as rep:
        result = train_base(r, path, tracking_uri, rep, run_name)
    _report_trained(result, json_, f"base run {result['run_id']} ({loss_summary(result)})")


@train_app.command(
    "cross",
    cls=AaclipCommand,
    epilog=examples(
        "aaclip train cross --from BASE_RUN_ID --recipe cross-demo",
        "aaclip train cross --base-text-adapter text_adapter.pth --base-image-adapter image_adapter_20.pth",
    ),
)
@handle_errors
def train_cross_cmd(
    from_run: Annotated[Optional[str], typer.Option("--from", help="Base run id whose adapters to start from.")] = None,
    base_text_adapter: Annotated[
        Optional[Path],
        typer.Option("--base-text-adapter", exists=True, dir_okay=False,
                     help="Reference text_adapter.pth (instead of --from)."),
    ] = None,
    base_image_adapter: Annotated[
        Optional[Path],
        typer.Option("--base-image-adapter", exists=True, dir_okay=False,
                     help="Reference image_adapter_N.pth (with the above)."),
    ] = None,
    recipe: RecipeOpt = "cross",
    set_: SetOpt = None,
    seed: SeedOpt = None,
    tracking_uri: UriOpt = None,
    experiment: ExpOpt = None,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
    run_name: RunNameOpt = None,
):
    """Add text<->image cross-attention to a base run and train stage 1 and stage 2 once."""
    r, path = load_recipe_with_flags(recipe, set_, seed, experiment)
    from aaclip_core.jobs.cross import train_cross

    with RichReporter(quiet or json_) as rep:
        result = train_cross(r, path, from_run, base_text_adapter, base_image_adapter, tracking_uri, rep, run_name)
    _report_trained(result, json_, f"cross run {result['run_id']} ({loss_summary(result)})")


@train_app.command(
    "feedback",
    cls=AaclipCommand,
    epilog=examples(
        "aaclip train feedback --recipe feedback-demo --loops 5",
        "aaclip train feedback --resume RUN_ID",
    ),
)
@handle_errors
def train_feedback_cmd(
    loops: Annotated[
        Optional[int], typer.Option("--loops", help="Number of loops, 1-10 (default: the recipe's).")
    ] = None,
    from_run: Annotated[Optional[str], typer.Option("--from", help="Start from this run's adapters.")] = None,
    resume: Annotated[
        Optional[str], typer.Option("--resume", help="Continue an interrupted feedback run from its last stage.")
    ] = None,
    recipe: RecipeOpt = "feedback",
    set_: SetOpt = None,
    seed: SeedOpt = None,
    tracking_uri: UriOpt = None,
    experiment: ExpOpt = None,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
    run_name: RunNameOpt = None,
):
    """Feedback training: stage 1 and stage 2 alternate for N loops, each from what the last learned."""
    from aaclip_core.errors import ConfigError

    if loops is not None and not 1 <= loops <= 10:
        raise ConfigError(f"--loops {loops}: feedback training runs 1 to 10 loops; pass a number in that range.")
    if resume:
        given = [flag for flag, value in (("--loops", loops), ("--set", set_), ("--seed", seed),
                                          ("--experiment", experiment), ("--from", from_run),
                                          ("--recipe", recipe if recipe != "feedback" else None)) if value]
        if given:
            raise ConfigError(
                f"--resume continues the run with its own recipe; drop {', '.join(given)} (to change "
                "settings, start a new run with --from RUN_ID instead)."
            )
        r, path = None, None
    else:
        sets = list(set_ or []) + ([f"feedback.loops={loops}"] if loops is not None else [])
        r, path = load_recipe_with_flags(recipe, sets, seed, experiment)
    from aaclip_core.jobs.feedback import train_feedback

    with RichReporter(quiet or json_) as rep:
        result = train_feedback(r, path, from_run, resume, tracking_uri, rep, run_name)
    _report_trained(
        result, json_,
        f"feedback run {result['run_id']}: selected loop {result['selected_loop']} ({result['selection']})",
    )


def _report_trained(result: dict, as_json: bool, summary: str) -> None:
    """--json: the whole result on stdout; else a summary on stderr and the run id on stdout."""
    if not speaks_for_job():
        return
    if as_json:
        print_json(result)
    else:
        err.print(f"[green]done[/green] {escape(summary)}", soft_wrap=True)
        typer.echo(result["run_id"])
