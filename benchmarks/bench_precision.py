"""How much bf16 autocast changes the test metrics: the test job's `evaluate` on the demo's held-out
images, once in fp32 and once under bf16 autocast (maps and metrics stay fp32 either way), same
model, same images. Prints both metric sets, their differences and the CPU seconds of each pass.

    python benchmarks/bench_precision.py --recipe demo
    python benchmarks/bench_precision.py --recipe demo --adapters path/to/adapters.safetensors

Without --adapters the model has freshly initialised adapters (the change bf16 makes is still
measured; its size on a trained model can differ).
"""

from __future__ import annotations

import argparse
import time

from _demo import demo_test_setup


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="demo")
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--adapters", help="a safetensors file of adapter weights (AACLIP.adapter_state_dict)")
    ap.add_argument("--demo-root", default="aaclip-demo-data", help="where the demo data is (generated if absent)")
    args = ap.parse_args()

    from aaclip_core.compute import bf16_supported
    from aaclip_core.evaluation.protocol import METRIC_NAMES, evaluate
    from aaclip_core.model import build_model
    from aaclip_core.prompts.anchors import AnchorBank
    from aaclip_core.training.data import make_dataset, make_loader

    recipe, device, samples = demo_test_setup(args.recipe, args.sets, args.demo_root)
    model = build_model(recipe, device)
    if args.adapters:
        from safetensors.torch import load_file

        model.load_adapter_state_dict(load_file(args.adapters))
    bank = AnchorBank(model, [s.class_name for s in samples], recipe.data.test.name)
    print(f"recipe {recipe.name}: {recipe.model.name} @ {recipe.model.image_size}px on {device}, "
          f"{len(samples)} images; native bf16: {bf16_supported(device)}")
    means = {}
    for precision in ("fp32", "bf16"):
        run = recipe.model_copy(update={"runtime": recipe.runtime.model_copy(update={"precision": precision})})
        loader = make_loader(make_dataset(samples, run, "none"), run.eval.batch_size, False, run, None)
        c = time.process_time()
        means[precision] = evaluate(model, bank, loader, run, device).mean
        print(f"{precision}: {time.process_time() - c:.2f} s CPU")
    print("| metric | fp32 | bf16 | bf16 - fp32 |\n|---|---|---|---|")
    for m in METRIC_NAMES:
        a, b = means["fp32"][m], means["bf16"][m]
        print(f"| {m} | {100 * a:.2f} | {100 * b:.2f} | {100 * (b - a):+.2f} |")


if __name__ == "__main__":
    main()
