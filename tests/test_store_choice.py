"""Which store a command uses, as users set it: `--tracking-uri`, else `MLFLOW_TRACKING_URI`, else
`./mlflow.db` in the working folder (real `aaclip runs` processes over three real SQLite stores); and
what the listing commands list (`runs --limit`, `recipes list`)."""

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


def test_runs_limit_lists_the_newest_runs_only(tmp_path):
    first = _store_with_one_run(tmp_path / "mlflow.db", "first")
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("aaclip").experiment_id
    newer = client.create_run(experiment, tags={"aaclip.stage": "base"}, run_name="newer").info.run_id
    client.set_terminated(newer)
    assert set(_listed(tmp_path, MLFLOW_TRACKING_URI="")) == {first, newer}
    assert _listed(tmp_path, "--limit", "1", MLFLOW_TRACKING_URI="") == [newer]


def test_recipes_list_names_every_shipped_recipe_with_its_description():
    from pathlib import Path

    done = aaclip("recipes", "list")
    assert done.returncode == 0, done.stderr
    listed = {line.split()[0]: line.split(None, 1)[1] for line in done.stdout.splitlines() if line.strip()}
    shipped = {p.stem for p in (Path(__file__).resolve().parents[1] / "recipes").glob("*.toml")}
    assert set(listed) == shipped
    assert all(description.strip() for description in listed.values())
