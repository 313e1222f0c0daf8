"""Where `aaclip test` spends its wall time: in the model (the adapted image forward) or outside it
(data loading, maps, metrics, bookkeeping). Runs the test job's own evaluation (`evaluate`, with the
loader the test job builds) on the demo's held-out synthetic images, N of them, at the recipe's
image size. Prints figures; asserts nothing.

    python benchmarks/bench_test_split.py --recipe demo --set model.image_size=518 --images 100
    python benchmarks/bench_test_split.py --recipe base --set model.pretrained=none --set runtime.threads=2 \
        --set eval.batch_size=2 --set data.num_workers=0 --images 8

The demo images are rendered at 128 px and resized to the recipe's size on load (bicubic), as any
dataset is; decoding a full-size MVTec image costs more than decoding these. Adapter weights are the
freshly initialised ones: the time is the same as a trained model's.
"""

from __future__ import annotations

import argparse
import time

import torch
from _demo import demo_test_setup


class _Stopwatch:
    """Wall and CPU seconds (all threads of this process) spent inside the wrapped calls. On a
    shared machine the CPU split is the steadier one; the wall split is what a user waits."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds = 0.0
        self.cpu = 0.0

    def wrap(self, fn):
        def timed(*args, **kwargs):
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            t, c = time.perf_counter(), time.process_time()
            out = fn(*args, **kwargs)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            self.seconds += time.perf_counter() - t
            self.cpu += time.process_time() - c
            return out

        return timed


class _TimedLoader:
    """A loader whose batch fetching (decoding, resizing, collation) is timed."""

    def __init__(self, loader, watch: _Stopwatch) -> None:
        self.loader, self.watch = loader, watch

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        it = iter(self.loader)
        fetch = self.watch.wrap(lambda: next(it, None))
        while (batch := fetch()) is not None:
            yield batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="demo")
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--images", type=int, default=100, help="test images (taken across the demo classes)")
    ap.add_argument("--demo-root", default="aaclip-demo-data", help="where the demo data is (generated if absent)")
    args = ap.parse_args()

    from aaclip_core.evaluation.protocol import evaluate
    from aaclip_core.model import build_model
    from aaclip_core.prompts.anchors import AnchorBank
    from aaclip_core.training.data import make_dataset, make_loader

    recipe, device, samples = demo_test_setup(args.recipe, args.sets, args.demo_root)
    # Every k-th image, so each class keeps normal and anomalous images.
    step = max(1, len(samples) // args.images)
    samples = samples[::step][: args.images]
    model = build_model(recipe, device)
    bank = AnchorBank(model, [s.class_name for s in samples], recipe.data.test.name)
    size = recipe.model.image_size
    print(f"recipe {recipe.name}: {recipe.model.name} @ {size}px on {device} ({recipe.runtime.precision}, "
          f"compile={recipe.runtime.compile}), {len(samples)} images of "
          f"{len({s.class_name for s in samples})} classes, eval batch {recipe.eval.batch_size}, "
          f"{recipe.data.num_workers} loader workers, torch threads {torch.get_num_threads()}")

    in_model, loading = _Stopwatch(device), _Stopwatch(device)
    model.encode_image = in_model.wrap(model.encode_image)
    model.anchor_context = in_model.wrap(model.anchor_context)
    loader = make_loader(make_dataset(samples, recipe, "none"), recipe.eval.batch_size, False, recipe, None)
    t, c = time.perf_counter(), time.process_time()
    evaluate(model, bank, _TimedLoader(loader, loading), recipe, device,
             sample_paths=[str(s.image_path) for s in samples])
    totals = {"wall": time.perf_counter() - t, "CPU": time.process_time() - c}
    for kind, total in totals.items():
        m, load = (in_model.seconds, loading.seconds) if kind == "wall" else (in_model.cpu, loading.cpu)
        rest = total - m - load
        print(f"{kind}: total {total:.2f} s: model {m:.2f} s ({100 * m / total:.1f} %), data loading {load:.2f} s "
              f"({100 * load / total:.1f} %), maps + metrics + other {rest:.2f} s ({100 * rest / total:.1f} %); "
              f"outside the model {100 * (total - m) / total:.1f} %")


if __name__ == "__main__":
    main()
