"""Shared fixtures: the synthetic demo data (generated once per session), the tiny demo recipe
pointed at it, and a throw-away MLflow store per test."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from aaclip_core.data import ensure_demo_data
from aaclip_core.recipe import Recipe, load_recipe


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo-data")
    ensure_demo_data(root)
    return root


@pytest.fixture(scope="session")
def demo_overrides(demo_root) -> list[str]:
    """--set values that point the demo recipe at the session's demo data."""
    return [
        f'data.train.root="{demo_root / "train"}"',
        f'data.test.root="{demo_root / "test"}"',
    ]


@pytest.fixture
def demo_recipe(demo_overrides) -> Recipe:
    return load_recipe("demo", demo_overrides)[0]


@pytest.fixture
def tracking_uri(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture
def make_model(demo_recipe):
    """Factory for a fresh tiny AA-CLIP (random backbone seeded, so every call is identical)."""
    from aaclip_core.model import build_model

    def make(recipe: Recipe | None = None, with_cross: bool = False, seed: int = 0):
        torch.manual_seed(seed)
        return build_model(recipe or demo_recipe, "cpu", with_cross=with_cross)

    return make


@pytest.fixture
def demo_batch(demo_recipe):
    """A few preprocessed demo images with masks, labels and class names."""
    from aaclip_core.training.data import fixed_batch, load_samples

    samples = load_samples(demo_recipe.data.train, demo_recipe.runtime.seed)
    # Two anomalous and two normal images of two classes.
    picked = [s for s in samples if s.label == 1][:2] + [s for s in samples if s.label == 0][-2:]
    return fixed_batch(picked, demo_recipe)


# ------------------------------------------------------------------------ a real tracking server

SERVER_START_TIMEOUT_S = 240  # a cold `mlflow server` import takes a minute on a busy 2-core machine


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on the loopback address, as a team runs it: SQLite backend and
    proxied artifacts (clients upload and download through the server). Yields its URL and the
    paths of its request log and artifact folder; stopped at the end of the session."""
    import os
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = root / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # GenAI job workers: not needed, slow to start
    cmd = [
        sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts"),
    ]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server not healthy after {SERVER_START_TIMEOUT_S} s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield {"url": url, "log": log_path, "artifacts": root / "artifacts"}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
