"""Feedback loop selection: one rule (aaclip_core.evaluation.selection), known metric names only, and a metric
that no loop can define refused before training or, when only known afterwards, a loud fallback."""

from __future__ import annotations

import math

import pytest
from typer.testing import CliRunner

from aaclip_cli.main import app
from aaclip_core.errors import ConfigError
from aaclip_core.evaluation.selection import check_selection_metric, select_loop
from aaclip_core.recipe import load_recipe

runner = CliRunner()


def test_select_loop_prefers_best_then_earliest():
    val = {1: {"pixel_auroc": 0.8}, 2: {"pixel_auroc": 0.9}, 3: {"pixel_auroc": 0.9, "aupro": math.nan}}
    sel = select_loop(val, "pixel_auroc")
    assert (sel.loop, sel.fallback, sel.best_value) == (2, False, 0.9)
    assert "80.00" in sel.reason and "90.00" in sel.reason


def test_a_metric_undefined_for_every_loop_falls_back_loudly():
    sel = select_loop({1: {"aupro": math.nan}, 2: {"aupro": math.nan}, 3: {"pixel_auroc": 0.7}}, "aupro")
    assert sel.fallback and sel.loop == 3 and sel.best_value is None
    assert sel.reason.startswith("FALLBACK") and "aupro" in sel.reason


def _train(tmp_path, monkeypatch, *sets: str):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["train", "feedback", "--recipe", "feedback-demo", "--tracking-uri", uri]
    return runner.invoke(app, args + [x for s in sets for x in ("--set", s)]), tmp_path / "mlflow.db"


def test_misspelled_selection_metric_is_refused_naming_the_key(tmp_path, monkeypatch):
    result, db = _train(tmp_path, monkeypatch, "feedback.selection_metric=pixel_aurock")
    assert result.exit_code == 2, result.output
    assert "feedback.selection_metric" in result.output and "pixel_auroc" in result.output
    assert "Traceback" not in result.output and not db.exists()  # refused before anything ran


def test_aupro_selection_with_aupro_off_is_refused_before_training(tmp_path, monkeypatch):
    result, db = _train(tmp_path, monkeypatch, "feedback.selection_metric=aupro", "eval.aupro=false")
    assert result.exit_code == 2, result.output
    assert "eval.aupro = false" in result.output and "feedback.selection_metric" in result.output
    assert not db.exists()  # no store touched, no loop trained


def test_a_validation_split_of_one_kind_is_refused():
    recipe, _ = load_recipe("feedback-demo", [])
    with pytest.raises(ConfigError, match="only normal images"):
        check_selection_metric(recipe, [0, 0, 0])
    check_selection_metric(recipe, [0, 1, 0])  # both kinds: every metric can be defined
