"""Throughput and memory of a recipe, each figure also as a ratio to the plain frozen backbone
measured in the same process: stage-1 and stage-2 training steps, evaluation per image, metric
seconds per class, peak memory. Prints figures; asserts nothing.

    python benchmarks/bench_train_eval.py --recipe demo
    python benchmarks/bench_train_eval.py --recipe base --set model.pretrained=none --set model.image_size=224 \
        --set runtime.threads=2 --set stage1.batch_size=4 --set eval.batch_size=2
    python benchmarks/bench_train_eval.py --recipe cross-demo --cross
    python benchmarks/bench_train_eval.py --recipe demo --only stage2 --profile   # where the time goes

The ratios compare each step with the least the backbone must do for it:
- evaluation per image / one plain frozen forward per image (``clip.visual(images)``, no grad);
- stage-2 step / a plain forward + backward through the same blocks (the gradient enters after the
  first block, where the first trainable module sits; backbone weights frozen as in training);
- stage-1 step / its minimum: the shared prefix once, then the DPAM and the ordinary paths (no grad);
  and / that plus a plain forward + backward of the batch's classes' prompts through the text tower
  (gradient entering after the first text block, where the first text adapter sits).
1.00 means nothing measurable above the backbone; below 1 is possible with torch.compile or bf16.
With ``--set runtime.compile=true`` the evaluation runs as `aaclip test` runs it then: compiled,
with the weights compiled in as constants.
Ratios are given on CPU time (steady on a shared machine) and on wall time.

Inputs are random tensors of the recipe's image size (no dataset needed); `model.pretrained=none`
gives random backbone weights, which cost the same time as real ones. Each timing is the median of
``--steps`` repetitions after one warm-up call, and the baseline is timed interleaved with the step
it is compared to, so load from other processes affects both alike.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

# Running `python benchmarks/bench_train_eval.py` from a checkout puts benchmarks/ (not the
# repository root) on sys.path; make the package importable without installing it.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _peak_rss_gib() -> float:
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 2**20 if sys.platform != "darwin" else kib / 2**30


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _once(fn, device: torch.device) -> tuple[float, float]:
    """Wall seconds and CPU seconds (all threads of this process) of one call. On a shared machine
    the CPU time is the steadier measure of the work done; the wall time is what a user waits."""
    _sync(device)
    t, c = time.perf_counter(), time.process_time()
    fn()
    _sync(device)
    return time.perf_counter() - t, time.process_time() - c


def _paired(fn, base, steps: int, device: torch.device) -> dict[str, float]:
    """Medians of ``fn`` and ``base`` (wall and CPU), timed alternately after one warm-up each, and
    the medians of the per-pair ratios (robust to a neighbour's load arriving mid-run)."""
    first, _ = _once(fn, device)  # warm-up: allocations, kernel selection, torch.compile
    _once(base, device)
    runs = [(_once(fn, device), _once(base, device)) for _ in range(steps)]
    med = statistics.median
    out = {
        "wall": med(t[0] for t, _ in runs),
        "base_wall": med(b[0] for _, b in runs),
        "ratio_wall": med(t[0] / b[0] for t, b in runs),
        "cpu": med(t[1] for t, _ in runs),
        "base_cpu": med(b[1] for _, b in runs),
        "ratio_cpu": med(t[1] / b[1] for t, b in runs),
        "first": first,
    }
    ratios = [t[1] / b[1] for t, b in runs]
    if len(ratios) >= 4:  # the spread of the per-pair ratios: what one noisy machine allows to claim
        q1, _, q3 = statistics.quantiles(ratios, n=4)
        out["ratio_cpu_q1"], out["ratio_cpu_q3"] = q1, q3
    print(f"    first call {first:.2f} s; wall {', '.join(f'{t[0]:.2f}' for t, _ in runs)} s vs baseline "
          f"{', '.join(f'{b[0]:.2f}' for _, b in runs)} s; CPU-time ratios {', '.join(f'{r:.3f}' for r in ratios)}")
    return out


def _profile(fn, label: str, rows: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    print(f"--- profile: {label} (self CPU time) ---")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="demo")
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--cross", action="store_true", help="with the cross-attention modules on")
    ap.add_argument("--only", choices=["stage1", "stage2", "eval", "metrics"], action="append",
                    help="run only these parts (repeatable)")
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler table per part (no timing)")
    ap.add_argument("--profile-rows", type=int, default=25)
    ap.add_argument("--metric-images", type=int, default=100, help="images per class for the metric timing")
    args = ap.parse_args()
    parts = set(args.only or ["stage1", "stage2", "eval", "metrics"])

    from aaclip_core.compute import autocast, configure_threads, select_device
    from aaclip_core.evaluation.protocol import ClassMaps, predict_batch, score_class
    from aaclip_core.model import build_model
    from aaclip_core.model.dpam import dpam_block_forward
    from aaclip_core.prompts.anchors import AnchorBank
    from aaclip_core.recipe import load_recipe
    from aaclip_core.training.engine import stage1_loss, stage2_loss
    from aaclip_core.training.groups import set_trainable

    recipe, _ = load_recipe(args.recipe, args.sets)
    configure_threads(recipe.runtime.threads)
    device = select_device(recipe.runtime.device)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = build_model(recipe, device, with_cross=args.cross)
    build_s = time.perf_counter() - t0
    size = recipe.model.image_size
    classes = ["bottle", "cable"]
    bank = AnchorBank(model, classes, "MVTec")
    visual = model.clip.visual
    blocks = visual.transformer.resblocks

    def batch(n: int):
        images = torch.randn(n, 3, size, size, device=device)
        masks = (torch.rand(n, 1, size, size, device=device) > 0.95).float()
        labels = torch.randint(0, 2, (n,), device=device)
        names = [classes[i % 2] for i in range(n)]
        return images, masks, labels, names

    b1, b2, be = recipe.stage1.batch_size, recipe.stage2.batch_size, recipe.eval.batch_size
    prec = recipe.runtime.precision
    print(f"recipe {recipe.name}: {recipe.model.name} @ {size}px on {device} ({prec}, "
          f"compile={recipe.runtime.compile}), cross={args.cross}, build {build_s:.1f} s, "
          f"torch threads {torch.get_num_threads()}")
    table: list[tuple[str, dict[str, float], str]] = []

    def report(label: str, fn, base, unit_images: int, base_name: str) -> None:
        if args.profile:
            _profile(fn, label, args.profile_rows)
            return
        r = _paired(fn, base, args.steps, device)
        table.append((label, r, base_name))
        print(f"{label}: {r['wall']:.3f} s wall ({unit_images / r['wall']:.2f} images/s), {r['cpu']:.3f} s CPU; "
              f"{base_name} {r['base_wall']:.3f} s wall, {r['base_cpu']:.3f} s CPU; "
              f"ratio {r['ratio_cpu']:.3f} (CPU time), {r['ratio_wall']:.3f} (wall)")

    if "stage1" in parts:
        set_trainable(model, 1)
        images, masks, _, names = batch(b1)

        def s1():
            with autocast(device, prec):
                loss = stage1_loss(model, bank, recipe, images, masks, names)
            loss.backward()
            model.zero_grad(set_to_none=True)

        mode = "tokens" if recipe.fidelity == "corrected" else "batch"
        last = max(recipe.model.levels)

        @torch.no_grad()
        def s1_min():
            with autocast(device, prec):
                x = visual._embeds(images)
                for i in range(model.dpam_start):
                    x = blocks[i](x)
                ordinary, surgery = x, x
                for i in range(model.dpam_start, len(blocks)):
                    ordinary = blocks[i](ordinary)
                    if i < last:
                        surgery = dpam_block_forward(blocks[i], surgery, mode)

        report(f"stage-1 step (batch {b1})", s1, s1_min, b1, "prefix + DPAM + plain paths")

        # Stage 1 also trains the text adapters: every step runs the batch's classes' prompts through
        # the text tower forwards and backwards. The plain version of that work, for the second ratio.
        text_blocks = model.clip.transformer.resblocks
        prompts = bank.prefix[sorted({bank.index[c] for c in names})].flatten(0, 1)
        text_mask = model.clip.attn_mask[: prompts.shape[1], : prompts.shape[1]]

        def s1_min_and_text():
            s1_min()
            with autocast(device, prec):
                x = prompts.detach().requires_grad_(True)
                for blk in text_blocks[1:]:
                    x = blk(x, attn_mask=text_mask)
                out = model.clip.ln_final(x).float().sum()
            out.backward()

        report(f"stage-1 step (batch {b1})", s1, s1_min_and_text, b1,
               "the same + plain text forward+backward of its prompts")

    if "stage2" in parts:
        set_trainable(model, 2)
        bank.freeze()
        images, masks, labels, names = batch(b2)

        def s2():
            with autocast(device, prec):
                loss = stage2_loss(model, bank, recipe, images, masks, labels, names)
            loss.backward()
            model.zero_grad(set_to_none=True)

        def s2_plain():
            with autocast(device, prec):
                with torch.no_grad():
                    x = blocks[0](visual._embeds(images))
                x.requires_grad_(True)
                for blk in blocks[1 : max(recipe.model.levels)]:
                    x = blk(x)
                out = visual.ln_post(x).float().sum()
            out.backward()

        report(f"stage-2 step (batch {b2})", s2, s2_plain, b2, "plain forward+backward")

    if "eval" in parts:
        if recipe.runtime.compile:  # as `aaclip test` and `predict` build it: the trained weights compiled in
            model.compile_image_path(freeze_weights=True)
        for p in model.parameters():
            p.requires_grad_(False)
        bank.freeze()
        images, _, _, names = batch(be)

        @torch.no_grad()
        def ev():
            with autocast(device, prec):
                predict_batch(model, bank, images, names, recipe)

        @torch.no_grad()
        def ev_plain():
            with autocast(device, prec):
                visual(images)

        report(f"evaluation (batch {be})", ev, ev_plain, be, "plain forward")

    if "metrics" in parts:
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

    if table:
        print("\n| step | wall s | CPU s | ratio (CPU time) | middle half of pairs | ratio (wall) | first call s "
              "| backbone reference |")
        print("|---|---|---|---|---|---|---|---|")
        for label, r, base_name in table:
            spread = f"{r['ratio_cpu_q1']:.3f}–{r['ratio_cpu_q3']:.3f}" if "ratio_cpu_q1" in r else "-"
            print(f"| {label} | {r['wall']:.3f} | {r['cpu']:.3f} | {r['ratio_cpu']:.3f} | {spread} | "
                  f"{r['ratio_wall']:.3f} | {r['first']:.2f} | {base_name} |")
    print(f"peak RSS {_peak_rss_gib():.2f} GiB", end="")
    if device.type == "cuda":
        print(f", peak CUDA memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB", end="")
    print()


if __name__ == "__main__":
    main()
