"""`compare --plot` and the compare table: every run drawn, only tested points, a visible reference
line, same-dataset tests marked; the table fits a 120-column terminal."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from aaclip_core.compare import Comparison, Row
from aaclip_core.compare import TestResult as Tested
from aaclip_core.compare.plot import build_figure, plot_comparison, plot_content

DATASET = "MVTec"


def _test(value: float, same: bool = False) -> Tested:
    return Tested(run_id="t" * 32, dataset=DATASET, checkpoint="final", metrics={"pixel_auroc": value,
                      "image_auroc": value - 0.05}, root="/data/mvtec", protocol={}, protocol_logged=True,
                      same_dataset=same)


def _row(run: str, stage: str, loop=None, test=None, held=None, selected=False) -> Row:
    ckpt = f"loop_{loop}_stage_2" if loop else "final"
    return Row(key=run[:8] + (f"/loop{loop}" if loop else ""), run_id=run, stage=stage,
               label=f"{stage} {run[:8]}" + (f" loop {loop}" if loop else ""), loop=loop, checkpoint=ckpt,
               selected=selected, selection="declared", selection_detail="", attrs={"seed": 111},
               tests={DATASET: test} if test else {}, held_out=held or {})


def _comparison() -> Comparison:
    base = _row("b" * 32, "base", test=_test(0.80), selected=True)
    cross = _row("c" * 32, "cross", test=_test(0.83, same=True), selected=True)
    feedback = [
        _row("f" * 32, "feedback", loop=1, test=_test(0.81), held={"pixel_auroc": 0.90}),
        _row("f" * 32, "feedback", loop=2, held={"pixel_auroc": 0.92}, selected=True),  # not tested
        _row("f" * 32, "feedback", loop=3, test=_test(0.85), held={"pixel_auroc": 0.91}),
    ]
    untested = _row("u" * 32, "base", selected=True)
    rows = [base, cross, *feedback, untested]
    return Comparison(rows=rows, reference=base, datasets=[DATASET], metric="pixel_auroc", comparisons=[],
                      differences=[], groups=[], bootstrap_resamples=0, notes=[])


def test_plot_has_one_test_series_per_tested_run_and_lists_the_rest():
    result = _comparison()
    content = plot_content(result)
    tests = [s for s in content.series if s.kind == "test"]
    assert sorted(s.run_id[0] for s in tests) == ["b", "c", "f"]  # one per tested run, cross included
    assert content.untested == ["base uuuuuuuu"]
    fb = next(s for s in tests if s.run_id.startswith("f"))
    assert fb.points == [(1, 81.0), (3, 85.0)]  # only tested loops
    assert next(s for s in tests if s.run_id.startswith("c")).same_dataset
    fig = build_figure(result, content)
    ax = fig.axes[0]
    gids = [line.get_gid() for line in ax.get_lines() if line.get_gid()]
    assert sorted(g for g in gids if g.startswith("test:")) == sorted(f"test:{s.run_id}" for s in tests)
    assert len(gids) == len(set(gids)) == len(content.series)
    line = next(line for line in ax.get_lines() if line.get_gid() == "test:" + "f" * 32)
    ys = np.asarray(line.get_ydata(), dtype=float)
    assert math.isnan(ys[1]) and ys[0] == 81.0 and ys[2] == 85.0  # no line through untested loop 2
    lo, hi = ax.get_ylim()
    assert lo < 80.0 - 0.5 and hi > 85.0 + 0.5  # the reference line (80) is off the frame
    ref = next(line for line in ax.get_lines() if line.get_gid() == "test:" + "b" * 32)
    assert ref.get_color() == "black" and ref.get_zorder() > line.get_zorder()
    labels = ax.get_legend_handles_labels()[1]
    assert any("cross cccccccc" in label and "training data" in label for label in labels)
    assert any("(reference)" in label for label in labels)


def test_plot_is_written_as_a_png(tmp_path):
    path, content = plot_comparison(_comparison(), tmp_path / "plot.png")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] >= 800
    assert not list(tmp_path.glob(".*tmp"))


def _two_datasets() -> Comparison:
    result = _comparison()
    for r in result.rows:
        if r.tests:
            t = r.tests[DATASET]
            r.tests["VisA"] = Tested(run_id=t.run_id, dataset="VisA", checkpoint=t.checkpoint, metrics=dict(t.metrics),
                                     root="/data/visa", protocol={}, protocol_logged=True)
    result.datasets = [DATASET, "VisA"]
    return result


def _render(table, width: int) -> list[str]:
    import io

    from rich.console import Console

    console = Console(file=io.StringIO(), width=width, color_system=None, highlight=False)
    console.print(table)
    return console.file.getvalue().splitlines()


def test_compare_table_fits_120_columns_and_marks_same_dataset_tests():
    from aaclip_cli.compare_cmd import _table, table_metrics

    for result in (_comparison(), _two_datasets()):
        lines = _render(_table(result, table_metrics(None, wide=False)), 120)
        assert max(len(line) for line in lines) <= 120
        assert not any("…" in line for line in lines)
        text = "\n".join(lines)
        assert "83.00" in text and "(+3.00)‡" in text and "‡ tested on the" in text and "own training data" in text
        assert "AUPRO" not in text and "pixel AUROC" in text and "image AUROC" in text
    wide = "\n".join(_render(_table(_two_datasets(), table_metrics(None, wide=True), wide=True), 400))
    for name in ("pixel AP", "image AP", "AUPRO", "F1-max"):
        assert name in wide
    chosen = "\n".join(_render(_table(_comparison(), table_metrics(["image_ap"], wide=False)), 120))
    assert "image AP" in chosen and "pixel AUROC" not in chosen.split("held-out")[1].split("\n")[0]
