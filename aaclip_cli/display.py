"""Where output goes: results (the run id, tables, one JSON document) on stdout; progress, notes
and errors on stderr."""

from __future__ import annotations

import json
import math
import sys
import time

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from aaclip_core.names import METRIC_LABELS
from aaclip_core.reporter import Reporter

err = Console(stderr=True, highlight=False)

__all__ = ["err", "escape", "note", "out", "print_json", "print_result", "pct", "RichReporter", "results_table", "warn"]


def warn(*texts: str) -> None:
    """Each text as a ``warning:`` line on stderr: something the user should act on. Texts are plain
    (they quote paths and values): never read as markup."""
    for text in texts:
        err.print(f"[yellow]warning:[/yellow] {escape(text)}", soft_wrap=True)


def note(*texts: str) -> None:
    """Each text as a ``note:`` line on stderr: worth knowing, nothing to do."""
    for text in texts:
        err.print(f"[yellow]note:[/yellow] {escape(text)}", soft_wrap=True)


def out() -> Console:
    """A console on stdout, made when needed so that tests capturing sys.stdout see what it writes."""
    return Console(highlight=False)


def result_console(renderable, full_width: bool = False) -> Console:
    """A stdout console for a result table. Into a file or pipe (where rich assumes 80 columns) the
    table gets the width it needs, so a saved report is not wrapped header by header; on a terminal
    it fits the window unless ``full_width``."""
    console = out()
    if console.is_terminal and not full_width:
        return console
    need = console.measure(renderable, options=console.options.update_width(100_000)).maximum
    return Console(highlight=False, width=need) if need > console.width else console


def print_result(renderable) -> None:
    """A human result (a table) on stdout."""
    result_console(renderable).print(renderable)


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


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class RichReporter(Reporter):
    """Progress on stderr. On a terminal: bars (loop, stage, epoch, batch, loss, ETA). Without one
    (nohup, CI, a cluster job): one plain line per epoch, so a log shows the job is alive and how
    far it is. Notes (data, loops, held-out metrics) either way; nothing at all when quiet."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.live = err.is_terminal and not quiet
        self._progress = None
        self._task = None
        self._key = None
        self._loop = ""
        self._stage_key = None
        self._stage_t0 = 0.0

    def __enter__(self) -> RichReporter:
        if self.live:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

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
            err.print(f"[dim]·[/dim] {escape(message)}", soft_wrap=True)

    def loop(self, loop: int, loops: int) -> None:
        self._loop = f"loop {loop}/{loops} "
        self.info(f"loop {loop}/{loops}")

    def _stage_clock(self, stage: str) -> float:
        """Seconds since the (loop, stage) began: the first progress report of it."""
        key = (self._loop, stage)
        if key != self._stage_key:
            self._stage_key, self._stage_t0 = key, time.monotonic()
        return time.monotonic() - self._stage_t0

    def progress(self, stage: str, epoch: int, epochs: int, batch: int, batches: int, loss: float) -> None:
        if epoch == 1 and batch == 1:
            self._stage_clock(stage)
        if self._progress is None:
            return
        # One bar per stage (per loop), so the ETA covers the whole stage.
        key = (self._loop, stage)
        desc = f"{self._loop}{stage} epoch {epoch}/{epochs}"
        if key != self._key:
            self._task = self._progress.add_task(desc, total=epochs * batches, loss="-")
            self._key = key
        self._progress.update(self._task, description=desc, completed=(epoch - 1) * batches + batch, loss=f"{loss:.4f}")

    def epoch_end(self, stage: str, epoch: int, epochs: int, loss: float, lr: float) -> None:
        if self.quiet or self.live:  # the bar already shows it
            return
        elapsed = self._stage_clock(stage)
        eta = elapsed / epoch * (epochs - epoch)
        err.print(
            f"{self._loop}{stage} epoch {epoch}/{epochs} loss {loss:.4f} lr {lr:.3g} "
            f"elapsed {_clock(elapsed)} eta {_clock(eta)}",
            markup=False,
            soft_wrap=True,
        )

    def eval_progress(self, batch: int, batches: int) -> None:
        if self._progress is None:
            return
        if self._key != ("eval",):
            self._task = self._progress.add_task("evaluating", total=batches, loss="-")
            self._key = ("eval",)
        self._progress.update(self._task, completed=batch)


def results_table(report: dict, title: str) -> Table:
    cols = list(METRIC_LABELS.items())
    t = Table(title=escape(title), caption="x100. * beyond the reference protocol (AUPRO at FPR <= 0.3).")
    t.add_column("class")
    t.add_column("images", justify="right")
    for _, label in cols:
        t.add_column(label, justify="right")
    for c in report["classes"]:
        t.add_row(escape(c["class_name"]), f"{c['n_images']} ({c['n_anomalous']} anom.)",
                  *[pct(c[k]) for k, _ in cols])
    t.add_section()
    t.add_row("[bold]mean[/bold]", "", *[f"[bold]{pct(report['mean'][k])}[/bold]" for k, _ in cols])
    return t
