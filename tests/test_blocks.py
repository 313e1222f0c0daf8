"""The backbone blocks' in-place form (used when autograd records nothing: test, predict, frozen
features) gives the same bits as the recorded form and leaves its input untouched."""

from __future__ import annotations

import pytest
import torch
from open_clip.transformer import ResidualAttentionBlock

from aaclip_core.model.adapters import Adapter, Projection, norm_matched_mix
from aaclip_core.model.blocks import block_forward, records_autograd
from aaclip_core.model.dpam import dpam_block_forward


def _block(ls_init_value=None) -> ResidualAttentionBlock:
    torch.manual_seed(0)
    block = ResidualAttentionBlock(32, 4, ls_init_value=ls_init_value).eval()
    for p in block.parameters():
        p.requires_grad_(False)
    return block


def _recorded_and_in_place(fn, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    recorded = fn(x.clone().requires_grad_(True))
    assert recorded.grad_fn is not None  # the graph-building form ran
    before = x.clone()
    with torch.no_grad():
        in_place = fn(x)
    assert torch.equal(x, before), "the in-place form overwrote its input"
    return recorded.detach(), in_place


@pytest.mark.parametrize("ls_init_value", [None, 0.1])
@pytest.mark.parametrize(
    "forward",
    [
        lambda b, x: block_forward(b, x),
        lambda b, x: dpam_block_forward(b, x, "tokens"),
        lambda b, x: dpam_block_forward(b, x, "batch"),
        lambda b, x: dpam_block_forward(b, x, "self"),
    ],
    ids=["block", "dpam-tokens", "dpam-batch", "dpam-self"],
)
def test_block_in_place_form_is_bit_identical(forward, ls_init_value):
    block = _block(ls_init_value)
    x = torch.randn(3, 9, 32, generator=torch.Generator().manual_seed(1))
    recorded, in_place = _recorded_and_in_place(lambda t: forward(block, t), x)
    assert torch.equal(recorded, in_place)


def test_block_matches_open_clip_own_forward_in_both_forms():
    block = _block()
    x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        own = block(x)
    recorded, in_place = _recorded_and_in_place(lambda t: block_forward(block, t), x)
    torch.testing.assert_close(in_place, own, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(recorded, own, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("make", [lambda: Adapter(16, 16), lambda: Projection(16, 8, relu=True)], ids=["adapter", "proj"])
def test_adapter_and_projection_in_place_forms_are_bit_identical(make):
    torch.manual_seed(0)
    module = make()
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(3))
    recorded, in_place = _recorded_and_in_place(module, x)
    assert torch.equal(recorded, in_place)
    if isinstance(module, Adapter):
        recorded, in_place = _recorded_and_in_place(lambda t: norm_matched_mix(t, module, 0.1), x)
        assert torch.equal(recorded, in_place)


def test_trainable_weights_keep_the_recorded_form_with_a_frozen_input():
    """Stage 2 feeds frozen activations into trainable adapters: the gradient must still flow."""
    torch.manual_seed(0)
    adapter = Adapter(16, 16)
    x = torch.randn(2, 5, 16)
    assert records_autograd(x, adapter)
    norm_matched_mix(x, adapter, 0.1).sum().backward()
    assert adapter.fc[0].weight.grad is not None and adapter.fc[0].weight.grad.abs().sum() > 0
    with torch.no_grad():
        assert not records_autograd(x, adapter)
