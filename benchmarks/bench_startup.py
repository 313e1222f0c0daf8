"""How fast aaclip answers when no model is needed.

Usage: python benchmarks/bench_startup.py [--repeat N] [--aaclip PATH]

Runs each case N times as a fresh process (the installed `aaclip` entry point beside this Python,
else `python -m aaclip_cli.main`) from an empty temporary folder and prints the median and the
slowest wall time, the median CPU time (user + system: what the process itself costs, whatever
else the machine is doing), the exit code, and whether torch, OpenCLIP or MLflow were imported. Cases:
`aaclip --help`, a usage error (an unknown option), a missing input path, an unknown recipe key.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CASES = {
    "aaclip --help": ["--help"],
    "usage error (unknown option)": ["train", "base", "--no-such-option"],
    "missing input path": ["predict", "--run", "0" * 32, "no/such/image.png"],
    "unknown recipe key": ["train", "base", "--recipe", "demo", "--set", "stage2.epochz=3"],
}


def _command(explicit: str | None) -> list[str]:
    if explicit:
        return [explicit]
    beside = Path(sys.executable).with_name("aaclip")
    if beside.is_file():
        return [str(beside)]
    return [sys.executable, "-m", "aaclip_cli.main"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="runs per case (default 5)")
    parser.add_argument("--aaclip", help="the aaclip executable (default: beside this Python)")
    args = parser.parse_args()
    cmd = _command(args.aaclip)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "PYTHONWARNINGS": "ignore"}
    print(f"command: {' '.join(cmd)}   cores: {os.cpu_count()}   runs per case: {args.repeat}")
    print(f"{'case':32s} {'wall median s':>13s} {'wall max s':>10s} {'cpu median s':>12s} {'exit':>5s}")
    work = Path(tempfile.mkdtemp(prefix="aaclip-bench-startup-"))
    try:
        for label, case in CASES.items():
            times, cpu, codes = [], [], set()
            for _ in range(args.repeat):
                before = resource.getrusage(resource.RUSAGE_CHILDREN)
                t0 = time.perf_counter()
                proc = subprocess.run([*cmd, *case], cwd=work, env=env, capture_output=True, timeout=300)
                times.append(time.perf_counter() - t0)
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                cpu.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
                codes.add(proc.returncode)
            print(f"{label:32s} {statistics.median(times):13.2f} {max(times):10.2f} {statistics.median(cpu):12.2f} "
                  f"{','.join(map(str, sorted(codes))):>5s}")
        heavy = subprocess.run(
            [sys.executable, "-c",
             "import sys\nfrom typer.testing import CliRunner\nfrom aaclip_cli.main import app\n"
             f"for a in {list(CASES.values())!r}: CliRunner().invoke(app, a)\n"
             "print(', '.join(m for m in ('torch', 'open_clip', 'mlflow') if m in sys.modules) or 'none')"],
            cwd=work, env=env, capture_output=True, text=True, timeout=300,
        )
        print(f"heavy modules imported by these cases: {heavy.stdout.strip() or heavy.stderr.strip()[-300:]}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
