"""Named groups of trainable parameters, for optimisers and gradient-norm diagnostics (SPEC §7)."""

from __future__ import annotations

import torch
from torch import nn

from aaclip_core.model import AACLIP

GROUPS = ("text_adapters", "text_cross_attn", "image_adapters", "projections", "image_cross_attn")


def parameter_groups(model: AACLIP) -> dict[str, list[nn.Parameter]]:
    ia = model.image_adapter
    groups = {
        "text_adapters": list(model.text_adapter[:-1].parameters()),
        "text_cross_attn": list(model.text_cross_attn.parameters()) if model.text_cross_attn else [],
        "image_adapters": list(ia["layer_adapters"].parameters()),
        "projections": list(model.text_adapter[-1].parameters())
        + list(ia["seg_proj"].parameters())
        + list(ia["det_proj"].parameters()),
        "image_cross_attn": list(model.image_cross_attn.parameters()) if model.image_cross_attn else [],
    }
    return groups


def stage_parameters(model: AACLIP, stage: int) -> list[nn.Parameter]:
    """Stage 1 trains the text side, stage 2 the image side (cross-attention modules included)."""
    if stage == 1:
        mods = [model.text_adapter, model.text_cross_attn]
    else:
        mods = [model.image_adapter, model.image_cross_attn]
    return [p for m in mods if m is not None for p in m.parameters()]


def set_trainable(model: AACLIP, stage: int) -> list[nn.Parameter]:
    """Freeze everything but the stage's parameters; returns them."""
    for p in model.parameters():
        p.requires_grad_(False)
    params = stage_parameters(model, stage)
    for p in params:
        p.requires_grad_(True)
    return params


def grad_norms(model: AACLIP) -> dict[str, float]:
    """L2 norm of the current gradient of each group that has one."""
    out = {}
    for name, params in parameter_groups(model).items():
        grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
        if grads:
            out[name] = float(torch.stack(grads).norm())
    return out


def count_trainable(model: AACLIP) -> int:
    return sum(p.numel() for params in parameter_groups(model).values() for p in params)
