"""`aaclip recipes list|show`: the shipped recipes, and any recipe resolved to one TOML file."""

from __future__ import annotations

from typing import Annotated

import typer

from aaclip_cli.app import AaclipCommand, SetOpt, examples, handle_errors, recipes_app


@recipes_app.command("list", cls=AaclipCommand, epilog=examples("aaclip recipes list"))
@handle_errors
def recipes_list_cmd():
    """List the shipped recipes."""
    from aaclip_core.recipe import load_recipe, shipped_recipes

    for name in shipped_recipes():
        r, _ = load_recipe(name)
        typer.echo(f"{name:16s} {r.description}")


@recipes_app.command(
    "show",
    cls=AaclipCommand,
    epilog=examples(
        "aaclip recipes show demo > my.toml && aaclip train base --recipe my.toml",
        "aaclip recipes show base --set model.image_size=336 --set model.quick_gelu=null",
        "aaclip recipes show feedback --aliases",
    ),
)
@handle_errors
def recipes_show_cmd(
    recipe: Annotated[str, typer.Argument(help="Recipe name or path.")] = "base",
    set_: SetOpt = None,
    aliases: Annotated[
        bool, typer.Option("--aliases", help="List each setting with its name in the reference/fork scripts instead.")
    ] = False,
):
    """Print a recipe with every setting resolved (extends and --set applied) as TOML that --recipe
    FILE reads back to the same settings."""
    from aaclip_core.recipe import flatten, load_recipe, recipe_to_toml

    r, _ = load_recipe(recipe, set_)
    if aliases:
        _show_with_aliases(flatten(r))
        return
    typer.echo(recipe_to_toml(r), nl=False)


def _show_with_aliases(settings: dict[str, str]) -> None:
    """Every setting as a dotted key, its value and (as a comment) the reference/fork names that set
    it; then the old names aaclip has no setting for, with what to use instead."""
    from aaclip_core.recipe_aliases import aliases, old_names_of

    width = min(44, max(len(f"{k} = {v}") for k, v in settings.items()))
    for k, v in settings.items():
        old = old_names_of(k)
        line = f"{k} = {v}"
        typer.echo(f"{line:{width}s}  # {', '.join(old)}" if old else line)
    typer.echo("\n# reference/fork names with no aaclip setting:")
    for a in aliases().values():
        if not a.settings:
            typer.echo(f"# {a.old}: {a.instead}")
