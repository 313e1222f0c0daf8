"""The Typer application, shared options and error handling; command modules register on `app`."""

from __future__ import annotations

import functools
from typing import Annotated, Optional

import typer

from .display import err

app = typer.Typer(
    name="aaclip",
    help="Train, evaluate, compare and diagnose AA-CLIP anomaly detectors (base, cross-attention, feedback).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
train_app = typer.Typer(help="Train a model: base AA-CLIP, cross-attention, or feedback loops.", no_args_is_help=True)
data_app = typer.Typer(help="Datasets: the built-in synthetic demo data, indexing real layouts.", no_args_is_help=True)
recipes_app = typer.Typer(help="Shipped recipes and their settings.", no_args_is_help=True)
app.add_typer(train_app, name="train")
app.add_typer(data_app, name="data")
app.add_typer(recipes_app, name="recipes")

EXIT_USAGE = 2


def handle_errors(fn):
    """User errors -> one paragraph on stderr and exit 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from aaclip_core.errors import AaclipError

        try:
            return fn(*args, **kwargs)
        except AaclipError as exc:
            err.print(f"[bold red]error:[/bold red] {exc}", soft_wrap=True)
            raise typer.Exit(EXIT_USAGE) from None
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/yellow]: the run is marked KILLED; finished checkpoints are kept.")
            raise typer.Exit(130) from None

    return wrapper


# ------------------------------------------------------------------------------------------ options

RecipeOpt = Annotated[str, typer.Option("--recipe", "-r", help="Shipped recipe name or path to a TOML file.")]
SetOpt = Annotated[
    Optional[list[str]], typer.Option("--set", "-s", help="Override a recipe value: key.sub=value (repeatable).")
]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Random seed (default: the recipe's, 111).")]
UriOpt = Annotated[
    Optional[str],
    typer.Option("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)."),
]
ExpOpt = Annotated[Optional[str], typer.Option("--experiment", help="MLflow experiment name.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")]
RunNameOpt = Annotated[Optional[str], typer.Option("--run-name", help="MLflow run name.")]


def load_recipe_with_flags(recipe: str, sets: list[str] | None, seed: int | None, experiment: str | None):
    from aaclip_core.config import load_recipe

    overrides = list(sets or [])
    if seed is not None:
        overrides.append(f"runtime.seed={seed}")
    if experiment:
        overrides.append(f'tracking.experiment="{experiment}"')
    return load_recipe(recipe, overrides)


def loss_summary(result: dict) -> str:
    parts = []
    for key in ("final_stage1_loss", "final_stage2_loss"):
        if result.get(key) is not None:
            parts.append(f"{key.replace('final_', '').replace('_loss', '')} loss {result[key]:.4f}")
    return ", ".join(parts)


