"""Serving speed of a registered detector and the size of the environment it needs.

For each model URI (e.g. the demo detector registered fp32 and --int8), start
`mlflow models serve -m URI --env-manager local` on 127.0.0.1, send one-image requests one after
another, and print requests/s and p50/p99 latency. Then print the installed size of the served
model's requirements (aaclip_core.deploy.served.SERVED_REQUIREMENTS and everything they require,
as installed here) beside the whole environment's.

    python benchmarks/bench_serve.py --tracking-uri sqlite:///mlflow.db --images DIR --class fabric \\
        models:/fabric-detector/1 models:/fabric-detector/2
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from importlib.metadata import PackageNotFoundError, distribution, distributions
from pathlib import Path

from packaging.requirements import Requirement


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_figures(uri: str, tracking_uri: str, images: list[Path], class_name: str, n: int) -> dict:
    port = _port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "PYTHONPATH": os.pathsep.join(sys.path),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager", "local",
                             "-h", "127.0.0.1", "-p", str(port), "-w", "1"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    start = time.monotonic()
    try:
        while True:
            try:
                urllib.request.urlopen(f"{url}/ping", timeout=2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() - start > 300:
                    raise SystemExit(f"mlflow models serve for {uri} did not start")
                time.sleep(0.5)
        startup = time.monotonic() - start
        bodies = [json.dumps({"dataframe_split": {"columns": ["image", "class_name"],
                                                  "data": [[base64.b64encode(p.read_bytes()).decode(), class_name]]}}
                             ).encode() for p in images]
        latencies = []
        for i in range(n + 3):
            req = urllib.request.Request(f"{url}/invocations", bodies[i % len(bodies)],
                                         {"Content-Type": "application/json"})
            t = time.perf_counter()
            with urllib.request.urlopen(req, timeout=60) as r:
                r.read()
            if i >= 3:  # the first requests warm the session
                latencies.append(time.perf_counter() - t)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    latencies.sort()
    total = sum(latencies)
    return {"model": uri, "requests": n, "startup_s": round(startup, 1), "requests_per_s": round(n / total, 2),
            "p50_ms": round(1000 * latencies[len(latencies) // 2], 1),
            "p99_ms": round(1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 1)}


def _size(dist) -> int:
    total = 0
    for f in dist.files or []:
        p = Path(dist.locate_file(f))
        if p.is_file():
            total += p.stat().st_size
    return total


def _closure(names: list[str]) -> set[str]:
    seen, todo = set(), list(names)
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in seen:
            continue
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            continue
        seen.add(name)
        for raw in dist.requires or []:
            req = Requirement(raw)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def env_sizes() -> dict:
    from aaclip_core.deploy.served import SERVED_REQUIREMENTS

    served = _closure(list(SERVED_REQUIREMENTS))
    served_mb = sum(_size(distribution(n)) for n in served) / 2**20
    full_mb = sum(_size(d) for d in distributions()) / 2**20
    return {"served_packages": len(served), "served_mib": round(served_mb, 1), "full_env_mib": round(full_mb, 1),
            "full_packages": len(list(distributions()))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*", help="model URIs to serve, e.g. models:/NAME/1")
    ap.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    ap.add_argument("--images", type=Path)
    ap.add_argument("--class", dest="class_name", default="fabric")
    ap.add_argument("--requests", type=int, default=100)
    args = ap.parse_args()
    images = sorted(p for p in args.images.rglob("*") if p.suffix.lower() in (".png", ".jpg")) if args.images else []
    for uri in args.models:
        print(json.dumps(serve_figures(uri, args.tracking_uri, images, args.class_name, args.requests)))
    print(json.dumps(env_sizes()))


if __name__ == "__main__":
    main()
