"""Training throughput under torchrun: stage-1 and stage-2 images/s with 1 and with N processes.
Prints figures; asserts nothing.

    python benchmarks/bench_ddp.py --recipe demo --procs 1 2
    python benchmarks/bench_ddp.py --recipe base --set model.pretrained=none --set model.image_size=224 --procs 1 4

Each configuration is a real `torchrun --nproc_per_node N` job running the same synchronised
training step as `aaclip train` (DDP over the adapters, global batch = the recipe's batch size,
split across the ranks) on random tensors of the recipe's image size. On a CPU the processes share
the machine's cores, so the speed-up is bounded by the cores (torchrun sets one thread per process
(OMP_NUM_THREADS, default 1 for every configuration); on GPUs each process has its own device.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batch(recipe, n: int, seed: int, weights: list[float], device) -> dict:
    g = torch.Generator().manual_seed(seed)
    size = recipe.model.image_size
    return {
        "image": torch.randn(n, 3, size, size, generator=g).to(device),
        "mask": (torch.rand(n, 1, size, size, generator=g) > 0.9).float().to(device),
        "label": torch.randint(0, 2, (n,), generator=g).to(device),
        "class_name": ["object"] * n,
        "weight": torch.tensor(weights),
    }


def worker(args) -> None:
    from aaclip_core import distributed
    from aaclip_core.compute import select_device
    from aaclip_core.model import build_model
    from aaclip_core.prompts.anchors import AnchorBank
    from aaclip_core.recipe import load_recipe
    from aaclip_core.training.engine import StageObjective, synchronised
    from aaclip_core.training.groups import set_trainable
    from aaclip_core.training.sharding import share_bounds

    recipe, _ = load_recipe(args.recipe, args.sets)
    device = distributed.setup(select_device(recipe.runtime.device))
    torch.manual_seed(0)
    model = build_model(recipe, device)
    bank = AnchorBank(model, ["object"], "benchmark")
    rank, world = distributed.rank(), distributed.world_size()
    out = {"world_size": world, "backend": distributed.setting().backend, "device": str(device)}
    for stage, global_batch in ((1, recipe.stage1.batch_size), (2, recipe.stage2.batch_size)):
        params = set_trainable(model, stage)
        if stage == 1:
            bank.unfreeze()
        else:
            bank.freeze()
        objective = synchronised(StageObjective(stage, model, bank, recipe, device), device)
        opt = torch.optim.Adam(params, lr=1e-5)
        start, stop = share_bounds(global_batch, rank, world)
        n = max(stop - start, 1)
        weights = [1.0] * (stop - start) or [0.0]
        batch = _batch(recipe, n, rank, weights, device)

        def step():
            opt.zero_grad(set_to_none=True)
            objective(batch).backward()
            opt.step()

        step()  # warm-up
        distributed.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(args.steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        distributed.barrier()
        seconds = time.perf_counter() - t
        out[f"stage{stage}_images_per_s"] = args.steps * global_batch / seconds
        out[f"stage{stage}_global_batch"] = global_batch
    if distributed.is_main():
        print("BENCH " + json.dumps(out), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="demo")
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--steps", type=int, default=5, help="timed optimiser steps per stage")
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    torchrun = Path(sys.executable).parent / "torchrun"
    # torchrun sets one thread per process only when it starts several; the same count for every
    # configuration keeps the comparison about processes (OMP_NUM_THREADS overrides it).
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    rows = []
    for n in args.procs:
        cmd = [str(torchrun), "--nproc_per_node", str(n), "--master_port", str(_free_port()), __file__, "--worker",
               "--recipe", args.recipe, "--steps", str(args.steps)]
        for s in args.sets:
            cmd += ["--set", s]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = next((ln for ln in done.stdout.splitlines() if ln.startswith("BENCH ")), None)
        if done.returncode != 0 or line is None:
            print(f"{n} process(es) failed:\n{done.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(line[6:]))
    print(f"recipe {args.recipe}, {os.cpu_count()} CPU cores visible, {env['OMP_NUM_THREADS']} thread(s) per process, "
          f"load average {os.getloadavg()[0]:.1f}, torch {torch.__version__}")
    print(f"{'procs':>5} {'backend':>7} {'stage-1 img/s':>14} {'stage-2 img/s':>14} {'speed-up 1/2':>13}")
    base = rows[0] if rows else None
    for r in rows:
        s1 = r["stage1_images_per_s"] / base["stage1_images_per_s"]
        s2 = r["stage2_images_per_s"] / base["stage2_images_per_s"]
        print(f"{r['world_size']:>5} {r['backend']:>7} {r['stage1_images_per_s']:>14.2f} "
              f"{r['stage2_images_per_s']:>14.2f} {s1:>6.2f}/{s2:<6.2f}")


if __name__ == "__main__":
    main()
