"""aaclip against a real `mlflow server` (SQLite backend, proxied artifacts, loopback address), as a
team uses it: stdout carries only what each command promises, artifacts travel through the server,
and only the files a command needs are downloaded.

One tiny run (one class, 1 + 2 epochs) is trained per module in a real child process whose stdout
and stderr are pipes, as under nohup or CI; the other commands run in-process from empty folders.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from clirun import set_flags
from typer.testing import CliRunner

from aaclip_cli.main import app

# Real processes and servers, minutes long: CI's second step (`pytest -m integration`).
pytestmark = pytest.mark.integration

CLASS = "fabric"
EPOCH_LINE = re.compile(
    r"^(?:loop \d+/\d+ )?stage(?P<stage>[12]) epoch (?P<epoch>\d+)/(?P<epochs>\d+) loss \d+\.\d{4} "
    r"lr \S+ elapsed \d+:\d\d:\d\d eta \d+:\d\d:\d\d$",
    re.MULTILINE,
)


def _cli(args: list, cwd: Path, expect: int = 0):
    """The CLI in-process from ``cwd``; stdout and stderr kept apart."""
    old = Path.cwd()
    os.chdir(cwd)
    try:
        res = CliRunner().invoke(app, [str(a) for a in args])
    finally:
        os.chdir(old)
    assert res.exit_code == expect, (res.exit_code, res.stdout, res.stderr, res.exception)
    return res


def _one_json_document(stdout: str):
    """json.loads refuses anything around the document: a link line, a second document, a table."""
    assert "View run" not in stdout and "View experiment" not in stdout
    return json.loads(stdout)


def _empty_dir(tmp_path_factory, name: str) -> Path:
    return tmp_path_factory.mktemp(name)


def _no_local_store(folder: Path) -> None:
    """Nothing fell back to a local store: every record and artifact went to the server."""
    assert not (folder / "mlflow.db").exists() and not (folder / "mlruns").exists()


@pytest.fixture(scope="module")
def trained(mlflow_server, demo_overrides, tmp_path_factory):
    """`aaclip train base` in a child process against the server, from an empty folder."""
    work = _empty_dir(tmp_path_factory, "server-train")
    sets = set_flags(demo_overrides + [f'data.train.classes=["{CLASS}"]', f'data.test.classes=["{CLASS}"]',
                                   "stage1.epochs=1", "stage2.epochs=2", "eval.aupro=false"])
    proc = subprocess.run(
        [sys.executable, "-m", "aaclip_cli.main", "train", "base", "--recipe", "demo", *sets,
         "--tracking-uri", mlflow_server["url"]],
        cwd=work, capture_output=True, text=True, timeout=2400,  # minutes on a busy 2-core machine
    )
    assert proc.returncode == 0, proc.stderr
    _no_local_store(work)
    return {"run": proc.stdout.strip(), "stdout": proc.stdout, "stderr": proc.stderr, "uri": mlflow_server["url"]}


@pytest.fixture(scope="module")
def tested(trained, tmp_path_factory):
    work = _empty_dir(tmp_path_factory, "server-test")
    res = _cli(["test", "--run", trained["run"], "--json", "--tracking-uri", trained["uri"]], work)
    _no_local_store(work)
    return {"report": _one_json_document(res.stdout), "work": work}


def test_train_prints_only_the_run_id(trained):
    assert re.fullmatch(r"[0-9a-f]{32}\n", trained["stdout"]), trained["stdout"]


def test_train_without_a_terminal_prints_one_line_per_epoch(trained):
    lines = [m.groupdict() for m in EPOCH_LINE.finditer(trained["stderr"])]
    assert [(d["stage"], d["epoch"], d["epochs"]) for d in lines] == [
        ("1", "1", "1"), ("2", "1", "2"), ("2", "2", "2")
    ], trained["stderr"]


def test_run_and_experiment_live_on_the_server(trained, mlflow_server):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=trained["uri"])
    run = client.get_run(trained["run"])
    assert run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied through the server
    stored = list(mlflow_server["artifacts"].rglob(f"{trained['run']}/artifacts/checkpoints/final/adapters.safetensors"))
    assert len(stored) == 1
    # The MLflow UI opens the experiment as a model-training one, not on the GenAI overview.
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.tags.get("mlflow.experimentKind") == "custom_model_development"


def test_test_json_is_one_document_and_reads_the_checkpoint_through_the_server(trained, tested, mlflow_server):
    report = tested["report"]
    assert report["checkpoint"] == "final" and report["classes"][0]["class_name"] == CLASS
    assert 0.0 <= report["mean"]["pixel_auroc"] <= 1.0
    log = mlflow_server["log"].read_text()
    checkpoint_gets = re.findall(rf'"GET \S*{trained["run"]}/artifacts/checkpoints/final/(\S+) HTTP', log)
    # The weights came through the server, and only what evaluating needs: no optimiser or RNG state.
    assert sorted(set(checkpoint_gets)) == ["adapters.safetensors", "manifest.json"], checkpoint_gets


def test_test_human_output_is_the_table_on_stdout(trained, tmp_path_factory):
    work = _empty_dir(tmp_path_factory, "server-test-human")
    res = _cli(["test", "--run", trained["run"], "-q", "--set", "eval.aupro=false", "--tracking-uri", trained["uri"]],
               work)
    assert "pixel AUROC" in res.stdout and CLASS in res.stdout and "mean" in res.stdout
    assert "View run" not in res.stdout and "test run" in res.stderr


def test_predict_json_through_the_server(trained, tested, demo_root, tmp_path_factory):
    work = _empty_dir(tmp_path_factory, "server-predict")
    images = sorted((demo_root / "test" / CLASS / "test" / "good").glob("*.png"))[:2]
    res = _cli(["predict", "--run", trained["run"], *images, "--out", work / "out", "--json",
                "--tracking-uri", trained["uri"]], work)
    doc = _one_json_document(res.stdout)
    assert doc["n_images"] == 2 and doc["n_errors"] == 0
    # Calibration comes from the run's most recent finished test run; other tests in this module may
    # have tested the same run after the `tested` fixture, so ask the server which one that is.
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=trained["uri"])
    exps = [e.experiment_id for e in client.search_experiments()]
    test_runs = client.search_runs(exps, f"tags.\"aaclip.source_run\" = '{trained['run']}' and attributes.status = 'FINISHED'",
                                   order_by=["attributes.start_time DESC"])
    assert tested["report"]["run_id"] in [r.info.run_id for r in test_runs]
    assert doc["calibration"]["test_run_id"] == test_runs[0].info.run_id


def test_export_then_import_through_the_server(trained, tmp_path_factory):
    work = _empty_dir(tmp_path_factory, "server-import")
    exported = _cli(["export", "--run", trained["run"], work / "ref", "--tracking-uri", trained["uri"]], work)
    files = exported.stdout.split()
    assert [Path(f).name for f in files] == ["text_adapter.pth", "image_adapter_2.pth"]
    res = _cli(["import", "--text-adapter", files[0], "--image-adapter", files[1], "--recipe", "demo",
                "--json", "--tracking-uri", trained["uri"]], work)
    doc = _one_json_document(res.stdout)
    _no_local_store(work)

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=trained["uri"])
    paths = [a.path for a in client.list_artifacts(doc["run_id"], "checkpoints/final")]
    assert "checkpoints/final/adapters.safetensors" in paths


def test_compare_json_and_report_through_the_server(trained, tested, tmp_path_factory):
    work = _empty_dir(tmp_path_factory, "server-compare")
    res = _cli(["compare", trained["run"], "--bootstrap", "0", "--json", "--tracking-uri", trained["uri"]], work)
    doc = _one_json_document(res.stdout)
    assert [r["run_id"] for r in doc["rows"]] == [trained["run"]]
    human = _cli(["compare", trained["run"], "--bootstrap", "0", "--tracking-uri", trained["uri"]], work)
    assert "Runs compared" in human.stdout and trained["run"][:8] in human.stdout
    shutil.rmtree(work)


def test_runs_lists_the_servers_runs_by_prefix_and_stage(trained, tested, tmp_path_factory):
    work = _empty_dir(tmp_path_factory, "server-runs")
    listed = _one_json_document(_cli(["runs", "--json", "--tracking-uri", trained["uri"]], work).stdout)
    by_id = {r["run_id"]: r for r in listed}
    assert by_id[trained["run"]]["stage"] == "base" and by_id[trained["run"]]["status"] == "FINISHED"
    assert by_id[tested["report"]["run_id"]]["stage"] == "test"
    only_base = _one_json_document(_cli(["runs", "--stage", "base", "--json", "--tracking-uri", trained["uri"]],
                                        work).stdout)
    assert [r["run_id"] for r in only_base] == [trained["run"]]
    # A prefix resolves through the server like a full id.
    res = _cli(["compare", trained["run"][:10], "--bootstrap", "0", "--json", "--tracking-uri", trained["uri"]], work)
    assert [r["run_id"] for r in _one_json_document(res.stdout)["rows"]] == [trained["run"]]
    _no_local_store(work)
