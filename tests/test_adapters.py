"""Residual adapters and the trainable/frozen split of AA-CLIP (SPEC §2, §11)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from aaclip_core.model import Adapter, Projection, norm_matched_mix, rescale_to
from aaclip_core.model.adapters import xavier_init_
from aaclip_core.prompts.anchors import AnchorBank
from aaclip_core.training.engine import stage2_loss
from aaclip_core.training.groups import set_trainable


class _Fixed(nn.Module):
    """An 'adapter' with a known output, so the mix can be computed by hand."""

    def __init__(self, out: torch.Tensor) -> None:
        super().__init__()
        self.out = out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out


# ---------------------------------------------------------------------------- maths


def test_rescale_to_hand_computed():
    x = torch.tensor([[3.0, 4.0], [0.0, 2.0]])  # norms 5 and 2
    a = torch.tensor([[1.0, 0.0], [3.0, 4.0]])  # norms 1 and 5
    out = rescale_to(a, x)
    # Row 0: (1, 0) * 5/1; row 1: (3, 4) * 2/5.
    assert torch.allclose(out, torch.tensor([[5.0, 0.0], [1.2, 1.6]]))


def test_rescale_preserves_per_token_norm_and_direction():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 7, generator=g) * torch.rand(2, 5, 1, generator=g) * 10
    a = torch.randn(2, 5, 7, generator=g)
    out = rescale_to(a, x)
    assert torch.allclose(out.norm(dim=-1), x.norm(dim=-1), atol=1e-5)
    # Direction is the adapter's: cosine(out, a) == 1 for every token.
    cos = nn.functional.cosine_similarity(out, a, dim=-1)
    assert torch.allclose(cos, torch.ones_like(cos), atol=1e-5)


def test_norm_matched_mix_hand_computed():
    x = torch.tensor([[3.0, 4.0]])  # norm 5
    adapter = _Fixed(torch.tensor([[0.0, 2.0]]))  # rescaled to (0, 5)
    out = norm_matched_mix(x, adapter, 0.1)
    # 0.1 * (0, 5) + 0.9 * (3, 4) = (2.7, 4.1)
    assert torch.allclose(out, torch.tensor([[2.7, 4.1]]))
    # weight 0 keeps x, weight 1 is the rescaled adapter output.
    assert torch.equal(norm_matched_mix(x, adapter, 0.0), x)
    assert torch.allclose(norm_matched_mix(x, adapter, 1.0), torch.tensor([[0.0, 5.0]]))


def test_norm_matched_mix_matches_formula_with_real_adapter():
    torch.manual_seed(0)
    adapter = Adapter(6, 6)
    x = torch.randn(3, 4, 6)
    a = adapter(x)
    expected = 0.25 * a * (x.norm(dim=-1, keepdim=True) / a.norm(dim=-1, keepdim=True)) + 0.75 * x
    assert torch.allclose(norm_matched_mix(x, adapter, 0.25), expected, atol=1e-6)


# ---------------------------------------------------------------------------- modules


def test_adapter_is_one_bias_free_linear_with_leaky_relu():
    adapter = Adapter(4, 3)
    linears = [m for m in adapter.modules() if isinstance(m, nn.Linear)]
    acts = [m for m in adapter.modules() if isinstance(m, nn.LeakyReLU)]
    assert len(linears) == 1 and linears[0].bias is None
    assert (linears[0].in_features, linears[0].out_features) == (4, 3)
    assert len(acts) == 1 and acts[0].negative_slope == 0.01
    assert list(adapter.state_dict()) == ["fc.0.weight"]
    # Behaviour: negative pre-activations are scaled by 0.01.
    with torch.no_grad():
        linears[0].weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, -1.0, 0, 0], [0, 0, 0, 0]]))
    out = adapter(torch.tensor([[2.0, 3.0, 1.0, 1.0]]))
    assert torch.allclose(out, torch.tensor([[2.0, -0.03, 0.0]]))


def test_projection_keys_and_activation_depend_on_relu():
    plain = Projection(4, 2, relu=False)
    with_relu = Projection(4, 2, relu=True)
    assert list(plain.state_dict()) == ["fc.weight"]
    assert list(with_relu.state_dict()) == ["fc.0.weight"]
    assert not any(isinstance(m, nn.LeakyReLU) for m in plain.modules())
    assert any(isinstance(m, nn.LeakyReLU) for m in with_relu.modules())
    w = torch.tensor([[1.0, 0, 0, 0], [0, -1.0, 0, 0]])
    with torch.no_grad():
        plain.fc.weight.copy_(w)
        with_relu.fc[0].weight.copy_(w)
    x = torch.tensor([[1.0, 2.0, 0.0, 0.0]])
    assert torch.allclose(plain(x), torch.tensor([[1.0, -2.0]]))
    assert torch.allclose(with_relu(x), torch.tensor([[1.0, -0.02]]))


def test_xavier_init_bounds():
    torch.manual_seed(0)
    lin = nn.Linear(300, 200, bias=False)
    default_bound = 1 / math.sqrt(300)  # PyTorch's own init range for this layer
    xavier_init_(lin)
    bound = math.sqrt(6 / (300 + 200))
    w = lin.weight.detach()
    assert float(w.abs().max()) <= bound + 1e-7
    # Uniform on [-b, b]: the extremes come close to b (beyond PyTorch's default range), std = b/sqrt(3).
    assert float(w.abs().max()) > max(0.98 * bound, default_bound)
    assert abs(float(w.std()) - bound / math.sqrt(3)) < 0.02 * bound


def test_model_adapters_are_xavier_initialised(make_model):
    model = make_model()
    mats = [(n, p.detach()) for n, p in model.named_parameters() if not n.startswith("clip.") and p.dim() > 1]
    assert len(mats) >= 8
    for name, p in mats:
        fan_out, fan_in = p.shape
        bound = math.sqrt(6 / (fan_in + fan_out))
        assert float(p.abs().max()) <= bound + 1e-7, name
        assert float(p.abs().max()) > 0.9 * bound, name


def test_model_adapter_layout_follows_recipe(make_model, demo_recipe):
    model = make_model()
    cfg = demo_recipe.model
    # Text: one adapter per adapted block + the replacing projection (always with LeakyReLU).
    assert len(model.text_adapter) == cfg.text_adapt_until + 1
    assert isinstance(model.text_adapter[-1], Projection)
    assert any(isinstance(m, nn.LeakyReLU) for m in model.text_adapter[-1].modules())
    assert len(model.image_adapter["layer_adapters"]) == cfg.image_adapt_until
    assert len(model.image_adapter["seg_proj"]) == len(cfg.levels)
    keys = set(model.adapter_state_dict())
    # demo recipe has relu off: bare Linear keys for seg/det projections.
    assert "image_adapter.det_proj.fc.weight" in keys
    assert "image_adapter.seg_proj.0.fc.weight" in keys
    assert "text_adapter.3.fc.0.weight" in keys


# ---------------------------------------------------------------------------- state and freezing


def test_adapter_state_dict_excludes_backbone(make_model):
    model = make_model()
    state = model.adapter_state_dict()
    full = model.state_dict()
    assert state and not any(k.startswith("clip.") for k in state)
    assert set(state) == {k for k in full if not k.startswith("clip.")}
    assert any(k.startswith("clip.") for k in full)
    n_trainable = sum(v.numel() for v in state.values())
    n_backbone = sum(v.numel() for k, v in full.items() if k.startswith("clip."))
    assert 0 < n_trainable < n_backbone


def test_backbone_gets_no_gradient_after_stage2_backward(make_model, demo_recipe, demo_batch):
    model = make_model()
    assert not any(p.requires_grad for p in model.clip.parameters())
    bank = AnchorBank(model, demo_batch["class_name"], demo_recipe.data.train.name)
    set_trainable(model, 2)
    model.train(True)
    bank.freeze()
    loss = stage2_loss(
        model, bank, demo_recipe, demo_batch["image"], demo_batch["mask"], demo_batch["label"], demo_batch["class_name"]
    )
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is None for p in model.clip.parameters())
    assert all(p.grad is None for p in model.text_adapter.parameters())
    image_grads = [p.grad for p in model.image_adapter.parameters()]
    assert all(g is not None for g in image_grads)
    assert sum(float(g.norm()) for g in image_grads) > 0


def test_train_mode_keeps_backbone_in_eval(make_model):
    model = make_model()
    model.train(True)
    assert model.training
    assert not model.clip.training
    assert not any(m.training for m in model.clip.modules())
    assert not any(m.training for m in model.text_adapter.modules())
    assert not any(m.training for m in model.image_adapter.modules())
    model.train(False)
    assert not model.training


def test_train_mode_only_reaches_cross_attention(make_model):
    model = make_model(with_cross=True)
    model.train(True)
    assert model.text_cross_attn.training and model.image_cross_attn.training
    assert all(m.training for m in model.image_cross_attn.modules())
    assert not any(m.training for m in model.clip.modules())
    model.eval()
    assert not model.text_cross_attn.training and not model.image_cross_attn.training


@pytest.mark.parametrize("weight", [0.1, 0.5])
def test_adapted_text_block_output_keeps_norm(make_model, weight):
    """Adapters change direction, not magnitude: the mixed token norm is at most |x| and, for the
    default weight, stays close to it."""
    model = make_model()
    torch.manual_seed(1)
    x = torch.randn(2, 77, model.dims.text_width)
    out = norm_matched_mix(x, model.text_adapter[0], weight)
    xn, on = x.norm(dim=-1), out.norm(dim=-1)
    assert torch.all(on <= xn * (1 + 1e-5))
    assert torch.all(on >= xn * (1 - 2 * weight))
