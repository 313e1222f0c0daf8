"""`aaclip compare`: runs side by side, fairness checked, paired-bootstrap intervals, per-loop plot."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from .app import JsonOpt, UriOpt, app, handle_errors
from .display import err, pct, print_json

_SHORT = {
    "pixel_auroc": "pixel AUROC",
    "pixel_ap": "pixel AP",
    "image_auroc": "image AUROC",
    "image_ap": "image AP",
    "aupro": "AUPRO*",
    "pixel_f1_max": "pixel F1-max*",
    "image_f1_max": "image F1-max*",
}


def _delta(x: float) -> str:
    return f"{100 * x:+.2f}"


def _table(result) -> tuple[Table, int]:
    from aaclip_core.evaluation import METRIC_NAMES

    m = result.metric
    t = Table(
        title=f"Runs compared (reference: {result.reference.label})",
        caption="x100; (±) = difference to the reference row; * beyond the reference protocol. "
        "Rows 'mean ± std' aggregate seeds of one configuration.",
    )
    t.add_column("run", no_wrap=True)
    t.add_column("seed", justify="right")
    t.add_column("selection")
    t.add_column("epochs", justify="right")
    t.add_column(f"held-out {_SHORT[m]}", justify="right")
    for d in result.datasets:
        for metric in METRIC_NAMES:
            t.add_column(f"{d}\n{_SHORT[metric]}", justify="right")
    ref = result.reference
    for r in result.rows:
        cells = []
        if not r.tests:
            cells = ["not tested"] + [""] * (len(result.datasets) * len(METRIC_NAMES) - 1) if result.datasets else []
        for d in result.datasets:
            if not r.tests:
                break
            t_run = r.tests.get(d)
            for metric in METRIC_NAMES:
                v = t_run.metrics.get(metric) if t_run else None
                cell = pct(v) if t_run else "-"
                base = ref.tests.get(d)
                if v is not None and r is not ref and base is not None and metric in base.metrics:
                    cell += f" ({_delta(v - base.metrics[metric])})"
                cells.append(cell)
        name = escape(r.label) + (" [bold](ref)[/bold]" if r is ref else "")
        t.add_row(name, str(r.attrs.get("seed")), r.selection, str(r.attrs.get("epochs") or "?"),
                  pct(r.held_out.get(m)) if m in r.held_out else "-", *cells)
    if result.groups:
        t.add_section()
        for g in result.groups:
            cells = []
            for d in result.datasets:
                for metric in METRIC_NAMES:
                    s = g["test"].get(d, {}).get(metric)
                    cells.append(f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f}" if s else "-")
            h = g["held_out"].get(m)
            t.add_row(escape(g["label"]), ",".join(map(str, g["seeds"])), "", "",
                      f"{100 * h['mean']:.2f} ± {100 * h['std']:.2f}" if h else "-", *cells)
    width = 60 + 16 * len(result.datasets) * len(METRIC_NAMES)
    return t, width


def print_comparison(result) -> None:
    table, width = _table(result)
    if width > err.width:  # wider than the terminal: print at full width rather than squash every cell
        from rich.console import Console

        Console(stderr=True, highlight=False, width=width).print(table)
    else:
        err.print(table)
    untested = [r for r in result.rows if not r.tests]
    for r in untested:
        err.print(f"[yellow]not tested[/yellow] {escape(r.label)}: run `{r.test_command}`", soft_wrap=True)
    if result.differences:
        err.print("\n[bold]What differs between the compared runs[/bold]")
        for d in result.differences:
            tag = "[red]UNFAIR[/red]" if d["severity"] == "unfair" else "[cyan]note[/cyan]"
            vals = ", ".join(f"{k}={v}" for k, v in d["values"].items())
            err.print(f"  {tag} {escape(d['field'])}: {escape(vals)}", soft_wrap=True)
    else:
        err.print("\nNo differences in test set, fidelity, backbone, image size, seed, QuickGELU, protocol, "
                  "selection, epochs or parameter count.")
    if result.comparisons:
        err.print(f"\n[bold]Against the reference {escape(result.reference.label)}[/bold]")
    labels = {r.key: r.label for r in result.rows}
    for c in result.comparisons:
        head = f"{escape(labels[c['row']])} on {escape(c['dataset'])}: "
        if c["verdict"] == "UNFAIR":
            err.print(head + "[red]UNFAIR[/red] - " + escape("; ".join(c["unfair"])), soft_wrap=True)
        else:
            err.print(head + "[green]fair[/green]" + (" (note: " + escape("; ".join(c["notes"])) + ")"
                                                        if c["notes"] else ""), soft_wrap=True)
        if c.get("statement"):
            err.print("  " + escape(c["statement"]), soft_wrap=True)
        elif c.get("bootstrap_missing"):
            err.print(f"  no bootstrap: {escape(c['bootstrap_missing'])}")
        pixel = c.get("pixel_ci") or {}
        if pixel.get("available"):
            err.print("  " + escape(pixel["statement"]), soft_wrap=True)
        elif result.bootstrap_resamples > 0 and c.get("delta"):
            err.print(f"  [dim]{escape(pixel.get('reason', ''))}[/dim]", soft_wrap=True)
    for n in result.notes:
        err.print(f"[yellow]note:[/yellow] {escape(n)}")


@app.command("compare")
@handle_errors
def compare_cmd(
    run_ids: Annotated[
        Optional[list[str]],
        typer.Argument(help="Training run ids (or unique prefixes); default: every training run of the experiment(s)."),
    ] = None,
    experiment: Annotated[
        Optional[list[str]], typer.Option("--experiment", help="MLflow experiment name (repeatable; default: all).")
    ] = None,
    metric: Annotated[
        str,
        typer.Option("--metric", help="Headline metric: held-out column and --plot (pixel_auroc, image_auroc, ...)."),
    ] = "pixel_auroc",
    json_: JsonOpt = False,
    plot: Annotated[
        Optional[Path], typer.Option("--plot", help="Write a PNG: the metric per feedback loop, base runs as lines.")
    ] = None,
    reference: Annotated[
        Optional[str],
        typer.Option("--reference", help="Run id (or row key) to compare against (default: the base run)."),
    ] = None,
    bootstrap: Annotated[
        int, typer.Option("--bootstrap", help="Paired-bootstrap resamples of the test images (0 = none).")
    ] = 1000,
    tracking_uri: UriOpt = None,
):
    """Compare runs on their test results: fairness checked, bootstrap CIs on differences, mean ± std over seeds."""
    from aaclip_core.compare import compare_runs, plot_loops

    result = compare_runs(run_ids or None, experiment or None, metric, reference, bootstrap, tracking_uri)
    written = None
    if plot is not None:
        written = plot_loops(result, plot)
    if json_:
        doc = result.as_dict()
        doc["plot"] = str(written) if written else None
        print_json(doc)
        return
    print_comparison(result)
    if written:
        err.print(f"plot written to {written}")
