"""`aaclip compare`: runs side by side, fairness checked, paired-bootstrap intervals, per-loop plot."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from aaclip_cli.app import AaclipCommand, JsonOpt, UriOpt, app, examples, handle_errors
from aaclip_cli.display import err, note, pct, print_json, result_console
from aaclip_core.names import IMAGE_AUROC, METRIC_LABELS, PIXEL_AUROC

_SHORT = METRIC_LABELS


def _delta(x: float) -> str:
    return f"{100 * x:+.2f}"


# Shown by default: the headline metric and image AUROC, so a table of two datasets fits 120 columns.
DEFAULT_TABLE_METRICS = (PIXEL_AUROC, IMAGE_AUROC)
SAME_DATASET_MARK = "‡"


def table_metrics(metrics: list[str] | None, wide: bool) -> list[str]:
    """The metric columns: every metric with --wide, else those given with --metric (the first is the
    headline), else the headline pixel AUROC and image AUROC."""
    from aaclip_core.names import METRIC_NAMES

    if wide:
        return list(METRIC_NAMES)
    chosen = list(dict.fromkeys(metrics or DEFAULT_TABLE_METRICS))
    unknown = [m for m in chosen if m not in METRIC_NAMES]
    if unknown:
        from aaclip_core.errors import ConfigError

        raise ConfigError(f"--metric {unknown[0]} is not a metric; choose from {', '.join(METRIC_NAMES)}.")
    return chosen


def _table(result, metrics: list[str], wide: bool = False) -> Table:
    m = result.metric
    seeds_differ = len({r.attrs.get("seed") for r in result.rows}) > 1
    marked = any(t.same_dataset for r in result.rows for t in r.tests.values())
    caption = "x100; (±) = difference to the reference row; * beyond the reference protocol."
    if marked:
        caption += f" {SAME_DATASET_MARK} tested on the run's own training data."
    if not wide:
        caption += " All metrics: --wide or --json."
    t = Table(title=f"Runs compared (reference: {escape(result.reference.label)})", caption=caption,
              box=box.SIMPLE_HEAD if not wide else box.HEAVY_HEAD)
    t.add_column("run", no_wrap=True)  # labels are short and must read as one piece
    if seeds_differ or wide:
        t.add_column("seed", justify="right")
    t.add_column("selection")
    t.add_column("epochs", justify="right")
    t.add_column(f"held-out\n{_SHORT[m]}", justify="right")
    for d in result.datasets:
        for metric in metrics:
            t.add_column(f"{escape(d)}\n{_SHORT[metric]}", justify="right")
    ref = result.reference
    for r in result.rows:
        cells = []
        for d in result.datasets:
            t_run = r.tests.get(d)
            for metric in metrics:
                v = t_run.metrics.get(metric) if t_run else None
                cell = pct(v) if v is not None else "-"
                base = ref.tests.get(d)
                if v is not None and r is not ref and base is not None and metric in base.metrics:
                    cell += f" ({_delta(v - base.metrics[metric])})"
                if v is not None and t_run.same_dataset:
                    cell += SAME_DATASET_MARK
                cells.append(cell)
        if not r.tests and cells:
            cells = ["not tested"] + cells[1:]
        name = escape(r.label) + (" [bold](ref)[/bold]" if r is ref else "")
        lead = [name] + ([str(r.attrs.get("seed"))] if seeds_differ or wide else [])
        t.add_row(*lead, r.selection, str(r.attrs.get("epochs") or "?"),
                  pct(r.held_out.get(m)) if m in r.held_out else "-", *cells)
    if result.groups:
        t.add_section()
        for g in result.groups:
            cells = []
            for d in result.datasets:
                for metric in metrics:
                    s = g["test"].get(d, {}).get(metric)
                    cells.append(f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f}" if s else "-")
            h = g["held_out"].get(m)
            lead = [escape(g["label"])] + ([",".join(map(str, g["seeds"]))] if seeds_differ or wide else [])
            t.add_row(*lead, "", "", f"{100 * h['mean']:.2f} ± {100 * h['std']:.2f}" if h else "-", *cells)
    return t


def print_comparison(result, metrics: list[str] | None = None, wide: bool = False) -> None:
    """The report (table, differences, verdicts, intervals) on stdout, so `aaclip compare > report.txt`
    keeps it; hints about untested runs and notes on stderr."""
    table = _table(result, table_metrics(metrics, wide), wide)
    # --wide: every metric, at the table's own width rather than squashing every cell.
    console = result_console(table, full_width=wide)
    say = functools.partial(console.print, soft_wrap=True)
    say(table)
    for r in result.rows:
        if not r.tests:
            err.print(f"[yellow]not tested[/yellow] {escape(r.label)}: run `{escape(r.test_command)}`", soft_wrap=True)
    if result.differences:
        say("\n[bold]What differs between the compared runs[/bold]")
        for d in result.differences:
            tag = "[red]UNFAIR[/red]" if d["severity"] == "unfair" else "[cyan]note[/cyan]"
            vals = ", ".join(f"{k}={v}" for k, v in d["values"].items())
            say(f"  {tag} {escape(d['field'])}: {escape(vals)}")
    else:
        say("\nNo differences in test set, fidelity, backbone, image size, seed, QuickGELU, protocol, "
            "selection, epochs or parameter count.")
    if result.comparisons:
        say(f"\n[bold]Against the reference {escape(result.reference.label)}[/bold]")
    labels = {r.key: r.label for r in result.rows}
    for c in result.comparisons:
        head = f"{escape(labels[c['row']])} on {escape(c['dataset'])}: "
        if c["verdict"] == "UNFAIR":
            say(head + "[red]UNFAIR[/red] - " + escape("; ".join(c["unfair"])))
        else:
            say(head + "[green]fair[/green]" + (" (note: " + escape("; ".join(c["notes"])) + ")" if c["notes"] else ""))
        if c.get("statement"):
            say("  " + escape(c["statement"]))
        elif c.get("bootstrap_missing"):
            say(f"  no bootstrap: {escape(c['bootstrap_missing'])}")
        pixel = c.get("pixel_ci") or {}
        if pixel.get("available"):
            say("  " + escape(pixel["statement"]))
        elif result.bootstrap_resamples > 0 and c.get("delta"):
            say(f"  [dim]{escape(pixel.get('reason', ''))}[/dim]")
    note(*result.notes)


def _print_sweep(view) -> None:
    """A sweep's trials, best first: number, state, held-out value, settings, run; then the best."""
    keys = sorted({k for t in view.trials for k in t["params"]})
    t = Table(title=f"Sweep {escape(view.run_id)} (study {escape(view.study)})", box=box.SIMPLE_HEAD,
              caption=f"held-out {escape(view.objective)} x100 (validation split of the training data, never test); "
                      "pruned: its last loop's value.")
    for col in ("trial", "state", f"held-out\n{_SHORT.get(view.objective, view.objective)}", *keys, "run"):
        t.add_column(escape(col), justify="right" if col != "run" else "left", no_wrap=col == "run")
    for tr in view.trials:
        mark = " [bold]best[/bold]" if tr["number"] == view.best_trial else ""
        value = pct(tr["value"]) if tr["value"] is not None else "-"
        settings = [escape(f"{tr['params'][k]:.4g}" if isinstance(tr["params"].get(k), float) else
                           str(tr["params"].get(k, "-"))) for k in keys]
        t.add_row(f"{tr['number']}{mark}", tr["state"].lower(), value, *settings, escape(tr["run_id"] or "-"))
    console = result_console(t)
    console.print(t, soft_wrap=True)
    finished = sum(tr["state"] == "COMPLETE" for tr in view.trials)
    pruned = sum(tr["state"] == "PRUNED" for tr in view.trials)
    counts = f"{finished} finished and {pruned} pruned of {view.target_trials} asked"
    if view.best_trial is None:
        console.print(f"No finished trial ({counts}).")
    else:
        console.print(f"best: trial {view.best_trial}, held-out {escape(view.objective)} {pct(view.best_value)} "
                      f"({counts})", soft_wrap=True)
    if view.importances:
        console.print("importance: " + ", ".join(f"{escape(k)} {v:.2f}" for k, v in view.importances.items()),
                      soft_wrap=True)


@app.command(
    "compare",
    cls=AaclipCommand,
    epilog=examples(
        "aaclip compare > report.txt",
        "aaclip compare BASE_RUN_ID FEEDBACK_RUN_ID --reference BASE_RUN_ID --plot loops.png --wide",
    ),
)
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
        Optional[list[str]],
        typer.Option("--metric", help="Metric column(s) of the table, repeatable; the first is the headline (held-out "
                     "column, --plot). Default: pixel_auroc and image_auroc."),
    ] = None,
    wide: Annotated[bool, typer.Option("--wide", help="Every metric in the table (wider than a terminal).")] = False,
    json_: JsonOpt = False,
    plot: Annotated[
        Optional[Path], typer.Option("--plot", help="Write a PNG: the metric per feedback loop, base runs as lines "
                                                    "(a sweep: its objective per trial and per setting).")
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
    """Compare runs on their test results: fairness checked, bootstrap CIs on differences, mean ± std over seeds.
    Given one sweep run: its trials, best first, with their held-out values."""
    from aaclip_core.compare import compare_runs, plot_loops

    if run_ids and len(run_ids) == 1:
        from aaclip_core.compare.sweep import plot_sweep
        from aaclip_core.registry.sweeps import sweep_view

        view = sweep_view(tracking_uri, run_ids[0])
        if view is not None:
            written = plot_sweep(view, plot) if plot is not None else None
            if json_:
                print_json({**view.as_dict(), "plot": str(written) if written else None})
            else:
                _print_sweep(view)
                if written:
                    err.print(f"plot written to {escape(str(written))}", soft_wrap=True)
            return

    metrics = table_metrics(metric, wide=False)
    result = compare_runs(run_ids or None, experiment or None, metrics[0], reference, bootstrap, tracking_uri)
    written = None
    if plot is not None:
        written = plot_loops(result, plot)
    if json_:
        doc = result.as_dict()
        doc["plot"] = str(written) if written else None
        print_json(doc)
        return
    print_comparison(result, metric, wide)
    if written:
        err.print(f"plot written to {escape(str(written))}", soft_wrap=True)
