"""Which store a command uses, as users set it: `--tracking-uri`, else `MLFLOW_TRACKING_URI`, else
`./mlflow.db` in the working folder (real `aaclip runs` processes over three real SQLite stores)."""

from __future__ import annotations

import json

from clirun import aaclip, child_env
from mlflow import MlflowClient


def _store_with_one_run(path, name: str) -> str:
    client = MlflowClient(f"sqlite:///{path}")
    run = client.create_run(client.create_experiment("aaclip"), tags={"aaclip.stage": "base"}, run_name=name)
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def _listed(tmp_path, *args: str, **env: str) -> list[str]:
    done = aaclip("runs", "--json", *args, cwd=tmp_path, env=child_env(**env))
    assert done.returncode == 0, done.stderr
    return [row["run_id"] for row in json.loads(done.stdout)]


def test_the_flag_wins_then_the_environment_then_the_working_folder(tmp_path):
    flag = _store_with_one_run(tmp_path / "flag.db", "flag")
    env = _store_with_one_run(tmp_path / "env.db", "env")
    default = _store_with_one_run(tmp_path / "mlflow.db", "default")
    by_env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'env.db'}"}
    assert _listed(tmp_path, "--tracking-uri", f"sqlite:///{tmp_path / 'flag.db'}", **by_env) == [flag]
    assert _listed(tmp_path, **by_env) == [env]
    assert _listed(tmp_path, MLFLOW_TRACKING_URI="") == [default]
