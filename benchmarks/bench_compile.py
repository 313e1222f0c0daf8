"""`runtime.compile`: what torch.compile costs once and gains per step, against the same model in
eager mode in the same process. Prints figures; asserts nothing.

    python benchmarks/bench_compile.py --recipe base --set model.pretrained=none --set model.image_size=224 \
        --set runtime.threads=2 --set stage2.batch_size=2 --set eval.batch_size=2
    python benchmarks/bench_compile.py --recipe demo

Copies of the model are built from the same seed: one eager; one running the adapted image forward
through `torch.compile` as training does (the path `runtime.compile = true` switches on); one with
its weights compiled in as constants, as `test` and `predict` run it
(``compile_image_path(freeze_weights=True)``). For a stage-2 step (forward + backward) and an
evaluation batch it prints the first call of each (the compiled one includes compiling), then the
medians of ``--steps`` interleaved pairs, the speed-up (eager ÷ compiled, on CPU time and on wall
time), and the largest difference between the models' outputs and gradients on the same input.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _once(fn, device: torch.device) -> tuple[float, float]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t, c = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, time.process_time() - c


def _ab(label: str, eager_fn, compiled_fn, steps: int, device: torch.device) -> dict[str, float]:
    first_e, _ = _once(eager_fn, device)
    first_c, _ = _once(compiled_fn, device)
    pairs = [(_once(eager_fn, device), _once(compiled_fn, device)) for _ in range(steps)]
    med = statistics.median
    r = {
        "first_eager": first_e,
        "first_compiled": first_c,
        "eager_wall": med(e[0] for e, _ in pairs),
        "compiled_wall": med(c[0] for _, c in pairs),
        "speedup_cpu": med(e[1] / c[1] for e, c in pairs),
        "speedup_wall": med(e[0] / c[0] for e, c in pairs),
    }
    print(f"{label}: first call eager {first_e:.2f} s, compiled {first_c:.2f} s (compiling included); then eager "
          f"{r['eager_wall']:.3f} s, compiled {r['compiled_wall']:.3f} s wall; speed-up {r['speedup_cpu']:.2f}x "
          f"(CPU time), {r['speedup_wall']:.2f}x (wall); per-pair CPU speed-ups "
          f"{', '.join(f'{e[1] / c[1]:.2f}' for e, c in pairs)}")
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="demo")
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--backend", default="inductor")
    args = ap.parse_args()

    from aaclip_core.compute import autocast, configure_threads, select_device
    from aaclip_core.evaluation.protocol import predict_batch
    from aaclip_core.model import build_model
    from aaclip_core.prompts.anchors import AnchorBank
    from aaclip_core.recipe import load_recipe
    from aaclip_core.training.engine import stage2_loss
    from aaclip_core.training.groups import set_trainable

    recipe, _ = load_recipe(args.recipe, [*args.sets, "runtime.compile=false"])
    configure_threads(recipe.runtime.threads)
    device = select_device(recipe.runtime.device)
    classes = ["bottle", "cable"]

    def make():
        torch.manual_seed(recipe.runtime.seed)
        model = build_model(recipe, device)
        return model, AnchorBank(model, classes, "MVTec")

    (eager, bank_e), (compiled, bank_c), (frozen, bank_f) = make(), make(), make()
    compiled.compile_image_path(args.backend)
    frozen.compile_image_path(args.backend, freeze_weights=True)  # as `test` and `predict` build it
    size, prec = recipe.model.image_size, recipe.runtime.precision
    print(f"recipe {recipe.name}: {recipe.model.name} @ {size}px on {device} ({prec}), backend {args.backend}, "
          f"torch threads {torch.get_num_threads()}, torch {torch.__version__}")

    g = torch.Generator().manual_seed(0)
    b2, be = recipe.stage2.batch_size, recipe.eval.batch_size
    images = torch.randn(max(b2, be), 3, size, size, generator=g).to(device)
    masks = (torch.rand(b2, 1, size, size, generator=g) > 0.95).float().to(device)
    labels = (torch.arange(b2) % 2).to(device)
    names = [classes[i % 2] for i in range(max(b2, be))]

    for model, bank in ((eager, bank_e), (compiled, bank_c)):
        set_trainable(model, 2)
        bank.freeze()

    def step(model, bank):
        def fn():
            model.zero_grad(set_to_none=True)
            with autocast(device, prec):
                loss = stage2_loss(model, bank, recipe, images[:b2], masks, labels, names[:b2])
            loss.backward()
            return loss
        return fn

    @torch.no_grad()
    def evaluate(model, bank):
        def fn():
            with autocast(device, prec):
                return predict_batch(model, bank, images[:be], names[:be], recipe)
        return fn

    _ab(f"stage-2 step (batch {b2})", step(eager, bank_e), step(compiled, bank_c), args.steps, device)
    grads = {}
    for tag, model, bank in (("eager", eager, bank_e), ("compiled", compiled, bank_c)):
        step(model, bank)()
        grads[tag] = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    gdiff = max(float((grads["eager"][n] - grads["compiled"][n]).abs().max()) for n in grads["eager"])
    gscale = max(float(grads["eager"][n].abs().max()) for n in grads["eager"])

    _ab(f"evaluation (batch {be})", evaluate(eager, bank_e), evaluate(compiled, bank_c), args.steps, device)
    # Frozen weights as in `test`; it also keeps dynamo from reusing the compiled copy's inference graph
    # for this copy (same code, guards that pass), which would give its results without the freezing.
    for p in frozen.parameters():
        p.requires_grad_(False)
    bank_f.freeze()
    _ab(f"evaluation, weights frozen in (test/predict; batch {be})", evaluate(eager, bank_e), evaluate(frozen, bank_f),
        args.steps, device)
    (maps_e, det_e), (maps_c, det_c) = evaluate(eager, bank_e)(), evaluate(compiled, bank_c)()
    maps_f, det_f = evaluate(frozen, bank_f)()
    print(f"same input, eager vs compiled: anomaly maps differ by at most {float((maps_e - maps_c).abs().max()):.2e} "
          f"(maps in [{float(maps_e.min()):.3f}, {float(maps_e.max()):.3f}]), detection scores by "
          f"{float((det_e - det_c).abs().max()):.2e}, stage-2 gradients by {gdiff:.2e} (largest gradient {gscale:.2e}); "
          f"eager vs weights frozen in: maps {float((maps_e - maps_f).abs().max()):.2e}, detection scores "
          f"{float((det_e - det_f).abs().max()):.2e}")


if __name__ == "__main__":
    main()
