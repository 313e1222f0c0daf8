"""`aaclip train base|cross|feedback`: the run id on stdout (or the whole result with --json)."""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, fields
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

# ------------------------------------------------------------------------------------------ common options


@dataclass(frozen=True)
class TrainFlags:
    """The options every `train` command takes, declared once: a field here (with its option type
    as the annotation, and its default) is an option of all three commands, listed after the
    command's own."""

    recipe: RecipeOpt
    set_: SetOpt = None
    seed: SeedOpt = None
    tracking_uri: UriOpt = None
    experiment: ExpOpt = None
    json_: JsonOpt = False
    quiet: QuietOpt = False
    run_name: RunNameOpt = None

    def load_recipe(self, extra_sets: list[str] = ()):
        """The recipe with --set (then ``extra_sets``), --seed and --experiment applied; and its path."""
        return load_recipe_with_flags(self.recipe, list(self.set_ or []) + list(extra_sets), self.seed,
                                      self.experiment)

    def reporter(self) -> RichReporter:
        """Progress on stderr, unless --quiet or --json."""
        return RichReporter(self.quiet or self.json_)


def train_options(default_recipe: str):
    """Give a `train` command the `TrainFlags` options (``--recipe`` defaulting to
    ``default_recipe``); the command takes them as one ``flags`` argument. Typer reads a command's
    options from its signature, so the wrapper shows the command's own parameters followed by these."""
    hints = inspect.get_annotations(TrainFlags, eval_str=True)
    common = [
        inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=hints[f.name],
                          default=default_recipe if f.name == "recipe" else f.default)
        for f in fields(TrainFlags)
    ]

    def decorate(fn):
        own = [p for p in inspect.signature(fn, eval_str=True).parameters.values() if p.name != "flags"]

        @functools.wraps(fn)
        def command(**kwargs):
            flags = TrainFlags(**{p.name: kwargs.pop(p.name) for p in common})
            return fn(flags=flags, **kwargs)

        command.__signature__ = inspect.Signature([*own, *common])
        command.__annotations__ = {p.name: p.annotation for p in (*own, *common)}
        return command

    return decorate


# ------------------------------------------------------------------------------------------ commands


@train_app.command(
    "base",
    cls=AaclipCommand,
    epilog=examples(
        "aaclip train base --recipe demo",
        'RUN=$(aaclip train base --recipe base --set data.train.root=/data/VisA --set stage2.epochs=10)',
    ),
)
@handle_errors
@train_options(default_recipe="base")
def train_base_cmd(flags: TrainFlags):
    """Train base AA-CLIP: stage 1 (text anchors) then stage 2 (patch features); prints the run id."""
    r, path = flags.load_recipe()
    from aaclip_core.jobs.base import train_base

    with flags.reporter() as rep:
        result = train_base(r, path, flags.tracking_uri, rep, flags.run_name)
    _report_trained(result, flags.json_, f"base run {result['run_id']} ({loss_summary(result)})")


@train_app.command(
    "cross",
    cls=AaclipCommand,
    epilog=examples(
        "aaclip train cross --from BASE_RUN_ID --recipe cross-demo",
        "aaclip train cross --base-text-adapter text_adapter.pth --base-image-adapter image_adapter_20.pth",
    ),
)
@handle_errors
@train_options(default_recipe="cross")
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
    *,
    flags: TrainFlags,
):
    """Add text<->image cross-attention to a base run and train stage 1 and stage 2 once."""
    r, path = flags.load_recipe()
    from aaclip_core.jobs.cross import train_cross

    with flags.reporter() as rep:
        result = train_cross(r, path, from_run, base_text_adapter, base_image_adapter, flags.tracking_uri, rep,
                             flags.run_name)
    _report_trained(result, flags.json_, f"cross run {result['run_id']} ({loss_summary(result)})")


@train_app.command(
    "feedback",
    cls=AaclipCommand,
    epilog=examples(
        "aaclip train feedback --recipe feedback-demo --loops 5",
        "aaclip train feedback --resume RUN_ID",
    ),
)
@handle_errors
@train_options(default_recipe="feedback")
def train_feedback_cmd(
    loops: Annotated[
        Optional[int], typer.Option("--loops", help="Number of loops, 1-10 (default: the recipe's).")
    ] = None,
    from_run: Annotated[Optional[str], typer.Option("--from", help="Start from this run's adapters.")] = None,
    resume: Annotated[
        Optional[str], typer.Option("--resume", help="Continue an interrupted feedback run from its last stage.")
    ] = None,
    *,
    flags: TrainFlags,
):
    """Feedback training: stage 1 and stage 2 alternate for N loops, each from what the last learned."""
    from aaclip_core.errors import ConfigError

    if resume:
        given = [flag for flag, value in (("--loops", loops), ("--set", flags.set_), ("--seed", flags.seed),
                                          ("--experiment", flags.experiment), ("--from", from_run),
                                          ("--recipe", flags.recipe if flags.recipe != "feedback" else None))
                 if value]
        if given:
            raise ConfigError(
                f"--resume continues the run with its own recipe; drop {', '.join(given)} (to change "
                "settings, start a new run with --from RUN_ID instead)."
            )
        r, path = None, None
    else:
        # The recipe checks the range (feedback.loops, 1 to 10) and says so naming the setting.
        r, path = flags.load_recipe([f"feedback.loops={loops}"] if loops is not None else [])
    from aaclip_core.jobs.feedback import train_feedback

    with flags.reporter() as rep:
        result = train_feedback(r, path, from_run, resume, flags.tracking_uri, rep, flags.run_name)
    _report_trained(
        result, flags.json_,
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
