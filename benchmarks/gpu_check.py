"""The GPU path in one prepared run (under 5 minutes on one CUDA device): ViT-L-14-336 at 518 px, in fp32 and
in bf16, eager and with ``runtime.compile``: a stage-1 and a stage-2 training step, a test batch, the model's
images/s against the data loader's, and peak GPU memory. Prints one table; asserts nothing.

    python benchmarks/gpu_check.py                 # on a machine with a CUDA GPU
    python benchmarks/gpu_check.py --cpu-smoke     # the same code path on CPU in seconds (tiny demo model)

Weights are random (``model.pretrained = none``): the same arithmetic as the OpenAI weights, no network.
The model is built once per precision; its eager figures are taken first, then its adapted image path is
compiled (``compile_image_path``, what ``runtime.compile = true`` switches on) and the same steps are timed
again. "first" is the first call (compiling included); the steady figures are medians of ``--steps`` calls.
The loader reads the demo's synthetic test images (generated on first use) at the recipe's size with its
``data.num_workers``; its images/s is what the loader alone delivers, to compare with the model's.
Without CUDA it says so in one line and exits 2, unless given ``--cpu-smoke``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

GPU_SETS = ["model.pretrained=none", "model.image_size=518", 'runtime.device="cuda"', "stage1.batch_size=16",
            "stage2.batch_size=2", "eval.batch_size=8", "data.num_workers=4"]
SMOKE_SETS = ['runtime.device="cpu"', "model.image_size=64", "stage1.batch_size=2", "stage2.batch_size=2", "eval.batch_size=2",
              "data.num_workers=0", "runtime.threads=2"]


def _timed(fn, device) -> float:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t


def _measure(fn, device, steps: int) -> tuple[float, float]:
    """(first call, median of the next ``steps`` calls) in seconds; with 0 steps the first call twice."""
    first = _timed(fn, device)
    return first, statistics.median([_timed(fn, device) for _ in range(steps)] or [first])


def _loader_rate(recipe, samples, batches: int) -> float:
    from aaclip_core.training.data import make_dataset, make_loader

    loader = make_loader(make_dataset(samples, recipe, "none"), recipe.eval.batch_size, False, recipe, None)
    it, n = iter(loader), 0
    next(it)  # workers started and the first batch read: start-up is not throughput
    t = time.perf_counter()
    for _ in range(batches):
        try:
            n += len(next(it)["image"])
        except StopIteration:
            break
    return n / max(time.perf_counter() - t, 1e-9)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny demo model on CPU: checks the script, not speed")
    ap.add_argument("--steps", type=int, default=None, help="timed calls after the first (default 5 on GPU, 0 smoke)")
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--backend", default=None, help="torch.compile backend (default inductor; smoke: eager, which only traces)")
    ap.add_argument("--demo-root", default=None, help="where the synthetic images are (default: a temp folder)")
    args = ap.parse_args(argv)

    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA device is visible to torch (torch.cuda.is_available() is False); run it on a "
              "machine with a GPU, or pass --cpu-smoke to check the script on the CPU.", file=sys.stderr)
        return 2
    from _demo import demo_test_setup

    from aaclip_core.compute import autocast
    from aaclip_core.evaluation.protocol import predict_batch
    from aaclip_core.model import build_model
    from aaclip_core.prompts.anchors import AnchorBank
    from aaclip_core.recipe import load_recipe
    from aaclip_core.training.engine import stage1_loss, stage2_loss
    from aaclip_core.training.groups import set_trainable

    steps = args.steps if args.steps is not None else (0 if args.cpu_smoke else 5)
    backend = args.backend or ("eager" if args.cpu_smoke else "inductor")
    recipe_name, sets = ("demo", SMOKE_SETS) if args.cpu_smoke else ("base", GPU_SETS)
    demo_root = args.demo_root or str(Path(tempfile.gettempdir()) / "aaclip-gpu-check-demo")
    recipe, device, samples = demo_test_setup(recipe_name, sets, demo_root)
    classes = sorted({s.class_name for s in samples})
    size = recipe.model.image_size
    loader_rate = _loader_rate(recipe, samples, batches=3 if args.cpu_smoke else 20)

    g = torch.Generator().manual_seed(0)
    b1, b2, be = recipe.stage1.batch_size, recipe.stage2.batch_size, recipe.eval.batch_size
    images = torch.randn(max(b1, b2, be), 3, size, size, generator=g).to(device)
    masks = (torch.rand(max(b1, b2), 1, size, size, generator=g) > 0.95).float().to(device)
    labels = (torch.arange(max(b1, b2)) % 2).to(device)
    names = [classes[i % len(classes)] for i in range(len(images))]
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"gpu_check: {recipe.model.name} @ {size} px on {device} ({gpu}), torch {torch.__version__}, compile "
          f"backend {backend}, batches stage1 {b1} / stage2 {b2} / test {be}, {steps} timed calls per figure")

    rows = []
    for precision in args.precisions:
        recipe_p, _ = load_recipe(recipe_name, [*sets, f'runtime.precision="{precision}"', "runtime.compile=false",
                                                f'data.test.root="{recipe.data.test.root}"',
                                                f'data.test.layout="{recipe.data.test.layout}"'])
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        torch.manual_seed(recipe.runtime.seed)
        model = build_model(recipe_p, device)
        bank = AnchorBank(model, classes, "MVTec")

        def stage1():
            set_trainable(model, 1)
            bank.unfreeze()
            model.zero_grad(set_to_none=True)
            with autocast(device, precision):
                loss = stage1_loss(model, bank, recipe_p, images[:b1], masks[:b1], names[:b1])
            loss.backward()

        def stage2():
            set_trainable(model, 2)
            bank.freeze()
            model.zero_grad(set_to_none=True)
            with autocast(device, precision):
                loss = stage2_loss(model, bank, recipe_p, images[:b2], masks[:b2], labels[:b2], names[:b2])
            loss.backward()

        @torch.no_grad()
        def test():
            bank.freeze()
            model.train(False)
            with autocast(device, precision):
                predict_batch(model, bank, images[:be], names[:be], recipe_p)

        for compiled in (False, True):
            if compiled:
                model.compile_image_path(backend)
            s1 = _measure(stage1, device, steps)
            s2 = _measure(stage2, device, steps)
            te = _measure(test, device, steps)
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
            rows.append((precision, "on" if compiled else "off", s1, s2, te, be / te[1], peak))
        model = bank = None  # free this precision's model before the next is built

    head = ("precision", "compile", "stage-1 step s (first)", "stage-2 step s (first)", "test batch s (first)",
            "model img/s", "loader img/s", "peak GiB")
    table = [head] + [
        (p, c, f"{s1[1]:.3f} ({s1[0]:.1f})", f"{s2[1]:.3f} ({s2[0]:.1f})", f"{te[1]:.3f} ({te[0]:.1f})",
         f"{rate:.1f}", f"{loader_rate:.1f}", "n/a" if peak != peak else f"{peak:.1f}")
        for p, c, s1, s2, te, rate, peak in rows
    ]
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    for i, r in enumerate(table):
        print(" | ".join(v.ljust(w) for v, w in zip(r, widths)))
        if i == 0:
            print("-+-".join("-" * w for w in widths))
    print("peak GiB: the most GPU memory allocated during that precision's runs so far (eager, then eager + compiled)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
