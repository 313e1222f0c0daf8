"""Feedback training: schedule, loop bookkeeping, exact resume, per-loop runs and selection."""

from __future__ import annotations

import json
import re

import pytest
import torch
from typer.testing import CliRunner

from aaclip_cli.main import app
from aaclip_core.jobs.feedback import (
    checkpoint_name,
    latest_checkpoint,
    next_stage,
    train_feedback,
)
from aaclip_core.recipe import load_recipe
from aaclip_core.reporter import Reporter
from aaclip_core.training.schedule import WarmupCosine, loop_epochs, loop_lr, warmup_cosine_factor

runner = CliRunner()

# Small enough for CI: 2 loops of one epoch per stage on 8 images per class.
FAST = [
    "feedback.loops=2",
    "feedback.text_epochs_per_loop=1",
    "feedback.image_epochs_per_loop=1",
    "feedback.warmup_epochs=1",
    "data.train.shot=8",
    "feedback.val_fraction=0.25",
    "eval.aupro=false",
]


# ------------------------------------------------------------------------------------------ schedule


def test_loop_epochs_and_lr_decay():
    assert [loop_epochs(15, 0.8, k) for k in range(1, 6)] == [15, 12, 10, 8, 6]
    assert loop_epochs(1, 0.5, 4) == 1  # never zero epochs
    assert loop_lr(5e-4, 0.8, 3) == pytest.approx(5e-4 * 0.64)


def test_warmup_starts_above_zero_then_cosine_decays():
    factors = [warmup_cosine_factor(s, 10, 2) for s in range(10)]
    assert factors[0] == pytest.approx(0.5)  # (step + 1) / warmup, never a zero first step
    assert factors[1] == pytest.approx(1.0)
    assert factors[2] == pytest.approx(1.0)  # cosine starts at the peak
    assert all(a > b for a, b in zip(factors[2:], factors[3:]))
    assert factors[-1] > 0


def test_warmup_cosine_drives_one_optimiser_through_loops():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1.0)
    first = WarmupCosine(opt, 1e-3, total_steps=4, warmup_steps=2)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5e-3)
    for _ in range(3):
        first.step()
    WarmupCosine(opt, 0.8e-3, total_steps=4, warmup_steps=2)  # the next loop: fresh schedule, same optimiser
    assert opt.param_groups[0]["lr"] == pytest.approx(0.4e-3)


def test_checkpoint_names_sort_numerically():
    names = [checkpoint_name(k, s) for k in (1, 2, 10) for s in (1, 2)] + ["final", "stage1"]
    assert latest_checkpoint(sorted(names)) == (10, 2)  # "loop_10" sorts before "loop_2" as text
    assert latest_checkpoint(["final"]) is None
    assert next_stage(None) == (1, 1)
    assert next_stage((3, 1)) == (3, 2)
    assert next_stage((3, 2)) == (4, 1)


# ------------------------------------------------------------------------------------------ CLI


def test_loops_out_of_range_is_refused_by_the_recipe(tmp_path, monkeypatch, tracking_uri):
    """--loops N is the setting feedback.loops=N: the recipe's range check speaks, naming it."""
    monkeypatch.chdir(tmp_path)
    for loops, bound in (("11", "less than or equal to 10"), ("0", "greater than or equal to 1")):
        result = runner.invoke(app, ["train", "feedback", "--recipe", "feedback-demo", "--loops", loops,
                                     "--tracking-uri", tracking_uri])
        assert result.exit_code == 2
        assert f"feedback.loops={loops}" in result.output and bound in result.output
        assert "Traceback" not in result.output


# ------------------------------------------------------------------------------------------ resume


class _InterruptAtLoop(Reporter):
    """Simulates Ctrl-C when the given loop starts."""

    def __init__(self, loop: int) -> None:
        self.at = loop

    def loop(self, loop: int, loops: int) -> None:
        if loop == self.at:
            raise KeyboardInterrupt


def _final_adapters(mlflow_uri: str, run_id: str, tmp_path) -> dict[str, torch.Tensor]:
    from aaclip_core.jobs import common
    from aaclip_core.registry.tracking import connect

    mlflow = connect(mlflow_uri)
    return common.run_checkpoint(mlflow, run_id, checkpoint_name(2, 2), tmp_path / run_id).adapters


@pytest.fixture(scope="module")
def fast_recipe(demo_overrides):
    return load_recipe("feedback-demo", demo_overrides + FAST)


def test_interrupted_job_resumes_to_the_same_weights(fast_recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    recipe, path = fast_recipe
    straight = train_feedback(recipe, path, tracking_uri=uri)

    with pytest.raises(KeyboardInterrupt):
        train_feedback(recipe, path, tracking_uri=uri, reporter=_InterruptAtLoop(2))
    from aaclip_core.registry.tracking import connect

    mlflow = connect(uri)
    killed = mlflow.search_runs(
        experiment_names=[recipe.tracking.experiment],
        filter_string="tags.`aaclip.stage` = 'feedback' and attributes.status = 'KILLED'",
        output_format="list",
    )
    assert len(killed) == 1
    interrupted_id = killed[0].info.run_id

    resumed = train_feedback(None, resume=interrupted_id, tracking_uri=uri)
    assert resumed["run_id"] == interrupted_id
    assert resumed["resumed_from"] == checkpoint_name(1, 2)
    assert mlflow.get_run(interrupted_id).info.status == "FINISHED"

    a = _final_adapters(uri, straight["run_id"], tmp_path)
    b = _final_adapters(uri, interrupted_id, tmp_path)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=f"{k} differs after resume")
    # The straight run's loop-1 and loop-2 weights differ: the comparison is not vacuous.
    from aaclip_core.jobs import common

    loop1 = common.run_checkpoint(mlflow, straight["run_id"], checkpoint_name(1, 2), tmp_path / "l1").adapters
    assert any(not torch.equal(loop1[k], a[k]) for k in a)


def _train_feedback_cli(demo_overrides, tmp_path, monkeypatch) -> tuple[str, list[str], dict]:
    """`aaclip train feedback --json` on the demo in a fresh store: (store URI, the --set flags, its result)."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sets = [x for s in demo_overrides + FAST for x in ("--set", s)]
    out = runner.invoke(app, ["train", "feedback", "--recipe", "feedback-demo", "--json", "--tracking-uri", uri, *sets])
    assert out.exit_code == 0, out.output
    return uri, sets, json.loads(out.stdout)


def test_feedback_cli_logs_children_selection_and_tests_selected_loop(demo_overrides, tmp_path, monkeypatch):
    uri, sets, result = _train_feedback_cli(demo_overrides, tmp_path, monkeypatch)
    parent_id = result["run_id"]
    assert set(result["val_per_loop"]) == {"1", "2"}

    import mlflow

    client = mlflow.MlflowClient(uri)
    parent = client.get_run(parent_id)
    assert parent.data.tags["aaclip.stage"] == "feedback"
    assert parent.data.tags["aaclip.selected_checkpoint"] == checkpoint_name(result["selected_loop"], 2)
    assert "held-out" in parent.data.tags["aaclip.selection"]
    assert parent.data.tags["aaclip.selection_fallback"] == "false" and result["selection_fallback"] is False
    assert len(client.get_metric_history(parent_id, "val/pixel_auroc")) == 2
    ckpts = {a.path.split("/")[-1] for a in client.list_artifacts(parent_id, "checkpoints")}
    assert ckpts == {checkpoint_name(k, s) for k in (1, 2) for s in (1, 2)}

    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'"
    )
    loops = sorted(int(c.data.tags["aaclip.loop"]) for c in children)
    assert loops == [1, 2]
    for child in children:
        keys = set(child.data.metrics)
        assert {"stage1/loss", "stage2/loss", "stage1/lr", "stage2/lr", "val/pixel_auroc"} <= keys
        assert "stage2/grad_norm/image_adapters" in keys and "stage2/grad_norm/image_cross_attn" in keys
        assert child.data.params["stage1_features"] == ("dpam" if child.data.tags["aaclip.loop"] == "1" else "image_path")

    tested = runner.invoke(app, ["test", "--run", parent_id, "--json", "--tracking-uri", uri, "--set", "eval.aupro=false"])
    assert tested.exit_code == 0, tested.output
    report = json.loads(tested.stdout)
    assert report["checkpoint"] == checkpoint_name(result["selected_loop"], 2)
    assert report["checkpoint_loop"] == result["selected_loop"]

    loop1 = runner.invoke(app, ["test", "--run", parent_id, "--loop", "1", "--json", "--tracking-uri", uri,
                                "--set", "eval.aupro=false"])
    assert loop1.exit_code == 0, loop1.output
    assert json.loads(loop1.stdout)["checkpoint"] == checkpoint_name(1, 2)


def test_feedback_job_reads_well_in_doctor_and_runs(demo_overrides, tmp_path, monkeypatch):
    """`doctor` says the gradient-norm caveat once, under the checks it covers (and once in --json);
    `runs` shows a finished job's selected loop's held-out value, labelled as held-out."""
    uri, sets, result = _train_feedback_cli(demo_overrides, tmp_path, monkeypatch)
    run_id, loop = result["run_id"], result["selected_loop"]

    doc = json.loads(runner.invoke(app, ["doctor", run_id, "--json", "--tracking-uri", uri]).stdout)
    gradient = [c["name"] for c in doc["checks"] if c["name"].startswith("gradient norm")]
    assert len(gradient) >= 2
    [note] = doc["notes"]  # the tiny demo backbone runs far above the band: one note for all of them
    assert set(note["covers"]) <= set(gradient) and len(note["covers"]) >= 2
    assert "feedback.grad_clip" in note["text"] and "only vanishing and dead" in note["text"]
    assert not any("grad_clip" in c["detail"] or "only vanishing" in c["detail"] for c in doc["checks"])
    text = runner.invoke(app, ["doctor", run_id, "--tracking-uri", uri]).stdout
    assert text.count("only vanishing and dead") == 1 and text.count("feedback.grad_clip") == 1
    lines = text.splitlines()
    note_at = next(i for i, line in enumerate(lines) if line.startswith("NOTE"))
    last_covered = max(i for i, line in enumerate(lines) if any(f" {n} = " in line for n in note["covers"]))
    assert last_covered < note_at  # under the checks it covers: no gradient check after it
    assert not any(re.match(r"(PASS|WARN|FAIL|SKIP) +gradient norm ", line) for line in lines[note_at + 1:])

    held_out = result["val_per_loop"][str(loop)]
    [row] = json.loads(runner.invoke(app, ["runs", "--stage", "feedback", "--json", "--tracking-uri", uri]).stdout)
    assert row["run_id"] == run_id and row["metric"] == "val/pixel_auroc" and row["metric_loop"] == loop
    assert row["value"] == pytest.approx(held_out)
    table = runner.invoke(app, ["runs", "--stage", "feedback", "--tracking-uri", uri]).stdout
    assert f"held-out pixel_auroc {100 * held_out:.2f} (loop {loop})" in table
