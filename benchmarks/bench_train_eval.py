"""Throughput and memory of a recipe: stage-1 and stage-2 training images/s, evaluation images/s,
metric seconds per class, peak memory. Prints figures; asserts nothing.

    python benchmarks/bench_train_eval.py --recipe demo
    python benchmarks/bench_train_eval.py --recipe base --set model.pretrained=none --set model.image_size=224
    python benchmarks/bench_train_eval.py --recipe cross-demo --cross

Inputs are random tensors of the recipe's image size (no dataset needed); `model.pretrained=none`
gives random backbone weights, which cost the same time as real ones.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

import torch


def _peak_rss_gib() -> float:
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 2**20 if sys.platform != "darwin" else kib / 2**30


def _timed(fn, steps: int, device: torch.device) -> float:
    fn()  # warm-up (allocations, kernel selection)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="demo")
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--cross", action="store_true", help="with the cross-attention modules on")
    ap.add_argument("--metric-images", type=int, default=100, help="images per class for the metric timing")
    args = ap.parse_args()

    from aaclip_core.anchors import AnchorBank
    from aaclip_core.config import load_recipe
    from aaclip_core.evaluation import ClassMaps, predict_batch, score_class
    from aaclip_core.model import build_model
    from aaclip_core.runtime import autocast, select_device
    from aaclip_core.training.engine import stage1_loss, stage2_loss
    from aaclip_core.training.groups import set_trainable

    recipe, _ = load_recipe(args.recipe, args.sets)
    device = select_device(recipe.runtime.device)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = build_model(recipe, device, with_cross=args.cross)
    build_s = time.perf_counter() - t0
    size = recipe.model.image_size
    classes = ["bottle", "cable"]
    bank = AnchorBank(model, classes, "MVTec")

    def batch(n: int):
        images = torch.randn(n, 3, size, size, device=device)
        masks = (torch.rand(n, 1, size, size, device=device) > 0.95).float()
        labels = torch.randint(0, 2, (n,), device=device)
        names = [classes[i % 2] for i in range(n)]
        return images, masks, labels, names

    b1, b2, be = recipe.stage1.batch_size, recipe.stage2.batch_size, recipe.eval.batch_size
    prec = recipe.runtime.precision
    print(f"recipe {recipe.name}: {recipe.model.name} @ {size}px on {device} ({prec}), cross={args.cross}, "
          f"build {build_s:.1f} s, torch threads {torch.get_num_threads()}")

    set_trainable(model, 1)
    images, masks, _, names = batch(b1)

    def s1():
        with autocast(device, prec):
            loss = stage1_loss(model, bank, recipe, images, masks, names, "dpam")
        loss.backward()
        model.zero_grad(set_to_none=True)

    t = _timed(s1, args.steps, device)
    print(f"stage 1: batch {b1}: {t:.3f} s/step, {b1 / t:.1f} images/s")

    set_trainable(model, 2)
    bank.freeze()
    images, masks, labels, names = batch(b2)

    def s2():
        with autocast(device, prec):
            loss = stage2_loss(model, bank, recipe, images, masks, labels, names)
        loss.backward()
        model.zero_grad(set_to_none=True)

    t = _timed(s2, args.steps, device)
    print(f"stage 2: batch {b2}: {t:.3f} s/step, {b2 / t:.1f} images/s")

    for p in model.parameters():
        p.requires_grad_(False)
    images, _, _, names = batch(be)

    def ev():
        with torch.no_grad(), autocast(device, prec):
            predict_batch(model, bank, images, names, recipe)

    t = _timed(ev, args.steps, device)
    print(f"evaluation: batch {be}: {t:.3f} s/batch, {be / t:.1f} images/s")

    n = args.metric_images
    cm = ClassMaps(
        maps=torch.rand(n, size, size),
        det=torch.rand(n),
        masks=torch.rand(n, size, size) > 0.97,
        labels=torch.arange(n) % 2,
    )
    t = time.perf_counter()
    score_class("bench", cm, recipe)
    print(f"metrics (AUROC, AP, F1-max, AUPRO{'' if recipe.eval.aupro else ' off'}) for {n} images of "
          f"{size}x{size} ({n * size * size / 1e6:.1f} M pixels): {time.perf_counter() - t:.2f} s")
    print(f"peak RSS {_peak_rss_gib():.2f} GiB", end="")
    if device.type == "cuda":
        print(f", peak CUDA memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB", end="")
    print()


if __name__ == "__main__":
    main()
