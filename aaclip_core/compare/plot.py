"""The per-loop plot of `aaclip compare --plot`."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ..errors import ConfigError
from .comparison import Comparison
from .rows import Row

def plot_loops(result: Comparison, path: Path) -> Path:
    """Metric per loop of every feedback run (held-out dashed, test solid), base runs as horizontal
    lines; PNG written atomically (temporary file in the same folder, then renamed)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure

    path = Path(path).expanduser()
    if not path.parent.is_dir():
        raise ConfigError(f"--plot {path}: the folder {path.parent} does not exist.")
    m = result.metric
    fig = Figure(figsize=(7.5, 4.5), dpi=100)
    ax = fig.subplots()
    drawn = 0
    by_run: dict[str, list[Row]] = {}
    for r in result.rows:
        if r.stage == "feedback" and r.loop is not None and r.checkpoint == f"loop_{r.loop}_stage_2":
            by_run.setdefault(r.run_id, []).append(r)
    colours = iter(matplotlib.rcParams["axes.prop_cycle"].by_key()["color"] * 10)
    for run_id, rows in by_run.items():
        colour = next(colours)
        rows = sorted(rows, key=lambda r: r.loop)
        held = [(r.loop, 100 * r.held_out[m]) for r in rows if m in r.held_out]
        if held:
            ax.plot(*zip(*held), "--o", color=colour, label=f"feedback {run_id[:8]} held-out {m}")
            drawn += 1
        for d in sorted({d for r in rows for d in r.tests}):
            pts = [(r.loop, 100 * r.tests[d].metrics[m]) for r in rows if d in r.tests and m in r.tests[d].metrics]
            if pts:
                ax.plot(*zip(*pts), "-s", color=colour, label=f"feedback {run_id[:8]} test {d}")
                drawn += 1
        sel = [r.loop for r in rows if r.selected]
        if sel:
            ax.axvline(sel[0], color=colour, alpha=0.25, linewidth=6)
    styles = iter([":", "-.", (0, (5, 2)), (0, (1, 3))] * 10)
    for r in result.rows:
        if r.stage == "base" and r.selected:
            for d, t in sorted(r.tests.items()):
                if m in t.metrics:
                    ax.axhline(100 * t.metrics[m], color="black", linestyle=next(styles),
                               label=f"base {r.run_id[:8]} test {d}")
                    drawn += 1
    if not drawn:
        ax.text(0.5, 0.5, f"no {m} values to plot (no feedback loop or tested base run)", ha="center",
                va="center", transform=ax.transAxes)
    ax.set_xlabel("loop")
    ax.set_ylabel(f"{m} (x100)")
    ax.set_title(f"{m} per feedback loop (shaded: held-out selected loop)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    if drawn:
        ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    os.close(fd)
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
