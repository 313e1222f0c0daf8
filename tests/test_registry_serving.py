"""`aaclip register`, `aaclip predict --model models:/...` and `mlflow models serve`, end to end with
real components: a tiny tested base run and an untested cross run on a SQLite store, registered as
two versions of one name; `mlflow models serve` started as a real process on 127.0.0.1 and sent real
HTTP requests; the alias moved and the server restarted on it; and one run registered through the
real `mlflow server` fixture."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from clirun import set_flags
from typer.testing import CliRunner

from aaclip_cli.main import app

pytestmark = pytest.mark.integration

CLASS = "fabric"
NAME = "fabric-detector"
TOL = 1e-4
SMALL = [f'data.train.classes=["{CLASS}"]', f'data.test.classes=["{CLASS}"]', "data.train.shot=8",
         "data.test.shot=8", "stage1.epochs=1", "stage2.epochs=1", "eval.aupro=false"]
SERVE_START_TIMEOUT_S = 180


def _cli(args, expect: int | None = 0):
    res = CliRunner().invoke(app, [str(a) for a in args])
    if expect is not None:
        assert res.exit_code == expect, (res.exit_code, res.stdout, res.stderr, res.exception)
    return res


def _rows(path: Path) -> dict[str, dict]:
    return {r["path"]: r for r in map(json.loads, Path(path).read_text().splitlines())}


@pytest.fixture(scope="module")
def store(tmp_path_factory, demo_root, demo_overrides):
    """A tested base run (calibrated) and an untested cross run from it, on one SQLite store; the
    base run registered as version 1 with @champion."""
    work = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{work / 'mlflow.db'}"
    sets = set_flags(demo_overrides + SMALL)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        base = _cli(["train", "base", "--recipe", "demo", *sets, "--tracking-uri", uri, "-q"]).stdout.strip()
        _cli(["test", "--run", base, "--set", "eval.aupro=false", "--tracking-uri", uri, "-q"])
        cross = _cli(["train", "cross", "--from", base, "--recipe", "cross-demo", *sets, "--tracking-uri", uri,
                      "-q"]).stdout.strip()
        reg = _cli(["register", "--run", base, "--name", NAME, "--alias", "champion", "--tracking-uri", uri, "--json"])
        yield {"work": work, "uri": uri, "base": base, "cross": cross, "v1": json.loads(reg.stdout),
               "images": demo_root / "test" / CLASS / "test"}


def _predict(store, model: str, out: str) -> dict[str, dict]:
    res = _cli(["predict", "--model", model, store["images"], "--out", store["work"] / out, "--tracking-uri",
                store["uri"], "--json"])
    assert json.loads(res.stdout)["model"] == model
    return _rows(store["work"] / out / "predictions.jsonl")


def test_register_records_the_run_its_test_and_the_alias(store):
    v1 = store["v1"]
    assert v1["model_uri"] == f"models:/{NAME}/1" and v1["alias_uri"] == f"models:/{NAME}@champion"
    tags = v1["tags"]
    assert tags["aaclip.source_run"] == store["base"] and tags["aaclip.calibrated"] == "true"
    assert tags["aaclip.precision"] == "fp32" and len(tags["aaclip.recipe_hash"]) == 64
    assert tags["aaclip.calibration_dataset"] and tags["aaclip.classes"] == CLASS
    assert 0.0 <= float(tags["aaclip.test.pixel_auroc"]) <= 1.0
    import mlflow

    mlflow.set_tracking_uri(store["uri"])
    client = mlflow.MlflowClient()
    mv = client.get_model_version_by_alias(NAME, "champion")  # what the registry holds, not what we printed
    assert mv.version in ("1", 1) and mv.run_id == store["base"] and mv.tags == tags
    assert "Calibrated by" in mv.description
    model = mlflow.models.get_model_info(f"models:/{NAME}/1")
    assert model.signature.inputs.input_names() == ["image", "class_name"]
    assert [p.name for p in model.signature.params] == ["maps"]
    reqs = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}/1/requirements.txt",
                                                    dst_path=str(store["work"] / "reqs"))).read_text()
    assert "onnxruntime" in reqs and "torch" not in reqs and "open_clip" not in reqs


def test_predict_from_the_registry_scores_like_predict_run(store):
    by_alias = _predict(store, f"models:/{NAME}@champion", "pred-alias")
    res = _cli(["predict", "--run", store["base"], store["images"], "--out", store["work"] / "pred-run",
                "--tracking-uri", store["uri"], "--json"])
    by_run = _rows(store["work"] / "pred-run" / "predictions.jsonl")
    assert by_alias.keys() == by_run.keys() and len(by_run) >= 4 and json.loads(res.stdout)["n_errors"] == 0
    for path, a in by_run.items():
        b = by_alias[path]
        assert abs(a["image_score"] - b["image_score"]) <= TOL
        assert a["threshold"] == pytest.approx(b["threshold"]) and b["threshold"] is not None


def test_unknown_alias_name_and_file_store_are_one_paragraph(store):
    res = _cli(["predict", "--model", f"models:/{NAME}@nope", store["images"], "--tracking-uri", store["uri"]],
               expect=2)
    assert "no alias @nope" in res.output and "@champion -> 1" in res.output and "Traceback" not in res.output
    res = _cli(["predict", "--model", "models:/nobody/1", store["images"], "--tracking-uri", store["uri"]], expect=2)
    assert "No registered model 'nobody'" in res.output and NAME in res.output
    res = _cli(["register", "--run", store["base"], "--name", NAME, "--tracking-uri",
                str(store["work"] / "mlruns-store")], expect=2)
    assert "cannot hold a Model Registry" in res.output and not (store["work"] / "mlruns-store").exists()


def test_runs_shows_registered_versions(store):
    rows = json.loads(_cli(["runs", "--tracking-uri", store["uri"], "--json"]).stdout)
    by_id = {r["run_id"]: r for r in rows}
    assert by_id[store["base"]]["registered"] == [f"{NAME}/1 @champion"]
    assert by_id[store["cross"]]["registered"] == []
    text = _cli(["runs", "--tracking-uri", store["uri"]]).stdout
    assert f"{NAME}/1 @champion" in text


# ------------------------------------------------------------------------------- mlflow models serve


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    """`mlflow models serve -m URI --env-manager local` as a real process on 127.0.0.1."""

    def __init__(self, model_uri: str, tracking_uri: str, log: Path) -> None:
        self.url = f"http://127.0.0.1:{_free_port()}"
        env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri,
               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               "PYTHONPATH": os.pathsep.join(sys.path)}
        port = self.url.rsplit(":", 1)[1]
        cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
               "-h", "127.0.0.1", "-p", port, "-w", "1"]
        self.log = log
        with open(log, "wb") as f:
            self.proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + SERVE_START_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"mlflow models serve exited with {self.proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/ping", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"mlflow models serve not up after {SERVE_START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)

    def post(self, rows: list[list[str]], maps: bool = False) -> tuple[int, dict]:
        body = {"dataframe_split": {"columns": ["image", "class_name"], "data": rows}}
        if maps:
            body["params"] = {"maps": True}
        req = urllib.request.Request(f"{self.url}/invocations", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


def _b64(path: Path) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode()


def test_served_alias_scores_like_predict_rejects_bad_input_and_follows_the_alias(store):
    expected = _predict(store, f"models:/{NAME}/1", "pred-v1")
    paths = sorted(expected)[:4]
    server = _Server(f"models:/{NAME}@champion", store["uri"], store["work"] / "serve-1.log")
    try:
        status, body = server.post([[_b64(p), CLASS] for p in paths], maps=True)
        assert status == 200, body
        for p, got in zip(paths, body["predictions"]):
            assert abs(got["score"] - expected[p]["image_score"]) <= TOL
            assert got["threshold"] == pytest.approx(expected[p]["threshold"])
            assert got["verdict"] == expected[p]["verdict"]
            assert len(got["map"]) == len(got["map"][0]) > 1
        status, body = server.post([[_b64(paths[0]), CLASS], [base64.b64encode(b"not an image").decode(), CLASS]])
        assert status == 400 and body["error_code"] == "INVALID_PARAMETER_VALUE"
        assert "image 1 cannot be read" in body["message"] and "stack_trace" not in body
        assert "Traceback" not in json.dumps(body)
        status, body = server.post([[_b64(paths[0]), "carpet"]])
        assert status == 400 and "carpet" in body["message"] and CLASS in body["message"]
        assert "stack_trace" not in body
    finally:
        server.stop()
    # The untested cross run: registered with raw scores, said so; the alias moves to it.
    res = _cli(["register", "--run", store["cross"], "--name", NAME, "--alias", "champion", "--tracking-uri",
                store["uri"], "--json"])
    v2 = json.loads(res.stdout)
    assert v2["version"] == 2 and v2["tags"]["aaclip.calibrated"] == "false" and v2["stage"] == "cross"
    assert "UNCALIBRATED" in v2["description"] and "no calibration" in res.stderr
    expected2 = _predict(store, f"models:/{NAME}@champion", "pred-v2")
    server = _Server(f"models:/{NAME}@champion", store["uri"], store["work"] / "serve-2.log")
    try:
        status, body = server.post([[_b64(p), CLASS] for p in paths])
        assert status == 200, body
        for p, got in zip(paths, body["predictions"]):
            assert abs(got["score"] - expected2[p]["image_score"]) <= TOL
            assert got["threshold"] is None and got["verdict"] is None
        assert any(abs(got["score"] - expected[p]["image_score"]) > TOL for p, got in zip(paths, body["predictions"]))
    finally:
        server.stop()


def test_a_changed_stored_detector_is_refused(store):
    """Last in the module: it damages version 1's stored file."""
    [stored] = [p for p in (store["work"] / "mlruns").rglob("artifacts/detector/detector.onnx")
                if store["v1"]["logged_model"].split("/")[-1] in str(p)]
    with open(stored, "ab") as f:
        f.write(b"\0")
    res = _cli(["predict", "--model", f"models:/{NAME}/1", store["images"], "--tracking-uri", store["uri"]], expect=2)
    assert "sha256 differs" in res.output and f"models:/{NAME}/1" in res.output and "Traceback" not in res.output


def test_register_and_predict_through_the_tracking_server(mlflow_server, demo_overrides, demo_root, tmp_path):
    """A run trained, registered and predicted from the registry through a real `mlflow server`."""
    url = mlflow_server["url"]
    sets = set_flags(demo_overrides + SMALL)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path)
        run = _cli(["train", "base", "--recipe", "demo", *sets, "--tracking-uri", url, "-q"]).stdout.strip()
        res = _cli(["register", "--run", run, "--name", "server-detector", "--alias", "champion", "--tracking-uri",
                    url])
        assert res.stdout.strip() == "models:/server-detector/1"
        out = _cli(["predict", "--model", "models:/server-detector@champion", demo_root / "test" / CLASS / "test",
                    "--threshold", "0.5", "--tracking-uri", url, "--out", tmp_path / "pred", "--json"])
        assert json.loads(out.stdout)["n_errors"] == 0
        rows = json.loads(_cli(["runs", "--tracking-uri", url, "--json"]).stdout)
        assert {r["run_id"]: r["registered"] for r in rows}[run] == ["server-detector/1 @champion"]
        assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()
