"""`aaclip runs`: the runs of a store, newest first; `--mark-dead ID` ends a run whose process died."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from aaclip_cli.app import AaclipCommand, JsonOpt, UriOpt, app, examples, handle_errors
from aaclip_cli.display import err, print_json


def _metric_cell(row) -> str:
    if row.value is None:
        return "-"
    if row.metric and row.metric.startswith("val/"):  # a feedback job's selected loop, on held-out data
        loop = f" (loop {row.metric_loop})" if row.metric_loop is not None else ""
        return f"held-out {row.metric[4:]} {100 * row.value:.2f}{loop}"
    if row.metric and row.metric.endswith("loss"):
        return f"{row.metric} {row.value:.4f}"
    return f"{row.metric} {100 * row.value:.2f}"


def _lines(rows) -> list[str]:
    """Plain aligned columns (like `docker ps`): readable at any width, greppable, no markup."""
    head = ("ID", "STAGE", "NAME", "STATUS", "DATASET", "MAIN METRIC", "PARENT", "STARTED (UTC)", "REGISTERED")
    cells = [head] + [
        (r.run_id, r.stage, r.name, f"{r.status} stale" if r.stale else r.status, r.dataset, _metric_cell(r),
         r.parent or "-", r.started, ", ".join(r.registered) or "-")
        for r in rows
    ]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    return ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]


@app.command(
    "runs",
    cls=AaclipCommand,
    epilog=examples("aaclip runs --stage base --limit 5", "aaclip runs --mark-dead 3f2a9c"),
)
@handle_errors
def runs_cmd(
    experiment: Annotated[Optional[str], typer.Option("--experiment", help="Only runs of this experiment.")] = None,
    stage: Annotated[
        Optional[str], typer.Option("--stage", help="Only runs of this stage: base, cross, feedback, feedback-loop, test, imported, sweep.")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", help="Show at most N runs (newest first).")] = 50,
    mark_dead: Annotated[
        Optional[str],
        typer.Option("--mark-dead", help="End this stale RUNNING run (id or unique prefix) as KILLED."),
    ] = None,
    tracking_uri: UriOpt = None,
    json_: JsonOpt = False,
):
    """List runs: id, stage, name, status (stale when its process died), dataset, main metric, parent and the
    Model Registry versions registered from it (NAME/VERSION @alias)."""
    from aaclip_core.registry.runs import list_runs
    from aaclip_core.registry.runs import mark_dead as end_run

    if mark_dead:
        ended = end_run(tracking_uri, mark_dead)
        if json_:
            print_json({"killed": ended})
        else:
            err.print(f"marked KILLED: {', '.join(ended)}")
        return
    rows = list_runs(tracking_uri, experiment, stage, limit)
    if json_:
        print_json([r.as_dict() for r in rows])
        return
    if not rows:
        err.print("no runs")
        return
    for line in _lines(rows):
        typer.echo(line)
    if any(r.stale for r in rows):
        err.print("stale: RUNNING, but its process is gone or silent; end it with `aaclip runs --mark-dead ID`.")
