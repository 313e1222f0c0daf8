"""Human output on stderr: progress, tables, errors. Machine output (--json) goes to stdout."""

from __future__ import annotations

import json
import math
import sys

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from aaclip_core.reporter import Reporter

err = Console(stderr=True, highlight=False)


def print_json(obj) -> None:
    """Strict JSON: undefined metrics (NaN) become null, which every JSON parser accepts."""
    text = json.dumps(_finite(obj), indent=2, sort_keys=True, default=str, allow_nan=False)
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _finite(o):
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    return o


def pct(x: float | None) -> str:
    """Metrics are stored in [0, 1] and shown x100 with 2 decimals."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{100 * x:.2f}"


class RichReporter(Reporter):
    """Progress bars (loop, stage, epoch, batch, loss, ETA) on a terminal; when stderr is not a TTY
    only the short notes (data, loops, held-out metrics); nothing at all when quiet."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.live = err.is_terminal and not quiet
        self._progress: Progress | None = None
        self._task = None
        self._key = None
        self._loop = ""

    def __enter__(self) -> RichReporter:
        if self.live:
            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total}"),
                TextColumn("loss {task.fields[loss]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=err,
                transient=False,
            )
            self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()

    def info(self, message: str) -> None:
        if not self.quiet:
            err.print(f"[dim]·[/dim] {message}")

    def loop(self, loop: int, loops: int) -> None:
        self._loop = f"loop {loop}/{loops} "
        self.info(f"loop {loop}/{loops}")

    def progress(self, stage: str, epoch: int, epochs: int, batch: int, batches: int, loss: float) -> None:
        if self._progress is None:
            return
        # One bar per stage (per loop), so the ETA covers the whole stage.
        key = (self._loop, stage)
        desc = f"{self._loop}{stage} epoch {epoch}/{epochs}"
        if key != self._key:
            self._task = self._progress.add_task(desc, total=epochs * batches, loss="-")
            self._key = key
        self._progress.update(self._task, description=desc, completed=(epoch - 1) * batches + batch, loss=f"{loss:.4f}")

    def eval_progress(self, batch: int, batches: int) -> None:
        if self._progress is None:
            return
        if self._key != ("eval",):
            self._task = self._progress.add_task("evaluating", total=batches, loss="-")
            self._key = ("eval",)
        self._progress.update(self._task, completed=batch)


def results_table(report: dict, title: str) -> Table:
    cols = [
        ("pixel_auroc", "pixel AUROC"),
        ("pixel_ap", "pixel AP"),
        ("image_auroc", "image AUROC"),
        ("image_ap", "image AP"),
        ("aupro", "AUPRO*"),
        ("pixel_f1_max", "pixel F1-max*"),
        ("image_f1_max", "image F1-max*"),
    ]
    t = Table(title=title, caption="x100. * beyond the reference protocol (AUPRO at FPR <= 0.3).")
    t.add_column("class")
    t.add_column("images", justify="right")
    for _, label in cols:
        t.add_column(label, justify="right")
    for c in report["classes"]:
        t.add_row(c["class_name"], f"{c['n_images']} ({c['n_anomalous']} anom.)", *[pct(c[k]) for k, _ in cols])
    t.add_section()
    t.add_row("[bold]mean[/bold]", "", *[f"[bold]{pct(report['mean'][k])}[/bold]" for k, _ in cols])
    return t
