"""Residual adapters and projections (SPEC §2, §11).

Module layout mirrors the reference checkpoints (``fc`` is a ``Sequential`` when it has an
activation, a bare ``Linear`` otherwise) so reference files map onto these modules key for key.
"""

from __future__ import annotations

import torch
from torch import nn

from aaclip_core.model.blocks import linear_leaky_relu, records_autograd


class Adapter(nn.Module):
    """One bias-free Linear followed by LeakyReLU (default slope 0.01); no bottleneck."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(c_in, c_out, bias=False), nn.LeakyReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_leaky_relu(self.fc, x)


class Projection(nn.Module):
    """Bias-free Linear, with LeakyReLU only when ``relu`` (which changes the state-dict keys)."""

    def __init__(self, c_in: int, c_out: int, relu: bool) -> None:
        super().__init__()
        linear = nn.Linear(c_in, c_out, bias=False)
        self.fc = nn.Sequential(linear, nn.LeakyReLU()) if relu else linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_leaky_relu(self.fc, x)


def _norm_ratio(a: torch.Tensor, x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    return x.norm(dim=-1, keepdim=True) / a.norm(dim=-1, keepdim=True).clamp_min(eps)


def rescale_to(a: torch.Tensor, x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``a`` scaled per token to the norm of ``x``: adapters change direction, not magnitude."""
    return a * _norm_ratio(a, x, eps)


def norm_matched_mix(x: torch.Tensor, adapter: nn.Module, weight: float) -> torch.Tensor:
    """``w * rescale(adapter(x)) + (1 - w) * x``. An ``Adapter``'s output is always a new tensor,
    so when autograd records nothing the mix is built in it (the same bits: each product and the
    sum commute)."""
    if not isinstance(adapter, Adapter) or records_autograd(x, adapter):
        return weight * rescale_to(adapter(x), x) + (1.0 - weight) * x
    a = adapter(x)
    return a.mul_(_norm_ratio(a, x)).mul_(weight).add_(x * (1.0 - weight))


def xavier_init_(module: nn.Module) -> None:
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)
