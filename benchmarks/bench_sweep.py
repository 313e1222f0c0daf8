"""What a sweep costs beyond its trials' training, and what a second worker buys.

1. In one process: `run_sweep` on the tiny demo (feedback trials), with the training job timed
   around each call; the sweep's own time per trial (asking Optuna, the study database, the sweep
   run's bookkeeping, the summary) is the sweep's wall time less the trials' training time.
2. The same number of trials by one worker process, then by two worker processes joining one
   study (`aaclip sweep --study`): wall times and the speed-up.

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

TINY = ['data.train.classes=["plank"]', "data.train.shot=4", "feedback.val_fraction=0.5",
        "feedback.min_val_images=0", "eval.aupro=false", "sweep.pruner=\"none\""]


def in_process(trials: int, root: Path, work: Path) -> None:
    from aaclip_core.data.synthetic import ensure_demo_data
    from aaclip_core.jobs import feedback
    from aaclip_core.jobs.sweep import run_sweep
    from aaclip_core.recipe import load_recipe

    ensure_demo_data(root)
    recipe, path = load_recipe("sweep-demo", [*TINY, f'data.train.root="{root / "train"}"'])
    spent: list[float] = []
    real = feedback.train_feedback

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            spent.append(time.perf_counter() - start)

    feedback.train_feedback = timed
    start = time.perf_counter()
    run_sweep(recipe, path, trials, "bench", None, f"sqlite:///{work / 'mlflow.db'}")
    wall = time.perf_counter() - start
    feedback.train_feedback = real
    outside = wall - sum(spent)
    print(f"in one process: {trials} trials in {wall:.1f} s; training {sum(spent):.1f} s "
          f"({sum(spent) / len(spent):.1f} s per trial); the sweep's own time {outside:.1f} s = "
          f"{outside / trials:.2f} s per trial (first trial's study and sweep-run creation included)")


def workers(n: int, trials: int, root: Path, work: Path) -> float:
    sets = [x for s in [*TINY, f'data.train.root="{root / "train"}"'] for x in ("--set", s)]
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
        print(f"{args.trials} trials: 1 worker {one:.1f} s, 2 workers {two:.1f} s: speed-up {one / two:.2f}x")


if __name__ == "__main__":
    main()
