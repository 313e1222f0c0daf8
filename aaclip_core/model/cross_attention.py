"""Cross-attention between the text and image paths, inserted as a scaled residual (SPEC §6)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from aaclip_core.model.adapters import rescale_to


class CrossAttention(nn.Module):
    """Multi-head attention from ``query_dim`` tokens onto a ``context_dim`` context.

    Keys and values are projected once per context, so 16 prompts attending to one image's context
    cost one projection of that context.
    """

    def __init__(self, query_dim: int, context_dim: int, embed_dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        if embed_dim % heads:
            raise ValueError(f"cross-attention width {embed_dim} is not divisible by {heads} heads")
        self.heads = heads
        self.dropout = dropout
        self.q = nn.Linear(query_dim, embed_dim)
        self.k = nn.Linear(context_dim, embed_dim)
        self.v = nn.Linear(context_dim, embed_dim)
        self.out = nn.Linear(embed_dim, query_dim)
        for lin in (self.q, self.k, self.v, self.out):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        b, n, d = t.shape
        return t.view(b, n, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """``x`` [B, *extra, L, Dq] attends to ``context`` [B, S, Dc]; returns [B, *extra, L, Dq].

        Queries do not attend to each other, so all of a row's prompts are laid end to end as one
        query sequence against the shared context: one fused attention call, no copies of K/V.
        """
        shape = x.shape
        q = self._split(self.q(x.reshape(shape[0], -1, shape[-1])))
        k = self._split(self.k(context))
        v = self._split(self.v(context))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        out = out.transpose(1, 2).flatten(2)
        return self.out(out).view(shape)


class ScaledCrossAttention(nn.Module):
    """``x + w * rescale(CA(x, context))`` with ``w`` fixed or learnable."""

    def __init__(self, attention: CrossAttention, weight: float, learnable: bool) -> None:
        super().__init__()
        self.attention = attention
        if learnable:
            self.weight = nn.Parameter(torch.tensor(float(weight)))
        else:
            self.register_buffer("weight", torch.tensor(float(weight)), persistent=True)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return x + self.weight * rescale_to(self.attention(x, context), x)
