"""The Typer application, shared options and error handling; command modules register on `app`.

Only Typer and rich are imported here: `--help`, usage errors and bad input must answer without
loading torch, OpenCLIP or MLflow, so every command imports its job inside its body.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from typing import Annotated, Optional

import typer
from typer.core import TyperCommand, TyperGroup

from aaclip_cli.display import err, escape

# The command list in the order a user works: get data and a recipe, train, evaluate, use, inspect.
# Names not registered (yet) are skipped; a command missing here is listed after these.
WORKFLOW_ORDER = (
    "data", "recipes", "prompts", "train", "sweep", "test", "predict", "runs", "compare", "doctor", "import",
    "export", "register",
)
HELP_OPTIONS = {"help_option_names": ["-h", "--help"]}

EXIT_USAGE = 2


class _FlagsWithoutType:
    """Typer labels every boolean flag `<bool>` as if it took a value (`--json <bool>`); a flag
    takes none, so its type column is left empty (the help option included)."""

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for param in params:  # the command's own, the help option, shell completion's
            if getattr(param, "is_bool_flag", False) and param.metavar is None:
                param.metavar = ""
        return params


class AaclipCommand(_FlagsWithoutType, TyperCommand):
    """Every aaclip command: pass as `cls=` to `@app.command`."""


# Click's exception classes as this Typer raises them (recent Typer versions carry their own copy of
# Click, older ones use the click package): found from the one Typer exports.
_ClickException = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
_NoArgsIsHelp = getattr(sys.modules[_ClickException.__module__], "NoArgsIsHelpError", ())
# How Click ends a command on purpose (an exit code, an abort, a usage error): not failures of aaclip.
_CLICK_FLOW = (_ClickException, typer.Exit, getattr(sys.modules[_ClickException.__module__], "Abort", typer.Exit))

EXIT_BUG = 1
DEBUG_VAR = "AACLIP_DEBUG"  # set (to anything but 0 or empty): an unexpected error shows its traceback


def print_error(message: str) -> None:
    """``error: message`` on stderr as one paragraph; ``[...]`` in the message is text, not markup."""
    err.print(f"[bold red]error:[/bold red] {escape(message)}", soft_wrap=True)


def _unexpected_error(exc: Exception) -> None:
    """An error aaclip did not expect (not an AaclipError): a bug. One paragraph with its type and
    message, where to report it and how to see the traceback."""
    message = " ".join(str(exc).split())
    if len(message) > 1000:
        message = message[:1000] + " [...]"
    print_error(
        f"{type(exc).__name__}: {message or '(no message)'}. This is a bug in aaclip, not a problem with your input: "
        "please report it to aaclip's maintainers with the command you ran and this message; run the command "
        f"again with {DEBUG_VAR}=1 to see the traceback."
    )


def _usage_error(exc) -> None:
    """Click's own errors (an unknown option, a missing value, a path that does not exist) as one
    paragraph like aaclip's: the message, the usage line and where the help is, no box drawn."""
    ctx = getattr(exc, "ctx", None)
    where = ""
    if ctx is not None:
        where = f" {' '.join(ctx.get_usage().split())} (see '{ctx.command_path} -h')."
    message = exc.format_message().rstrip()
    if not message.endswith((".", "!", "?")):
        message += "."
    print_error(message + where)


@contextlib.contextmanager
def _usage_errors_as_paragraphs():
    try:
        yield
    except _NoArgsIsHelp:  # the help is shown, as asked
        raise
    except _ClickException as exc:
        _usage_error(exc)
        raise typer.Exit(exc.exit_code) from None


class AaclipGroup(_FlagsWithoutType, TyperGroup):
    """A command group listing its commands in workflow order; usage errors of it and of its
    commands (parsed while it invokes them) are one paragraph, exit 2."""

    def list_commands(self, ctx) -> list[str]:
        names = super().list_commands(ctx)
        rank = {name: i for i, name in enumerate(WORKFLOW_ORDER)}
        return sorted(names, key=lambda n: rank.get(n, len(rank)))

    def make_context(self, info_name, args, parent=None, **extra):
        with _usage_errors_as_paragraphs():
            return super().make_context(info_name, args, parent=parent, **extra)

    def invoke(self, ctx):
        with _usage_errors_as_paragraphs():
            return super().invoke(ctx)


def _version(value: bool) -> None:
    if value:
        from aaclip_core.registry.tracking import aaclip_version

        typer.echo(f"aaclip {aaclip_version()}")
        raise typer.Exit()


def _sub_app(help_text: str) -> typer.Typer:
    return typer.Typer(help=help_text, no_args_is_help=True, cls=AaclipGroup, context_settings=HELP_OPTIONS)


app = typer.Typer(
    name="aaclip",
    help="Train, evaluate, compare and diagnose AA-CLIP anomaly detectors (base, cross-attention, feedback).\n\n"
    "Results go to stdout (the run id, a table, or one JSON document with --json); progress and notes "
    "go to stderr. Bad input exits 2 with one paragraph saying what to fix.",
    epilog="Start with: aaclip train base --recipe demo (then aaclip test --run RUN_ID). "
    "Completion: aaclip --install-completion.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
    cls=AaclipGroup,
    context_settings=HELP_OPTIONS,
)


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", "-V", callback=_version, is_eager=True, help="Print aaclip's version and exit."),
    ] = False,
) -> None:
    """Train, evaluate, compare and diagnose AA-CLIP anomaly detectors."""


train_app = _sub_app("Train a model: base AA-CLIP, cross-attention, or feedback loops.")
data_app = _sub_app("Datasets: the built-in synthetic demo data, indexing real layouts.")
recipes_app = _sub_app("Shipped recipes and their settings.")
app.add_typer(train_app, name="train")
app.add_typer(data_app, name="data")
app.add_typer(recipes_app, name="recipes")


def examples(*lines: str) -> str:
    """A command's help epilog: one example command per line."""
    return "Examples:\n\n" + "\n\n".join(f"  $ {escape(line)}" for line in lines)


def speaks_for_job() -> bool:
    """Under torchrun rank 0 speaks for the job; the other ranks print no result."""
    from aaclip_core.distributed import is_main

    return is_main()


def handle_errors(fn):
    """User errors -> one paragraph on stderr and exit 2, never a traceback; any other error is a
    bug -> one paragraph saying so, exit 1 (the traceback with AACLIP_DEBUG=1)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from aaclip_core.errors import AaclipError, JobFailed, RankStopped, SaidByRank0

        try:
            return fn(*args, **kwargs)
        except JobFailed as exc:  # not the user's input: a rank of a torchrun job died
            print_error(str(exc))  # the peers' messages quote library errors, [brackets] and all
            raise typer.Exit(1) from None
        except RankStopped as exc:
            from aaclip_core.signals import unended

            err.print(f"[yellow]stopped[/yellow]: {escape(str(exc))} (torchrun stops every rank when one fails; rank 0 "
                      f"reports which). {escape(unended(exc))}".rstrip(), soft_wrap=True)
            raise typer.Exit(1) from None
        except AaclipError as exc:
            if not isinstance(exc, SaidByRank0):  # rank 0 says it once for the job
                print_error(str(exc))  # names user paths and values
            raise typer.Exit(EXIT_USAGE) from None
        except KeyboardInterrupt as exc:  # Ctrl-C, and SIGTERM/SIGHUP (aaclip_core.signals)
            from aaclip_core.signals import describe, exit_code, unended

            left = unended(exc)
            ended = f"{left} Finished checkpoints are kept." if left else \
                "a run in progress is marked KILLED; finished checkpoints are kept."
            err.print(f"[yellow]interrupted[/yellow] ({describe(exc)}): {escape(ended)}".rstrip(), soft_wrap=True)
            raise typer.Exit(exit_code(exc)) from None
        except _CLICK_FLOW:
            raise
        except Exception as exc:
            if os.environ.get(DEBUG_VAR, "") not in ("", "0"):
                raise
            _unexpected_error(exc)
            raise typer.Exit(EXIT_BUG) from None

    return wrapper


# ------------------------------------------------------------------------------------------ options

def translate_sets(values: list[str] | None) -> list[str] | None:
    """--set OLD_NAME=value (the reference's or the fork's setting name) -> the aaclip setting,
    said once on stderr (`image_cross_attn_weight → cross.image_weight`)."""
    if not values:
        return values
    from aaclip_core.recipe import translate_override

    out, said = [], set()
    for text in values:
        translated, alias = translate_override(text)
        if alias is not None and alias.old not in said:
            said.add(alias.old)
            err.print(alias.arrow, markup=False, highlight=False)
        out += translated
    return out


RecipeOpt = Annotated[str, typer.Option("--recipe", "-r", help="Shipped recipe name or path to a TOML file.")]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option(
        "--set",
        "-s",
        metavar="KEY=VALUE",
        callback=translate_sets,
        help="Override a recipe value, e.g. stage2.epochs=3 (repeatable; values are TOML literals; "
        "KEY=null puts the field back to its default; the reference's and the fork's names work too, e.g. "
        "image_cross_attn_weight=0.1).",
    ),
]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Random seed (default: the recipe's runtime.seed).")]
UriOpt = Annotated[
    Optional[str],
    typer.Option("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)."),
]
ExpOpt = Annotated[Optional[str], typer.Option("--experiment", help="MLflow experiment name (default: the recipe's).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout instead of the human output.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")]
RunNameOpt = Annotated[Optional[str], typer.Option("--run-name", help="MLflow run name.")]


def load_recipe_with_flags(recipe: str, sets: list[str] | None, seed: int | None, experiment: str | None):
    from aaclip_core.recipe import load_recipe

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
