"""`aaclip compare --plot`: the headline metric of every compared run on one picture.

* feedback runs: the test metric per loop, markers only where a loop was tested (a line joins
  consecutive tested loops only, never across an untested one), and the held-out metric per loop
  as a faint dashed line; the held-out selected loop is shaded;
* base, cross and imported runs (no loops): a horizontal line at their test metric, the reference
  run's thick and black, drawn above everything else;
* a test on the run's own training data is drawn hollow and says so in the legend;
* runs with no test on the plotted dataset are listed under the plot.

The y range is padded so that no line sits on the frame. Written atomically (temporary file in the
same folder, then renamed); no pyplot, so no GUI backend is ever loaded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from aaclip_core.checkpoints.checkpoint import checkpoint_name
from aaclip_core.compare.comparison import Comparison
from aaclip_core.errors import ConfigError
from aaclip_core.files import atomic_path
from aaclip_core.record import Stage


@dataclass
class Series:
    """One drawn line: a run's test metric (kind "test") or held-out metric (kind "held-out")."""

    run_id: str
    label: str
    kind: str
    points: list[tuple[int | None, float]]  # (loop or None for a run without loops, value x100)
    same_dataset: bool = False


@dataclass
class PlotContent:
    dataset: str | None
    metric: str
    series: list[Series] = field(default_factory=list)
    untested: list[str] = field(default_factory=list)  # labels of runs with nothing to plot


def _is_loop_row(r) -> bool:
    return r.stage == Stage.FEEDBACK and r.loop is not None and r.checkpoint == checkpoint_name(r.loop, 2)


def plot_content(result, dataset: str | None = None) -> PlotContent:
    """What `plot_comparison` draws: one test series per tested run (on ``dataset``, default the
    reference's first tested dataset, else the first any run was tested on), held-out series of
    feedback runs, and the runs with nothing to plot."""
    m = result.metric
    if dataset is None:
        dataset = (sorted(result.reference.tests) or result.datasets or [None])[0]
    content = PlotContent(dataset, m)
    runs: dict[str, list] = {}
    for r in result.rows:
        runs.setdefault(r.run_id, []).append(r)
    for run_id, rows in runs.items():
        first = rows[0]
        loops = sorted((r for r in rows if _is_loop_row(r)), key=lambda r: r.loop)
        name = f"{first.stage} {run_id[:8]}"
        if loops:
            tested = [(r.loop, 100 * r.tests[dataset].metrics[m], r.tests[dataset].same_dataset) for r in loops
                      if dataset in r.tests and m in r.tests[dataset].metrics]
            if tested:
                same = any(t[2] for t in tested)
                content.series.append(Series(run_id, f"{name} test {dataset}", "test",
                                             [(loop, v) for loop, v, _ in tested], same))
            held = [(r.loop, 100 * r.held_out[m]) for r in loops if m in r.held_out]
            if held:
                content.series.append(Series(run_id, f"{name} held-out", "held-out", held))
            if not tested and not held:
                content.untested.append(name)
            continue
        row = next((r for r in rows if r.selected), first)
        t = row.tests.get(dataset) if dataset else None
        if t is not None and m in t.metrics:
            content.series.append(Series(run_id, f"{name} test {dataset}", "test", [(None, 100 * t.metrics[m])],
                                         t.same_dataset))
        else:
            content.untested.append(name)
    return content


def build_figure(result, content: PlotContent):
    """The matplotlib Figure for ``content``; every line carries a gid ``"<kind>:<run id>"``."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure

    m, d = content.metric, content.dataset
    fig = Figure(figsize=(9.0, 4.6), dpi=100)
    ax = fig.subplots()
    ref_id = result.reference.run_id
    palette = [c for c in matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]]
    colour_of: dict[str, str] = {}
    for s in content.series:
        colour_of.setdefault(s.run_id, palette[len(colour_of) % len(palette)])
    last_loop = max((p[0] for s in content.series for p in s.points if p[0] is not None), default=1)
    loops = list(range(1, last_loop + 1))
    values = [v for s in content.series for _, v in s.points]
    for s in content.series:
        colour, is_ref = colour_of[s.run_id], s.run_id == ref_id
        label = s.label + (" (reference)" if is_ref else "") + (" - on its training data" if s.same_dataset else "")
        gid = f"{s.kind}:{s.run_id}"
        if s.points[0][0] is None:
            y = s.points[0][1]
            line = ax.axhline(y, color="black" if is_ref else colour, linewidth=2.6 if is_ref else 1.8,
                              linestyle="-" if is_ref else (0, (6, 3)), zorder=6 if is_ref else 4, label=label)
            line.set_gid(gid)
            ax.annotate(f"{y:.2f}", xy=(1.0, y), xycoords=("axes fraction", "data"), xytext=(3, 0),
                        textcoords="offset points", va="center", fontsize=7,
                        color="black" if is_ref else colour)
            continue
        by_loop = dict(s.points)
        ys = [by_loop.get(k, math.nan) for k in loops]  # NaN breaks the line at an untested loop
        if s.kind == "test":
            (line,) = ax.plot(loops, ys, "-o", color=colour, markersize=7, linewidth=1.8, zorder=5, label=label,
                              markerfacecolor="white" if s.same_dataset else colour)
        else:
            (line,) = ax.plot(loops, ys, "--.", color=colour, alpha=0.55, linewidth=1.2, zorder=3, label=label)
        line.set_gid(gid)
    for r in result.rows:
        if r.selected and r.stage == Stage.FEEDBACK and r.loop is not None and r.run_id in colour_of:
            ax.axvspan(r.loop - 0.3, r.loop + 0.3, color=colour_of[r.run_id], alpha=0.12, zorder=1)
    if values:
        lo, hi = min(values), max(values)
        pad = max(1.0, 0.12 * (hi - lo))
        ax.set_ylim(lo - pad, hi + pad)  # keeps every line off the frame
    else:
        ax.text(0.5, 0.5, f"no {m} values to plot: no run is tested{f' on {d}' if d else ''}", ha="center",
                va="center", transform=ax.transAxes)
    ax.set_xlim(0.5, last_loop + 0.5)
    ax.set_xticks(loops)
    ax.set_xlabel("feedback loop (runs without loops: horizontal lines)")
    ax.set_ylabel(f"{m} (x100)")
    fig.suptitle(f"{m} on {d or '-'}: test (solid), held-out (dashed); shaded = held-out selected loop", fontsize=9,
                 x=0.01, ha="left")
    ax.grid(alpha=0.3)
    if content.series:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.06, 1.0), borderaxespad=0.0)
    if content.untested:
        fig.text(0.01, 0.01, f"not tested{f' on {d}' if d else ''}: " + ", ".join(content.untested), fontsize=7)
    fig.tight_layout(rect=(0, 0.04 if content.untested else 0, 1, 1))
    return fig


def plot_comparison(result, path: Path, dataset: str | None = None) -> tuple[Path, PlotContent]:
    """Write the plot as a PNG at ``path`` (atomically); returns the path and what it shows."""
    path = Path(path).expanduser()
    if not path.parent.is_dir():
        raise ConfigError(f"--plot {path}: the folder {path.parent} does not exist.")
    content = plot_content(result, dataset)
    fig = build_figure(result, content)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path, content


def plot_loops(result: Comparison, path: Path) -> Path:
    """`compare --plot PATH`: `plot_comparison` on the reference's test dataset; returns the path."""
    return plot_comparison(result, path)[0]
