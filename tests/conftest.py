"""Shared fixtures: the synthetic demo data (generated once per session), the tiny demo recipe
pointed at it, and a throw-away MLflow store per test."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from aaclip_core.config import Recipe, load_recipe
from aaclip_core.data import ensure_demo_data


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo-data")
    ensure_demo_data(root)
    return root


@pytest.fixture(scope="session")
def demo_overrides(demo_root) -> list[str]:
    """--set values that point the demo recipe at the session's demo data."""
    return [
        f'data.train.root="{demo_root / "train"}"',
        f'data.test.root="{demo_root / "test"}"',
    ]


@pytest.fixture
def demo_recipe(demo_overrides) -> Recipe:
    return load_recipe("demo", demo_overrides)[0]


@pytest.fixture
def tracking_uri(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture
def make_model(demo_recipe):
    """Factory for a fresh tiny AA-CLIP (random backbone seeded, so every call is identical)."""
    from aaclip_core.model import build_model

    def make(recipe: Recipe | None = None, with_cross: bool = False, seed: int = 0):
        torch.manual_seed(seed)
        return build_model(recipe or demo_recipe, "cpu", with_cross=with_cross)

    return make


@pytest.fixture
def demo_batch(demo_recipe):
    """A few preprocessed demo images with masks, labels and class names."""
    from aaclip_core.training.data import fixed_batch, load_samples

    samples = load_samples(demo_recipe.data.train, demo_recipe.runtime.seed)
    # Two anomalous and two normal images of two classes.
    picked = [s for s in samples if s.label == 1][:2] + [s for s in samples if s.label == 0][-2:]
    return fixed_batch(picked, demo_recipe)
