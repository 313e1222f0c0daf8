"""`aaclip sweep` with real worker processes on the demo data: workers sharing one study through a
SQLite store and through a real `mlflow server`, a worker killed with SIGKILL, the pruner stopping a
feedback trial, and a data.test that does not exist (a sweep never reads test data)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from clirun import aaclip, one_paragraph, set_flags, start_aaclip

# Tiny trials: one class, four labelled images (two held out), one epoch per stage.
TINY = [
    'data.train.classes=["plank"]', "data.train.shot=4", "feedback.val_fraction=0.5", "feedback.min_val_images=0",
    "eval.aupro=false", "stage1.epochs=1", "stage2.epochs=1",
]
# Base trials over two learning rates.
BASE_SWEEP = [
    'sweep.train="base"', 'sweep.sampler="random"',
    'sweep.space={"stage2.lr"={low=1e-4, high=3e-3, log=true}, "stage1.lr"={low=1e-4, high=3e-3, log=true}}',
]


def _data(demo_root: Path, tmp_path: Path) -> list[str]:
    missing = tmp_path / "no-such-test-data"
    assert not missing.exists()
    return [f'data.train.root="{demo_root / "train"}"', f'data.test.root="{missing}"']


def _wait(proc: subprocess.Popen, timeout: float = 600) -> tuple[str, str]:
    out, err = proc.communicate(timeout=timeout)
    # A string, not a tuple: pytest would shorten the tuple's repr and hide the worker's own paragraph.
    assert proc.returncode == 0, f"exit {proc.returncode}; the worker's stderr ends:\n{err[-3000:]}"
    return out, err


def _runs(uri: str):
    import mlflow

    from aaclip_core.registry.tracking import connect

    # Opened as a worker opens it, under aaclip's creation lock: a bare client polling a store that a
    # worker is still creating runs MLflow's migrations beside it ("duplicate column name: step").
    connect(uri)
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client, client.search_runs(experiments, max_results=1000)


def _study(storage: str, name: str):
    import optuna

    return optuna.load_study(study_name=name, storage=storage)


def _check_shared_study(uri: str, storage: str, name: str, outs: list[str], target: int) -> None:
    """``target`` distinct finished or pruned trials, each one training run under the one sweep run."""
    from optuna.trial import TrialState

    from aaclip_core.record import Stage, Tag

    sweep_ids = {o.strip() for o in outs}
    assert len(sweep_ids) == 1, outs  # every worker printed the one sweep run
    sweep_id = sweep_ids.pop()
    client, runs = _runs(uri)
    sweeps = [r for r in runs if r.data.tags.get(Tag.STAGE) == Stage.SWEEP]
    assert [r.info.run_id for r in sweeps] == [sweep_id]
    assert sweeps[0].info.status == "FINISHED"
    trial_runs = [r for r in runs if r.data.tags.get(Tag.SWEEP) == sweep_id]
    study = _study(storage, name)
    counted = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(counted) == target, [(t.number, t.state) for t in study.trials]
    # Each worker draws its own settings (alike-seeded samplers would repeat the first worker's).
    assert len({tuple(sorted(t.params.items())) for t in counted}) == target
    # None duplicated or lost: one finished training run per counted trial, and no other.
    by_number = {int(r.data.tags[Tag.TRIAL]): r for r in trial_runs}
    assert len(by_number) == len(trial_runs) == target
    assert sorted(by_number) == sorted(t.number for t in counted)
    for t in counted:
        run = by_number[t.number]
        assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == sweep_id
        assert run.data.tags[Tag.STAGE] == "base"
        assert float(run.data.params["stage2.lr"]) == pytest.approx(t.params["stage2.lr"])
        assert run.data.metrics["val/pixel_auroc"] == pytest.approx(t.value)  # the held-out value, from the run
        assert "data.test" not in " ".join(a.path for a in client.list_artifacts(run.info.run_id, "data"))
    # Both workers trained: the trial runs come from two processes.
    assert len({r.data.tags[Tag.PID] for r in trial_runs}) == 2
    best = max(counted, key=lambda t: t.value)
    assert sweeps[0].data.tags[Tag.BEST_TRIAL] == str(best.number)
    assert sweeps[0].data.metrics["best_pixel_auroc"] == pytest.approx(best.value)


def _two_workers(cwd: Path, args: list[str]) -> list[str]:
    workers = [start_aaclip(*args, cwd=cwd) for _ in range(2)]
    return [_wait(w)[0] for w in workers]


@pytest.mark.integration
def test_two_workers_share_one_study_on_a_sqlite_store_without_reading_test_data(demo_root, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["sweep", "--recipe", "sweep-demo", "--study", "shared", "--trials", "6", "--tracking-uri", uri, "-q",
            *set_flags(_data(demo_root, tmp_path), TINY, BASE_SWEEP)]
    outs = _two_workers(tmp_path, args)
    # The study lives beside the tracking store.
    _check_shared_study(uri, f"sqlite:///{tmp_path / 'mlflow.optuna.db'}", "shared", outs, 6)


@pytest.mark.integration
def test_two_workers_share_one_study_through_a_tracking_server(mlflow_server, demo_root, tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    args = ["sweep", "--recipe", "sweep-demo", "--study", "served", "--trials", "6", "--tracking-uri",
            mlflow_server["url"], "--storage", storage, "-q", *set_flags(_data(demo_root, tmp_path), TINY, BASE_SWEEP)]
    outs = _two_workers(tmp_path, args)
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()
    _check_shared_study(mlflow_server["url"], storage, "served", outs, 6)


@pytest.mark.integration
def test_a_worker_killed_leaves_its_trial_failed_and_a_new_worker_finishes_the_study(demo_root, tmp_path):
    from optuna.trial import TrialState

    from aaclip_core.record import Tag

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["sweep", "--recipe", "sweep-demo", "--study", "killed", "--trials", "3", "--tracking-uri", uri, "-q",
            *set_flags(_data(demo_root, tmp_path), TINY, BASE_SWEEP,
                   ["sweep.heartbeat_seconds=1", "sweep.grace_seconds=4"])]
    first = start_aaclip(*args, cwd=tmp_path)
    running = _training_trial(first, uri)
    os.kill(first.pid, signal.SIGKILL)
    first.communicate()
    killed = int(running.data.tags[Tag.TRIAL])

    out, _ = _wait(start_aaclip(*args, cwd=tmp_path))
    study = _study(f"sqlite:///{tmp_path / 'mlflow.optuna.db'}", "killed")
    states = {t.number: t.state for t in study.trials}
    assert states[killed] == TrialState.FAIL  # never counted
    assert sum(s == TrialState.COMPLETE for s in states.values()) == 3
    client, runs = _runs(uri)
    dead = client.get_run(running.info.run_id)
    assert dead.info.status == "FAILED" and "stopped" in dead.data.tags[Tag.FAILURE]
    sweep_id = out.strip()
    assert client.get_run(sweep_id).info.status == "FINISHED"
    _check_lead(uri, study, sweep_id, tmp_path)


@pytest.mark.integration
def test_a_worker_stopped_with_sigterm_ends_its_trial_killed_uncounted_and_a_new_worker_finishes(demo_root, tmp_path):
    from optuna.trial import TrialState

    from aaclip_core.record import Tag

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["sweep", "--recipe", "sweep-demo", "--study", "stopped", "--trials", "2", "--tracking-uri", uri, "-q",
            *set_flags(_data(demo_root, tmp_path), TINY, BASE_SWEEP)]
    first = start_aaclip(*args, cwd=tmp_path)
    running = _training_trial(first, uri)
    first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 143, f"exit {first.returncode}; stderr ends:\n{err[-3000:]}"
    assert "Traceback" not in err and "SIGTERM" in err, err[-3000:]
    client, _ = _runs(uri)
    assert client.get_run(running.info.run_id).info.status == "KILLED"
    stopped = int(running.data.tags[Tag.TRIAL])
    storage = f"sqlite:///{tmp_path / 'mlflow.optuna.db'}"
    assert {t.number: t.state for t in _study(storage, "stopped").trials}[stopped] == TrialState.FAIL

    out, _ = _wait(start_aaclip(*args, cwd=tmp_path))
    states = {t.number: t.state for t in _study(storage, "stopped").trials}
    assert states[stopped] == TrialState.FAIL  # still not counted
    assert sorted(n for n, s in states.items() if s == TrialState.COMPLETE) == [n for n in sorted(states) if n != stopped]
    assert sum(s == TrialState.COMPLETE for s in states.values()) == 2
    assert client.get_run(running.info.run_id).info.status == "KILLED"  # the new worker left it as it ended
    assert client.get_run(out.strip()).info.status == "FINISHED"


def _training_trial(worker: subprocess.Popen, uri: str, timeout: float = 300):
    """The trial run ``worker`` is training, once the store shows it RUNNING (polled: no fixed sleep
    that a slow machine outruns)."""
    from aaclip_core.record import Tag

    db = Path(uri.removeprefix("sqlite:///"))
    deadline = time.monotonic() + timeout
    while True:
        assert worker.poll() is None, worker.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no trial started"
        if db.exists():
            running = [r for r in _runs(uri)[1] if Tag.TRIAL in r.data.tags and r.info.status == "RUNNING"]
            if running:
                return running[0]
        time.sleep(0.5)


def _check_lead(uri: str, study, sweep_id: str, cwd: Path) -> None:
    """Every finished trial keeps its held-out scores, and `aaclip doctor SWEEP_ID` bootstraps the best
    trial's lead over the runner-up from them: on all the images its point is the two held-out values'
    difference, paired (the trials share the split)."""
    from optuna.trial import TrialState

    from aaclip_core.record import Artifact

    client, _ = _runs(uri)
    finished = sorted((t for t in study.trials if t.state == TrialState.COMPLETE), key=lambda t: -t.value)
    for t in finished:
        kept = {a.path for a in client.list_artifacts(t.user_attrs["aaclip.run"], Artifact.validation("final"))}
        assert kept == {Artifact.validation("final", Artifact.IMAGE_SCORES),
                        Artifact.validation("final", Artifact.PIXEL_PAIRS)}
    store = ["--tracking-uri", uri]
    doc = json.loads(aaclip("doctor", sweep_id, "--json", *store, cwd=cwd).stdout)
    lead = next(c for c in doc["checks"] if c["name"] == "best trial's lead")
    assert lead["status"] in ("pass", "warn"), lead
    assert lead["value"] == pytest.approx(100 * (finished[0].value - finished[1].value), abs=1e-3)
    shown = aaclip("doctor", sweep_id, *store, cwd=cwd)
    assert f"trial {finished[0].number} leads trial {finished[1].number}" in shown.stdout, shown.stdout
    assert "paired bootstrap" in shown.stdout


def _grid_seed(key: str, choices: list, *first) -> int:
    """A seed with which Optuna's grid sampler tries the values ``first`` first, in that order (asked
    of Optuna itself, each trial told before the next is asked, as a worker does)."""
    import optuna

    for seed in range(200):
        study = optuna.create_study(direction="maximize", sampler=optuna.samplers.GridSampler({key: choices}, seed=seed))
        tried = []
        for _ in first:
            trial = study.ask()
            tried.append(trial.suggest_categorical(key, choices))
            study.tell(trial, 0.5)
        if tried == list(first):
            return seed
    raise AssertionError("no seed")


@pytest.mark.integration
def test_the_pruner_stops_a_hopeless_feedback_trial_before_its_last_loop(demo_root, tmp_path):
    from optuna.trial import TrialState

    from aaclip_core.record import Tag

    # A sane cross-attention weight, then one that drowns the image features: the second trial's first
    # loop is far below the first's, and the median pruner (one trial to compare with) stops it.
    seed = _grid_seed("cross.image_weight", [0.1, 1000.0], 0.1)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out, _ = _wait(start_aaclip(
        "sweep", "--recipe", "sweep-demo", "--study", "pruned", "--tracking-uri", uri, "-q", "--json",
        *set_flags(_data(demo_root, tmp_path), TINY, [
            "feedback.loops=2", "feedback.cross_attn_start_loop=1", "sweep.trials=2", 'sweep.sampler="grid"',
            f"sweep.seed={seed}", "sweep.pruner_startup_trials=1", 'sweep.space={"cross.image_weight"=[0.1, 1000.0]}',
        ]), cwd=tmp_path))
    result = json.loads(out)
    assert (result["finished"], result["pruned"], result["best_trial"]) == (1, 1, 0)
    study = _study(f"sqlite:///{tmp_path / 'mlflow.optuna.db'}", "pruned")
    pruned = study.trials[1]
    assert pruned.state == TrialState.PRUNED and pruned.params == {"cross.image_weight": 1000.0}
    assert sorted(pruned.intermediate_values) == [1]  # stopped after loop 1 of 2
    client, _ = _runs(uri)
    run_id = pruned.user_attrs["aaclip.run"]
    run = client.get_run(run_id)
    assert run.info.status == "KILLED" and "pruned after loop 1 of 2" in run.data.tags[Tag.PRUNED]
    kept = [a.path for a in client.list_artifacts(run_id, "checkpoints")]
    assert kept == ["checkpoints/loop_1_stage_1", "checkpoints/loop_1_stage_2"]  # its checkpoints kept
    # Each trial keeps the held-out scores of every loop it scored, the finished one's selected loop among them.
    from aaclip_core.record import Artifact

    assert [a.path for a in client.list_artifacts(run_id, Artifact.VALIDATION)] == ["validation/loop_1_stage_2"]
    finished = client.get_run(result["best_run"])
    selected = Artifact.validation(finished.data.tags[Tag.SELECTED_CHECKPOINT])
    assert {a.path for a in client.list_artifacts(result["best_run"], selected)} == {
        f"{selected}/{Artifact.IMAGE_SCORES}", f"{selected}/{Artifact.PIXEL_PAIRS}"}

    # The sweep in the other commands: runs lists it, compare shows its trials best first (and draws
    # them), doctor checks it, test --run SWEEP tests its best trial.
    sweep_id, store = result["run_id"], ["--tracking-uri", uri]
    listed = aaclip("runs", "--stage", "sweep", *store, cwd=tmp_path)
    assert listed.returncode == 0 and sweep_id in listed.stdout and "best_pixel_auroc" in listed.stdout
    shown = aaclip("compare", sweep_id, "--json", "--plot", str(tmp_path / "sweep.png"), *store, cwd=tmp_path)
    doc = json.loads(shown.stdout)
    assert [(t["number"], t["state"]) for t in doc["trials"]] == [(0, "COMPLETE"), (1, "PRUNED")]
    assert doc["best_trial"] == 0 and (tmp_path / "sweep.png").stat().st_size > 5000
    table = aaclip("compare", sweep_id, *store, cwd=tmp_path)
    assert "best: trial 0" in table.stdout and "pruned" in table.stdout
    doctor = json.loads(aaclip("doctor", sweep_id, "--json", *store, cwd=tmp_path).stdout)
    verdicts = {c["name"]: (c["status"], c["value"]) for c in doctor["checks"]}
    assert verdicts["sweep trials"] == ("pass", 2) and verdicts["diverged trials"] == ("pass", 0)
    assert verdicts["best trial's lead"] == ("skip", None)  # one finished trial: no runner-up
    # The demo's test images are other renders of the training classes: same name, declared.
    tested = aaclip("test", "--run", sweep_id, "--dataset", "synthetic", "--same-dataset", "--data-root",
                    str(demo_root / "test"), "--json", *store, cwd=tmp_path)
    assert tested.returncode == 0, tested.stderr[-2000:]
    test_run = client.get_run(json.loads(tested.stdout)["run_id"])
    assert test_run.data.tags[Tag.SOURCE_RUN] == result["best_run"]


# ----------------------------------------------------------------- a worker under torchrun

# Each trial a 2-process Gloo job on the CPU; a collective whose partner never comes (ranks told
# different things) fails in minutes, not after the default half hour.
TORCHRUN = ['runtime.device="cpu"', "runtime.threads=1"]


def _start_torchrun_sweep(args: list[str], cwd: Path) -> subprocess.Popen:
    """One sweep worker of 2 ranks: `torchrun --nproc_per_node 2 -- aaclip sweep ...`."""
    from test_distributed import BIN, _env, _free_port

    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(_free_port()), "--no-python", "--",
           str(BIN / "aaclip"), *args]
    return subprocess.Popen(cmd, cwd=cwd, env={**_env(), "AACLIP_DIST_TIMEOUT": "300"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _torchrun_sweep(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    proc = _start_torchrun_sweep(args, cwd)
    out, err = _wait(proc, timeout=900)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _trial_runs_of_two_ranks(uri: str, sweep_id: str, counted) -> dict:
    """Trial number -> its run: one run per counted trial and no other, each a child of the sweep run
    recorded by a 2-process job (rank 0 wrote it: one process id for all)."""
    from aaclip_core.record import Tag

    _, runs = _runs(uri)
    trial_runs = [r for r in runs if r.data.tags.get(Tag.SWEEP) == sweep_id]
    by_number = {int(r.data.tags[Tag.TRIAL]): r for r in trial_runs}
    assert len(by_number) == len(trial_runs) and sorted(by_number) == sorted(t.number for t in counted)
    for run in trial_runs:
        assert run.data.tags["mlflow.parentRunId"] == sweep_id
        assert run.data.tags[Tag.WORLD_SIZE] == "2" and run.data.params["distributed.world_size"] == "2"
        assert run.data.tags[Tag.BACKEND] == "gloo"
    assert len({r.data.tags[Tag.PID] for r in trial_runs}) == 1
    # Nothing else in the store: no rank but 0 opened a run of its own.
    tops = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert [r.info.run_id for r in tops] == [sweep_id], [(r.info.run_id, r.data.tags.get(Tag.STAGE)) for r in tops]
    return by_number


@pytest.mark.integration
def test_a_torchrun_worker_trains_every_trial_as_one_two_process_job(demo_root, tmp_path):
    from optuna.trial import TrialState

    from aaclip_core.record import Tag

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    done = _torchrun_sweep(["sweep", "--recipe", "sweep-demo", "--study", "ddp", "--trials", "3", "--tracking-uri",
                            uri, "-q", *set_flags(_data(demo_root, tmp_path), TINY, BASE_SWEEP, TORCHRUN)], tmp_path)
    sweep_id = done.stdout.strip()  # rank 0 alone speaks for the worker
    study = _study(f"sqlite:///{tmp_path / 'mlflow.optuna.db'}", "ddp")
    # Exactly the trials asked, all finished: no rank but 0 asked Optuna for a trial of its own.
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3, [(t.number, t.state) for t in study.trials]
    assert len({tuple(sorted(t.params.items())) for t in study.trials}) == 3
    by_number = _trial_runs_of_two_ranks(uri, sweep_id, study.trials)
    for t in study.trials:
        run = by_number[t.number]
        assert run.info.status == "FINISHED" and run.data.tags[Tag.STAGE] == "base"
        # Every rank trained with the trial's settings: the run's recipe holds them.
        assert float(run.data.params["stage2.lr"]) == pytest.approx(t.params["stage2.lr"])
        assert float(run.data.params["stage1.lr"]) == pytest.approx(t.params["stage1.lr"])
        assert run.data.metrics["val/pixel_auroc"] == pytest.approx(t.value)
    client, _ = _runs(uri)
    sweep = client.get_run(sweep_id)
    best = max(study.trials, key=lambda t: t.value)
    assert sweep.info.status == "FINISHED" and sweep.data.tags[Tag.BEST_TRIAL] == str(best.number)
    assert sweep.data.metrics["finished_trials"] == 3 and sweep.data.metrics["best_pixel_auroc"] == pytest.approx(best.value)


@pytest.mark.integration
def test_the_pruner_stops_a_torchrun_trial_on_every_rank(demo_root, tmp_path):
    """Rank 0 alone asks the pruner; every rank hears its answer and stops the job after the same
    loop, and the worker goes on to its next trial (a rank that trained on would pair its next
    collective with rank 0's next order and fail the worker)."""
    from optuna.trial import TrialState

    from aaclip_core.record import Tag

    # A sane weight, one that drowns the image features (pruned after loop 1), then another trial: the
    # worker's ranks must still agree after a pruned one.
    choices = [0.1, 1000.0, 0.3]
    seed = _grid_seed("cross.image_weight", choices, 0.1, 1000.0)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    done = _torchrun_sweep([
        "sweep", "--recipe", "sweep-demo", "--study", "pruned", "--tracking-uri", uri, "-q", "--json",
        *set_flags(_data(demo_root, tmp_path), TINY, TORCHRUN, [
            "feedback.loops=2", "feedback.cross_attn_start_loop=1", "sweep.trials=3", 'sweep.sampler="grid"',
            f"sweep.seed={seed}", "sweep.pruner_startup_trials=1",
            f'sweep.space={{"cross.image_weight"={choices}}}',
        ])], tmp_path)
    result = json.loads(done.stdout)
    study = _study(f"sqlite:///{tmp_path / 'mlflow.optuna.db'}", "pruned")
    assert [t.params["cross.image_weight"] for t in study.trials] == [0.1, 1000.0, 0.3]
    assert study.trials[0].state == TrialState.COMPLETE and sorted(study.trials[0].intermediate_values) == [1, 2]
    assert study.trials[1].state == TrialState.PRUNED, [(t.number, t.state) for t in study.trials]
    assert sorted(study.trials[1].intermediate_values) == [1]  # stopped after loop 1 of 2
    # The trial after it ran to a result of its own (the pruner may stop it too: that is its business).
    assert study.trials[2].state in (TrialState.COMPLETE, TrialState.PRUNED)
    pruned = [t for t in study.trials if t.state == TrialState.PRUNED]
    assert (result["finished"], result["pruned"]) == (3 - len(pruned), len(pruned))
    counted = study.trials
    by_number = _trial_runs_of_two_ranks(uri, result["run_id"], counted)
    client, _ = _runs(uri)
    for t in pruned:
        run = by_number[t.number]
        assert run.info.status == "KILLED" and "pruned after loop 1 of 2" in run.data.tags[Tag.PRUNED]
        kept = [a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")]
        assert kept == ["checkpoints/loop_1_stage_1", "checkpoints/loop_1_stage_2"]
        loops = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'")
        assert [r.info.status for r in loops] == ["KILLED"]
    assert client.get_run(result["run_id"]).info.status == "FINISHED"


@pytest.mark.integration
def test_a_torchrun_worker_and_a_one_process_worker_share_one_study(demo_root, tmp_path):
    from aaclip_core.record import Tag

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["sweep", "--recipe", "sweep-demo", "--study", "mixed", "--tracking-uri", uri, "-q",
            *set_flags(_data(demo_root, tmp_path), TINY, BASE_SWEEP, TORCHRUN)]
    # Tiny trials end before a worker has started up: the torchrun worker stops at 2 finished trials, so
    # the one-process worker, aiming at 3, cannot find the study done by the other alone.
    workers = [_start_torchrun_sweep([*args, "--trials", "2"], tmp_path)]
    try:
        _training_trial(workers[0], uri)  # the one-process worker joins while the torchrun worker trains
        workers.append(start_aaclip(*args, "--trials", "3", cwd=tmp_path))
        outs = [_wait(w, timeout=900)[0] for w in workers]
    finally:
        for proc in workers:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    _check_shared_study(uri, f"sqlite:///{tmp_path / 'mlflow.optuna.db'}", "mixed", outs, 3)
    _, runs = _runs(uri)
    sizes = sorted(r.data.tags[Tag.WORLD_SIZE] for r in runs if Tag.TRIAL in r.data.tags)
    assert set(sizes) == {"1", "2"}, sizes  # each worker trained trials its own way


def test_a_recipe_without_a_sweep_is_refused_in_one_paragraph(tmp_path):
    res = aaclip("sweep", "--recipe", "demo", "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}", cwd=tmp_path)
    assert res.returncode == 2 and one_paragraph(res.stderr) and "no [sweep] section" in res.stderr
    assert not (tmp_path / "m.db").exists()  # refused before anything was written


def test_a_tracking_server_without_storage_is_refused_naming_the_flag():
    from aaclip_core.errors import ConfigError
    from aaclip_core.sweep.study import storage_url

    with pytest.raises(ConfigError, match="--storage URL"):
        storage_url("http://127.0.0.1:5000", None)
    assert storage_url("sqlite:////data/team/mlflow.db", None) == "sqlite:////data/team/mlflow.optuna.db"
    assert storage_url("http://x", "postgresql://u@h/db") == "postgresql://u@h/db"


# ----------------------------------------------------------------- the doctor's check of the best trial's lead


def _view(objective: str = "image_auroc"):
    from aaclip_core.registry.sweeps import SweepView

    trials = [{"number": 4, "state": "COMPLETE", "value": 0.9, "params": {}, "run_id": "b", "loops": []},
              {"number": 1, "state": "PRUNED", "value": 0.95, "params": {}, "run_id": "p", "loops": [1]},
              {"number": 2, "state": "COMPLETE", "value": 0.8, "params": {}, "run_id": "r", "loops": []}]
    return SweepView("s", "study", objective, 3, 4, 0.9, trials)


def _scored(scores: list[float], labels: list[int], prefix: str = "img"):
    from aaclip_core.evaluation.bootstrap import ImageScore, ScoredImages

    return ScoredImages([ImageScore(f"{prefix}{i}.png", "plank", y, s) for i, (s, y) in
                         enumerate(zip(scores, labels))])


def _lead(view, held: dict):
    from aaclip_core.doctor.sweep import LEAD, sweep_checks

    return next(c for c in sweep_checks(view, None, lambda t: held.get(t["run_id"])) if c.name == LEAD)


def test_a_clear_lead_over_the_runner_up_passes():
    import numpy as np

    rng = np.random.default_rng(1)
    labels = [1] * 30 + [0] * 30
    best = _scored([float(y) + 0.1 * rng.random() for y in labels], labels)  # image AUROC 1
    runner = _scored(list(rng.random(60)), labels)  # about 0.5
    check = _lead(_view(), {"b": best, "r": runner})
    assert check.status == "pass", check
    assert "trial 4 leads trial 2" in check.detail and "paired bootstrap" in check.detail
    from aaclip_core.evaluation.metrics import auroc

    runner_value = auroc(np.array([s.score for s in runner.images]), np.array(labels))
    assert check.value == pytest.approx(100 * (1.0 - runner_value), abs=1e-3)  # the lead on all images

    from aaclip_core.doctor.sweep import LEAD, sweep_checks
    from aaclip_core.recipe import load_recipe

    recipe, _ = load_recipe("sweep-demo", ["feedback.min_val_images=100"])  # more than the 60 scored
    few = next(c for c in sweep_checks(_view(), recipe, lambda t: {"b": best, "r": runner}.get(t["run_id"])) if c.name == LEAD)
    assert few.status == "warn" and "too few for the interval itself" in few.detail, few


def test_a_lead_inside_the_spread_of_a_small_validation_split_warns():
    labels = [1, 1, 1, 0, 0, 0]
    best = _scored([0.9, 0.8, 0.3, 0.4, 0.2, 0.1], labels)  # 8 of 9 pairs ordered
    runner = _scored([0.9, 0.3, 0.35, 0.4, 0.2, 0.1], labels)  # 7 of 9
    check = _lead(_view(), {"b": best, "r": runner})
    assert check.status == "warn", check
    assert check.value == pytest.approx(100 / 9, abs=1e-3) and "inside the spread" in check.detail
    assert "feedback.val_fraction" in check.fix and "tied" in check.fix


def test_trials_scored_on_other_validation_images_are_compared_unpaired():
    import numpy as np

    rng = np.random.default_rng(2)
    labels = [1] * 30 + [0] * 30
    best = _scored([float(y) + 0.1 * rng.random() for y in labels], labels, "a")
    runner = _scored(list(rng.random(60)), labels, "b")
    check = _lead(_view(), {"b": best, "r": runner})
    assert check.status == "pass" and "unpaired bootstrap" in check.detail, check


def test_the_lead_on_pixel_auroc_bootstraps_the_stored_pixel_pairs():
    import torch

    from aaclip_core.evaluation.bootstrap import ImageScore, ScoredImages
    from aaclip_core.evaluation.pixel_pairs import pixel_pairs

    gen = torch.Generator().manual_seed(0)
    masks = torch.zeros(12, 8, 8, dtype=torch.bool)
    masks[:6, 2:5, 2:5] = True  # six anomalous images
    paths = [f"img{i}.png" for i in range(12)]
    images = [ImageScore(p, "plank", int(i < 6), 0.0) for i, p in enumerate(paths)]

    def scored(signal: float) -> ScoredImages:
        maps = torch.rand(12, 8, 8, generator=gen) + signal * masks
        return ScoredImages(images, {"plank": (paths, pixel_pairs(maps, masks))})

    clear = _lead(_view("pixel_auroc"), {"b": scored(2.0), "r": scored(0.0)})
    assert clear.status == "pass" and "pixel AUROC" in clear.detail, clear
    close = _lead(_view("pixel_auroc"), {"b": scored(0.0), "r": scored(0.0)})
    assert close.status == "warn", close


def test_the_lead_check_says_why_it_cannot_be_made():
    labels = [1, 0]
    old = _lead(_view(), {"b": _scored([1.0, 0.0], labels)})  # the runner-up's run keeps no scores
    assert old.status == "skip" and "trial 2's run keeps no held-out scores" in old.detail
    other = _lead(_view("pixel_ap"), {})
    assert other.status == "skip" and "pixel_ap is not bootstrapped" in other.detail
    lone = _view()
    lone.trials = lone.trials[:2]
    assert "no runner-up" in _lead(lone, {}).detail


SUMMARY_WRITER = """
import sys, time
from mlflow import MlflowClient
from aaclip_core.jobs.sweep import record_summary
client = MlflowClient(sys.argv[1])
run_id, start, me = sys.argv[2], float(sys.argv[3]), sys.argv[4]
while time.time() < start:
    time.sleep(0.001)
for i in range(40):  # new keys each round: each round both workers insert the same new rows
    record_summary(client, run_id, {f"best.{i}.{k}": me for k in "abc"}, {f"best_{i}": 0.5, f"n_{i}": 1.0})
print("wrote", flush=True)
"""


def test_workers_writing_one_summary_at_the_same_moment_do_not_collide(tmp_path):
    """Every worker that sees the study complete writes the summary, often at once: two processes
    inserting the same new tags and metrics into one SQLite store both succeed (the collision that
    once ended a worker with exit 1: "UNIQUE constraint failed: tags.key")."""
    import sys

    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("sweep")).info.run_id
    start = time.time() + 8  # both processes have imported MLflow by then
    writers = [subprocess.Popen([sys.executable, "-c", SUMMARY_WRITER, uri, run_id, str(start), me],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for me in "AB"]
    for w in writers:
        out, err = w.communicate(timeout=300)
        assert w.returncode == 0 and out.strip() == "wrote", err[-3000:]
    run = client.get_run(run_id)
    assert {run.data.tags[f"best.{i}.{k}"] for i in range(40) for k in "abc"} <= {"A", "B"}
    assert all(run.data.metrics[f"best_{i}"] == 0.5 for i in range(40))


def test_doctor_warns_of_a_best_value_at_a_range_edge_missing_trials_and_failed_ones():
    """The sweep checks' warning verdicts (the real sweeps in this file reach only the passing ones)."""
    from aaclip_core.doctor.sweep import sweep_checks
    from aaclip_core.recipe import load_recipe
    from aaclip_core.registry.sweeps import SweepView

    recipe, _ = load_recipe("sweep-demo", [])
    at_edge = {"cross.image_weight": 0.98, "feedback.image_lr": 1e-3, "feedback.cross_attn_start_loop": 1}
    trials = [{"number": 0, "state": "COMPLETE", "value": 0.9, "params": at_edge, "run_id": "a", "loops": [1, 2]},
              {"number": 1, "state": "FAIL", "value": None, "params": {}, "run_id": "f", "loops": []}]
    checks = {c.name: c for c in sweep_checks(SweepView("s", "study", "pixel_auroc", 4, 0, 0.9, trials), recipe)}
    assert checks["sweep trials"].status == "warn" and "1 of the 4 trials" in checks["sweep trials"].detail
    assert "aaclip sweep --study study" in checks["sweep trials"].fix
    assert checks["diverged trials"].status == "warn" and checks["diverged trials"].value == 1
    edge = checks["best at a range's edge"]
    assert edge.status == "warn" and "cross.image_weight = 0.98 at the high end" in edge.detail
    assert "feedback.image_lr" not in edge.detail  # 1e-3 lies well inside [1e-4, 3e-3] on the log scale
