"""The backbone's transformer blocks, run batch-first with the blocks' own weights.

``nn.MultiheadAttention`` turns batch-first input sequence-first before its input projection. With
gradients on (stage 2; stage 1's text side) that projection then runs as one small matrix product
per token position (a batch of B rows each) forwards and backwards, which made a frozen block's
forward+backward ~1.7x slower than it needs to be (torch 2.x, CPU). Without gradients its fused
fast path avoids that, but uses unfused attention, which costs more than fused attention at 518 px
(1370 tokens). Here the projection is one product over all tokens and attention is
``scaled_dot_product_attention``: the same arithmetic as the block's own forward, in another order
(outputs agree to float rounding, ~1e-7 relative).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _is_plain_self_attention(attn: nn.Module) -> bool:
    return (
        isinstance(attn, nn.MultiheadAttention)
        and attn._qkv_same_embed_dim
        and attn.bias_k is None
        and not attn.add_zero_attn
    )


def self_attention(attn: nn.MultiheadAttention, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
    """``attn(x, x, x, need_weights=False, attn_mask=attn_mask)[0]`` for batch-first ``x`` [B, N, D]
    (eval mode: attention dropout off). A float ``attn_mask`` is added to the scores, as there."""
    b, n, d = x.shape
    h = attn.num_heads
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).view(b, n, 3, h, d // h).permute(2, 0, 3, 1, 4)
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        attn_mask = attn_mask.to(qkv.dtype)
    out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=attn_mask)
    return attn.out_proj(out.transpose(1, 2).reshape(b, n, d))


def block_forward(block: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """An OpenCLIP ``ResidualAttentionBlock`` on batch-first ``x``; any other block runs as itself."""
    attn = getattr(block, "attn", None)
    if attn is None or not _is_plain_self_attention(attn) or not hasattr(block, "ls_1"):
        return block(x, attn_mask=attn_mask)
    x = x + block.ls_1(self_attention(attn, block.ln_1(x), attn_mask))
    return x + block.ls_2(block.mlp(block.ln_2(x)))
