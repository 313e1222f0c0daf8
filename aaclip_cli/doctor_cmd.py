"""`aaclip doctor`: the SPEC §10 checks, each pass / warn / fail with its number and a fix."""

from __future__ import annotations

import functools
from typing import Annotated, Optional

import typer
from rich.markup import escape

from aaclip_cli.app import AaclipCommand, JsonOpt, SetOpt, UriOpt, app, examples, handle_errors
from aaclip_cli.display import out, print_json

EXIT_FAILED = 1
_STYLE = {"pass": "green", "warn": "yellow", "fail": "bold red", "skip": "dim"}


def _value(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return ", ".join(f"{k} {_value(x)}" for k, x in v.items())
    return str(v)


def print_report(report) -> None:
    """The checks on stdout: they are the command's result."""
    console = out()
    say = functools.partial(console.print, soft_wrap=True)
    head = f"aaclip doctor: run {report.run_id}" if report.run_id else "aaclip doctor: recipe checks"
    say(f"[bold]{escape(head)}[/bold]")
    # A note shared by several checks is said once, under the last of them.
    notes_after = {}
    for note in report.notes:
        last = max((i for i, c in enumerate(report.checks) if c.name in note.covers), default=len(report.checks) - 1)
        notes_after.setdefault(last, []).append(note)
    for i, c in enumerate(report.checks):
        style = _STYLE[c.status]
        say(f"[{style}]{c.status.upper():4s}[/{style}] {escape(c.name)} = {escape(_value(c.value))}")
        say(f"     {escape(c.detail)}")
        if c.fix and c.status in ("warn", "fail"):
            say(f"     [bold]fix:[/bold] {escape(c.fix)}")
        for note in notes_after.get(i, []):
            say(f"[dim]NOTE[/dim] {escape(note.text)}")
    s = report.summary
    say(f"{s['pass']} pass, {s['warn']} warn, {s['fail']} fail, {s['skip']} skipped")


@app.command(
    "doctor",
    cls=AaclipCommand,
    epilog=examples("aaclip doctor --recipe cross-demo", "aaclip doctor RUN_ID --probe"),
)
@handle_errors
def doctor_cmd(
    run_id: Annotated[Optional[str], typer.Argument(help="Run to diagnose (default: check a recipe only).")] = None,
    probe: Annotated[
        bool, typer.Option("--probe", help="Measure gradient dilution on the run's checkpoint and 8 training images.")
    ] = False,
    json_: JsonOpt = False,
    tracking_uri: UriOpt = None,
    recipe: Annotated[
        Optional[str], typer.Option("--recipe", "-r", help="Recipe to check without a run (default: base).")
    ] = None,
    set_: SetOpt = None,
    world_size: Annotated[
        Optional[int],
        typer.Option("--world-size", min=1, help="Check the recipe for N torchrun processes (per-rank batch sizes)."),
    ] = None,
):
    """Check a recipe or a run: each check passes, warns or fails with its number and a fix.

    Checks: cross-attention weights, gradient dilution, gradient norms, loss trend, loop-over-loop held-out
    metric, weights/QuickGELU/fidelity, data, tracking, device. Exit 1 if a check fails."""
    from aaclip_core.doctor import diagnose

    report = diagnose(run_id, recipe, set_, probe, tracking_uri, world_size)
    if json_:
        print_json(report.as_dict())
    else:
        print_report(report)
    if report.failed:
        raise typer.Exit(EXIT_FAILED)
