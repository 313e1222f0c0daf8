"""`aaclip compare SWEEP_ID --plot`: a sweep's objective per trial and per setting."""

from __future__ import annotations

import math
from pathlib import Path

from aaclip_core.errors import ConfigError
from aaclip_core.files import atomic_path
from aaclip_core.registry.sweeps import SweepView


def plot_sweep(view: SweepView, path: Path) -> Path:
    """A PNG: the objective per trial (by state), then one panel per setting (objective against it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    path = Path(path).expanduser()
    if not path.parent.is_dir():
        raise ConfigError(f"--plot {path}: the folder {path.parent} does not exist.")
    keys = sorted({k for t in view.trials for k in t["params"]})
    fig, axes = plt.subplots(1, 1 + len(keys), figsize=(4.2 * (1 + len(keys)), 3.6), squeeze=False)
    styles = {"COMPLETE": ("o", "tab:blue"), "PRUNED": ("x", "tab:orange"), "FAIL": ("v", "tab:red")}
    shown = [t for t in view.trials if t["value"] is not None and math.isfinite(t["value"])]

    def scatter(ax, xs_of):
        for state, (marker, colour) in styles.items():
            pts = [(xs_of(t), 100 * t["value"]) for t in shown if t["state"] == state and xs_of(t) is not None]
            if pts:
                ax.scatter(*zip(*pts), marker=marker, color=colour, label=state.lower())
        best = [t for t in shown if t["number"] == view.best_trial]
        if best and xs_of(best[0]) is not None:
            ax.scatter([xs_of(best[0])], [100 * best[0]["value"]], s=160, facecolors="none", edgecolors="black",
                       label="best")
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(4, integer=xs_of is number))

    def number(t):
        return t["number"]

    ax = axes[0][0]
    scatter(ax, number)
    ax.set_xlabel("trial")
    ax.set_ylabel(f"held-out {view.objective} (x100)")
    ax.legend(fontsize=7)
    for ax, key in zip(axes[0][1:], keys):
        values = [t["params"].get(key) for t in view.trials]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values if v is not None)
        if numeric:
            scatter(ax, lambda t, key=key: t["params"].get(key))
            if all(v is not None and v > 0 for v in values) and max(values) / min(values) > 20:
                ax.set_xscale("log")
        else:
            cats = sorted({str(v) for v in values if v is not None})
            scatter(ax, lambda t, key=key: cats.index(str(t["params"][key])) if key in t["params"] else None)
            ax.set_xticks(range(len(cats)), cats)  # after scatter's locator: one tick per choice
        imp = view.importances.get(key)
        ax.set_xlabel(key + (f"  (importance {imp:.2f})" if imp is not None else ""))
    fig.suptitle(f"sweep {view.study}: held-out {view.objective} per trial and per setting", fontsize=9, x=0.01,
                 ha="left")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path
