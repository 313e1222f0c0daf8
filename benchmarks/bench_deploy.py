"""CPU images/s and peak memory of one detector four ways: eager torch (what `predict --run` runs),
TorchScript, ONNX Runtime fp32 and ONNX Runtime dynamic int8. Prints figures; asserts nothing.

    python benchmarks/bench_deploy.py --recipe demo
    python benchmarks/bench_deploy.py --recipe base --set model.pretrained=none --set model.image_size=224

The detector is the exported graph (`aaclip_core.deploy.graph`): image + class index -> raw and
calibrated map and score, with random adapters on the recipe's backbone (``model.pretrained=none``
gives random backbone weights, which cost the same time as real ones). ``--cross`` adds the
cross-attention modules (per-image anchors: one extra backbone pass and 16 text encodings per image).

Each way runs in its own process, so its peak resident memory (loading plus scoring) is its own;
export time and file size are printed too. The same number of threads is given to torch and ONNX
Runtime (``--threads``, default: all cores). On a machine shared with other work, pass
``--threads 1``: torch's OpenMP threads spin-wait and lose most of their speed when cores are taken.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WAYS = ("eager", "torchscript", "onnx-fp32", "onnx-int8")


def _peak_rss_mib() -> float:
    """This process's peak resident memory. On Linux from VmHWM: ru_maxrss survives exec, so a
    worker would report its parent's peak when that was higher."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 1024 if sys.platform != "darwin" else kib / 2**20


def _build_graph(recipe, cross: bool):
    import torch

    from aaclip_core.deploy.graph import DetectorGraph
    from aaclip_core.model import build_model
    from aaclip_core.prompts.anchors import AnchorBank

    torch.manual_seed(0)
    model = build_model(recipe, "cpu", with_cross=cross)
    bank = AnchorBank(model, ["widget"], recipe.data.test.name)
    return DetectorGraph(model, bank, {}, recipe.model.image_size, recipe.data.domain)


def _worker(args) -> None:
    """One way, in this process: load, warm up, time ``--iters`` batches, print one JSON line."""
    import numpy as np

    size, batch = args.image_size, args.batch
    t0 = time.perf_counter()
    if args.worker == "eager" or args.worker == "torchscript":
        import torch

        torch.set_num_threads(args.threads)
        if args.worker == "eager":
            from aaclip_core.recipe import load_recipe

            recipe, _ = load_recipe(args.recipe, args.sets)
            run = _build_graph(recipe, args.cross).eval()
        else:
            run = torch.jit.load(args.file, map_location="cpu").eval()

        def step(x, idx):
            with torch.no_grad():
                return run(torch.from_numpy(x), torch.from_numpy(idx))
    else:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = args.threads
        session = ort.InferenceSession(args.file, opts, providers=["CPUExecutionProvider"])

        def step(x, idx):
            return session.run(None, {"image": x, "class_index": idx})
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, 3, size, size), dtype=np.float32)
    idx = np.zeros(batch, dtype=np.int64)
    for _ in range(3):  # warm-up: TorchScript's profiling executor optimises after its first runs
        step(x, idx)
    t = time.perf_counter()
    for _ in range(args.iters):
        step(x, idx)
    seconds = time.perf_counter() - t
    print(json.dumps({"way": args.worker, "images_per_s": batch * args.iters / seconds, "load_s": load_s,
                      "peak_rss_mib": _peak_rss_mib()}))


def _run_worker(way: str, file: Path | None, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", way, "--recipe", args.recipe, "--batch", str(args.batch),
           "--iters", str(args.iters), "--threads", str(args.threads), "--image-size", str(args.image_size)]
    cmd += [x for s in args.sets for x in ("--set", s)]
    if args.cross:
        cmd.append("--cross")
    if file is not None:
        cmd += ["--file", str(file)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        return {"way": way, "error": res.stderr.strip().splitlines()[-1] if res.stderr.strip() else "failed"}
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="demo")
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--cross", action="store_true", help="with the cross-attention modules on")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--ways", default=",".join(WAYS), help=f"comma-separated subset of {','.join(WAYS)}")
    ap.add_argument("--worker", choices=WAYS, help=argparse.SUPPRESS)
    ap.add_argument("--file", help=argparse.SUPPRESS)
    ap.add_argument("--image-size", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        _worker(args)
        return

    import warnings

    import torch

    from aaclip_core.deploy.export import export_onnx, export_torchscript, quantize_int8
    from aaclip_core.recipe import load_recipe

    warnings.filterwarnings("ignore")
    recipe, _ = load_recipe(args.recipe, args.sets)
    args.image_size = recipe.model.image_size
    ways = [w for w in args.ways.split(",") if w]
    print(f"{recipe.model.name} ({recipe.model.pretrained}) at {args.image_size} px, "
          f"{'cross-attention, ' if args.cross else ''}batch {args.batch}, {args.iters} timed batches, "
          f"{args.threads} threads, torch {torch.__version__}", flush=True)
    files: dict[str, Path | None] = {"eager": None}
    with tempfile.TemporaryDirectory(prefix="aaclip-bench-deploy-") as tmp:
        graph = _build_graph(recipe, args.cross)
        for way, fn, name in (("torchscript", export_torchscript, "detector.pt"),
                              ("onnx-fp32", export_onnx, "detector.onnx")):
            if way in ways or (way == "onnx-fp32" and "onnx-int8" in ways):
                t = time.perf_counter()
                files[way] = fn(graph, Path(tmp) / name)
                print(f"  export {way:12s} {time.perf_counter() - t:7.1f} s  "
                      f"{files[way].stat().st_size / 2**20:8.1f} MiB", flush=True)
        del graph
        if "onnx-int8" in ways:
            t = time.perf_counter()
            files["onnx-int8"] = quantize_int8(files["onnx-fp32"], Path(tmp) / "detector.int8.onnx")
            print(f"  quantise int8       {time.perf_counter() - t:7.1f} s  "
                  f"{files['onnx-int8'].stat().st_size / 2**20:8.1f} MiB", flush=True)
        print(f"  {'way':12s} {'images/s':>9s} {'load s':>7s} {'peak MiB':>9s}")
        for way in ways:
            r = _run_worker(way, files.get(way), args)
            if "error" in r:
                print(f"  {way:12s} failed: {r['error']}")
                continue
            print(f"  {way:12s} {r['images_per_s']:9.2f} {r['load_s']:7.1f} {r['peak_rss_mib']:9.0f}", flush=True)


if __name__ == "__main__":
    main()
