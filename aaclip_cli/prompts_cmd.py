"""`aaclip prompts`: the prompt name and sentences of a class, for a recipe or as a run used them."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from aaclip_cli.app import AaclipCommand, JsonOpt, SetOpt, UriOpt, app, examples, handle_errors, load_recipe_with_flags
from aaclip_cli.display import print_json

_SOURCES = {
    "recipe": "the recipe's [prompts.names]",
    "checkpoint": "recorded by the checkpoint",
    "reference": "the reference's table",
    "legacy": "aaclip's old table (run from before prompt names were recorded)",
    "folder": "the folder name",
}


def _echo_card(card: dict) -> None:
    typer.echo(f"{card['dataset']} / {card['class']}: \"{card['name']}\" ({_SOURCES.get(card['source'], card['source'])})")
    for kind in ("normal", "abnormal"):
        typer.echo(f"  {kind}:")
        for sentence in card[kind]:
            typer.echo(f"    {sentence}")


@app.command(
    "prompts",
    cls=AaclipCommand,
    epilog=examples(
        "aaclip prompts --dataset MVTec --class bottle --json",
        'aaclip prompts --dataset mine --class my_part --set prompts.names.my_part="anodised bracket"',
        "aaclip prompts --run RUN_ID",
    ),
)
@handle_errors
def prompts_cmd(
    dataset: Annotated[Optional[str], typer.Option("--dataset", help="Dataset name (MVTec, VisA, MPDD, BTAD, ...).")] = None,
    class_name: Annotated[Optional[str], typer.Option("--class", help="Class folder name, e.g. bottle.")] = None,
    run: Annotated[
        Optional[str], typer.Option("--run", help="Show the names this training or test run used instead.")
    ] = None,
    recipe: Annotated[str, typer.Option("--recipe", "-r", help="Shipped recipe name or path to a TOML file.")] = "base",
    set_: SetOpt = None,
    tracking_uri: UriOpt = None,
    json_: JsonOpt = False,
):
    """Show the prompt name and the 16 sentences (normal, then abnormal) training and test use for a class."""
    from aaclip_core.errors import ConfigError

    if run is not None:
        from aaclip_core.jobs.prompts import run_prompts

        if dataset is not None or set_:
            raise ConfigError("--run shows the names the run used: drop --dataset and --set (--class narrows it).")
        result = run_prompts(run, class_name, tracking_uri)
        if json_:
            print_json(result)
            return
        if not result["logged"]:
            typer.echo(f"run {run} predates logged prompt names; it used aaclip's old table:")
        for card in result["classes"]:
            _echo_card(card)
        return
    if dataset is None or class_name is None:
        raise ConfigError(
            "aaclip prompts needs --dataset NAME and --class CLASS (e.g. --dataset MVTec --class bottle), "
            "or --run RUN_ID for the names a run used."
        )
    from aaclip_core.jobs.prompts import describe

    r, _ = load_recipe_with_flags(recipe, set_, None, None)
    card = describe(r, dataset, class_name)
    if json_:
        print_json(card)
    else:
        _echo_card(card)
