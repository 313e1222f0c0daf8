"""What a sweep costs beyond its trials' training, and what a second worker buys.

1. In one process: `run_sweep` on the demo (feedback trials), with the training job and Optuna's
   trial loop timed. The sweep's cost splits into start-up (opening the study database and creating
   the sweep run, once per worker; the imports are done before timing), its own time per trial
   (asking the sampler, the study database and heartbeat, the trial's bookkeeping: Optuna's loop less
   the training) and the summary at the end (importances, the sweep run's table).
2. The same trials by one worker process, then by two worker processes joining one study
   (`aaclip sweep --study`), each worker given its share of the cores (`runtime.threads`): wall
   times and the speed-up.

    python benchmarks/bench_sweep.py [--trials 4] [--demo-root aaclip-demo-data]

Prints figures; asserts nothing. On a machine shared with other work the speed-up says more about
the free cores than about aaclip.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _demo  # noqa: F401 - puts the repository root on sys.path

# Trials big enough that training, not process start-up, is most of a worker's time.
TRIALS_DATA = ['data.train.classes=["plank"]', "data.train.shot=8", "feedback.val_fraction=0.5",
               "feedback.min_val_images=0", "eval.aupro=false", "sweep.pruner=\"none\"", "feedback.loops=2"]


def in_process(trials: int, root: Path, work: Path) -> None:
    import optuna

    from aaclip_core.data.synthetic import ensure_demo_data
    from aaclip_core.jobs import feedback
    from aaclip_core.jobs.sweep import run_sweep
    from aaclip_core.recipe import load_recipe

    ensure_demo_data(root)
    recipe, path = load_recipe("sweep-demo", [*TRIALS_DATA, f'data.train.root="{root / "train"}"'])
    training: list[float] = []
    looping: list[tuple[float, float]] = []
    real_train, real_optimize = feedback.train_feedback, optuna.Study.optimize

    def timed_train(*args, **kwargs):
        start = time.perf_counter()
        try:
            return real_train(*args, **kwargs)
        finally:
            training.append(time.perf_counter() - start)

    def timed_optimize(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return real_optimize(self, *args, **kwargs)
        finally:
            looping.append((start, time.perf_counter() - start))

    import aaclip_core.data  # noqa: F401 - the imports a worker pays once, outside the figures
    import aaclip_core.training.engine  # noqa: F401

    feedback.train_feedback, optuna.Study.optimize = timed_train, timed_optimize
    try:
        start = time.perf_counter()
        run_sweep(recipe, path, trials, "bench", None, f"sqlite:///{work / 'mlflow.db'}")
        wall = time.perf_counter() - start
    finally:
        feedback.train_feedback, optuna.Study.optimize = real_train, real_optimize
    startup = looping[0][0] - start
    in_loop = sum(d for _, d in looping)
    per_trial = (in_loop - sum(training)) / trials
    summary = wall - startup - in_loop
    print(f"in one process, {trials} trials in {wall:.1f} s: training {sum(training):.1f} s "
          f"({sum(training) / trials:.2f} s per trial); the sweep's own time: start-up {startup:.2f} s (study "
          f"database and sweep run), {per_trial:.3f} s per trial, {summary:.2f} s waiting and summing up")


def workers(n: int, trials: int, root: Path, work: Path) -> float:
    threads = max(1, (os.cpu_count() or 1) // n)  # each worker its share of the cores
    sets = [x for s in [*TRIALS_DATA, f'data.train.root="{root / "train"}"', f"runtime.threads={threads}"]
            for x in ("--set", s)]
    cmd = [sys.executable, "-c", "from aaclip_cli.main import main; main()", "sweep", "--recipe", "sweep-demo",
           "--study", f"w{n}", "--trials", str(trials), "--tracking-uri", f"sqlite:///{work / f'w{n}.db'}", "-q",
           *sets]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    start = time.perf_counter()
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(n)]
    for p in procs:
        _, err = p.communicate()
        if p.returncode:
            raise SystemExit(f"worker failed ({p.returncode}): {err[-2000:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--demo-root", default="aaclip-demo-data")
    args = parser.parse_args()
    root = Path(args.demo_root).resolve()
    print(f"cpu cores: {os.cpu_count()}, load average: {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        work = Path(tmp)
        in_process(args.trials, root, work)
        one = workers(1, args.trials, root, work)
        two = workers(2, args.trials, root, work)
        print(f"{args.trials} trials as worker processes (start-up and imports included): 1 worker with "
              f"{os.cpu_count()} threads {one:.1f} s, 2 workers with {max(1, (os.cpu_count() or 1) // 2)} each "
              f"{two:.1f} s: speed-up {one / two:.2f}x")


if __name__ == "__main__":
    main()
