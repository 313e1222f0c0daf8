"""What the evaluation benchmarks share: a recipe pointed at the demo's held-out synthetic images
(generated if absent), its threads and device, and those images' samples."""

from __future__ import annotations

import sys
from pathlib import Path

# Running `python benchmarks/<bench>.py` from a checkout puts benchmarks/ (not the repository root)
# on sys.path; make the package importable without installing it.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def demo_test_setup(recipe_name: str, sets: list[str], demo_root: str):
    """(recipe, device, samples) of the recipe's test on the demo's held-out images."""
    from aaclip_core.compute import configure_threads, select_device
    from aaclip_core.data.synthetic import ensure_demo_data
    from aaclip_core.recipe import load_recipe
    from aaclip_core.training.data import load_samples

    root = Path(demo_root)
    ensure_demo_data(root)
    recipe, _ = load_recipe(recipe_name, [*sets, f'data.test.root="{root / "test"}"',
                                          'data.test.layout="synthetic"', 'data.test.name="synthetic"'])
    configure_threads(recipe.runtime.threads)
    device = select_device(recipe.runtime.device)
    return recipe, device, load_samples(recipe.data.test, recipe.runtime.seed, field="data.test")
