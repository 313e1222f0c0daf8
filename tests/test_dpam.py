"""DPAM value-value attention and the frozen stage-1 features (SPEC §3, §9)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from aaclip_core.model.dpam import value_value_attention
from aaclip_core.recipe import load_recipe


def _reference_vv(attn: nn.MultiheadAttention, x: torch.Tensor, over: str) -> torch.Tensor:
    """Hand-written value-value attention: per head, softmax(v v^T / sqrt(d_head)) v.

    ``over="tokens"``: the tokens of each image attend to each other; ``over="batch"``: at each
    token position, the images of the batch attend to each other (the reference's accident).
    """
    b, n, d = x.shape
    h = attn.num_heads
    dh = d // h
    w_v = attn.in_proj_weight[2 * d :]
    b_v = attn.in_proj_bias[2 * d :]
    v = x @ w_v.T + b_v  # [B, N, D]
    out = torch.zeros_like(v)
    for head in range(h):
        cols = slice(head * dh, (head + 1) * dh)
        if over == "tokens":
            for i in range(b):
                vh = v[i, :, cols]  # [N, dh]
                weights = torch.softmax(vh @ vh.T / math.sqrt(dh), dim=-1)
                out[i, :, cols] = weights @ vh
        else:
            for j in range(n):
                vh = v[:, j, cols]  # [B, dh]
                weights = torch.softmax(vh @ vh.T / math.sqrt(dh), dim=-1)
                out[:, j, cols] = weights @ vh
    return out @ attn.out_proj.weight.T + attn.out_proj.bias


@pytest.fixture
def mha() -> nn.MultiheadAttention:
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(16, 4, batch_first=True)
    with torch.no_grad():
        attn.in_proj_bias.normal_(0, 0.1)
        attn.out_proj.bias.normal_(0, 0.1)
    return attn.eval()


@pytest.mark.parametrize("mode,over", [("tokens", "tokens"), ("batch", "batch")])
def test_value_value_attention_matches_reference(mha, mode, over):
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = value_value_attention(mha, x, mode)
        want = _reference_vv(mha, x, over)
    assert got.shape == (3, 5, 16)
    assert torch.allclose(got, want, atol=1e-5)


def test_value_value_modes_differ(mha):
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        tokens = value_value_attention(mha, x, "tokens")
        batch = value_value_attention(mha, x, "batch")
    assert (tokens - batch).abs().max() > 1e-2


def test_self_mode_is_batch_mode_with_batch_of_one(mha):
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        self_mode = value_value_attention(mha, x, "self")
        one_by_one = torch.cat([value_value_attention(mha, x[i : i + 1], "batch") for i in range(3)])
        # Attention over a batch of one returns each value unchanged: out_proj(v).
        v = x @ mha.in_proj_weight[32:].T + mha.in_proj_bias[32:]
        direct = mha.out_proj(v)
    assert torch.allclose(self_mode, one_by_one, atol=1e-6)
    assert torch.allclose(self_mode, direct, atol=1e-6)


# ---------------------------------------------------------------------------- stage-1 features


def _images(demo_batch) -> torch.Tensor:
    return demo_batch["image"]


def test_official_dpam_mixes_batch_members(make_model, demo_batch):
    model = make_model()
    assert model.fidelity == "official"
    images = _images(demo_batch)
    first = model.stage1_features(images)
    changed = images.clone()
    changed[3] = torch.flip(changed[3], dims=[-1]) * 0.5
    second = model.stage1_features(changed)
    # Image 0 did not change, yet its DPAM features (levels after dpam_start) do.
    assert model.dpam_start < max(model.cfg.levels)
    diff = (first[-1][0] - second[-1][0]).abs().max()
    assert diff > 1e-3
    # Levels computed before the first DPAM block depend on the image alone.
    for k, level in enumerate(model.cfg.levels):
        if level <= model.dpam_start:
            assert torch.allclose(first[k][0], second[k][0], atol=1e-6)


def test_official_dpam_alone_differs_from_in_batch(make_model, demo_batch):
    model = make_model()
    images = _images(demo_batch)
    batch = model.stage1_features(images)[-1]
    alone = model.stage1_features(images[:1])[-1]
    assert (batch[0] - alone[0]).abs().max() > 1e-3


@pytest.fixture
def corrected_recipe(demo_overrides):
    return load_recipe("demo", [*demo_overrides, 'fidelity="corrected"'])[0]


def test_corrected_dpam_is_independent_of_batch_mates(make_model, corrected_recipe, demo_batch):
    model = make_model(corrected_recipe)
    assert model.fidelity == "corrected"
    images = _images(demo_batch)
    batch = model.stage1_features(images)
    for i in range(images.shape[0]):
        alone = model.stage1_features(images[i : i + 1])
        for level_b, level_a in zip(batch, alone):
            assert torch.allclose(level_b[i], level_a[0], atol=1e-5)


def test_self_mode_equals_official_one_image_at_a_time(make_model, demo_batch):
    model = make_model()
    images = _images(demo_batch)
    isolated = model.stage1_features(images, isolate=True)
    for i in range(images.shape[0]):
        alone = model.stage1_features(images[i : i + 1])  # official, batch of one
        for level_iso, level_alone in zip(isolated, alone):
            assert torch.allclose(level_iso[i], level_alone[0], atol=1e-5)


def test_corrected_and_official_differ(make_model, corrected_recipe, demo_batch):
    images = _images(demo_batch)[:1]
    official = make_model().stage1_features(images)[-1]
    corrected = make_model(corrected_recipe).stage1_features(images)[-1]
    # Same backbone weights (same seed); only the DPAM mixing axis differs.
    assert (official - corrected).abs().max() > 1e-3


def test_stage1_features_shapes_and_composition(make_model, demo_recipe, demo_batch):
    model = make_model()
    images = _images(demo_batch)
    feats = model.stage1_features(images)
    b = images.shape[0]
    grid = demo_recipe.model.image_size // demo_recipe.model.custom_config["vision_cfg"]["patch_size"]
    embed = demo_recipe.model.custom_config["embed_dim"]
    assert len(feats) == len(demo_recipe.model.levels)
    for f in feats:
        assert f.shape == (b, grid * grid, embed)
        assert not f.requires_grad
        assert torch.all(f.norm(dim=-1) <= 2 + 1e-5)
    with torch.no_grad():
        cls = F.normalize(model.clip.encode_image(images), dim=-1)  # the ordinary CLIP embedding
    for f in feats:
        patches = f - cls.unsqueeze(1)
        # What is left after removing the image embedding is a unit vector per patch.
        assert torch.allclose(patches.norm(dim=-1), torch.ones(b, grid * grid), atol=1e-4)
    # Level computed by the ordinary blocks (before DPAM starts): exact patch composition.
    visual = model.clip.visual
    with torch.no_grad():
        x = visual._embeds(images)
        for i in range(model.cfg.levels[0]):
            x = visual.transformer.resblocks[i](x)
        expected = F.normalize(visual.ln_post(x[:, 1:]) @ visual.proj, dim=-1) + cls.unsqueeze(1)
    assert model.cfg.levels[0] <= model.dpam_start
    assert torch.allclose(feats[0], expected, atol=1e-5)


def test_dpam_start_follows_surgery_until_layer(make_model, demo_recipe):
    model = make_model()
    layers = demo_recipe.model.custom_config["vision_cfg"]["layers"]
    assert model.dpam_start == layers - (demo_recipe.model.surgery_until_layer - 1)
