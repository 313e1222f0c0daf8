"""`aaclip recipes list|show`: the shipped recipes, and any recipe resolved to one TOML file."""

from __future__ import annotations

from typing import Annotated

import typer

from .app import AaclipCommand, SetOpt, examples, handle_errors, recipes_app


@recipes_app.command("list", cls=AaclipCommand, epilog=examples("aaclip recipes list"))
@handle_errors
def recipes_list_cmd():
    """List the shipped recipes."""
    from aaclip_core.config import load_recipe, shipped_recipes

    for name in shipped_recipes():
        r, _ = load_recipe(name)
        typer.echo(f"{name:16s} {r.description}")


@recipes_app.command(
    "show",
    cls=AaclipCommand,
    epilog=examples(
        "aaclip recipes show demo > my.toml && aaclip train base --recipe my.toml",
        "aaclip recipes show base --set model.image_size=336 --set model.quick_gelu=null",
    ),
)
@handle_errors
def recipes_show_cmd(
    recipe: Annotated[str, typer.Argument(help="Recipe name or path.")] = "base",
    set_: SetOpt = None,
):
    """Print a recipe with every setting resolved (extends and --set applied) as TOML that --recipe
    FILE reads back to the same settings."""
    from aaclip_core.config import load_recipe, recipe_to_toml

    r, _ = load_recipe(recipe, set_)
    typer.echo(recipe_to_toml(r), nl=False)
