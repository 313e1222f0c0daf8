"""DPAM ("surgery") attention: value-value self-attention with the block's own weights (SPEC §3, §9).

``official`` reproduces the reference code, which fed sequence-first tensors to a batch-first
attention: at each token position the *images of the batch* attend to each other. ``corrected``
mixes the tokens within each image, as the paper describes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from aaclip_core.model.blocks import residual_block_forward


def value_value_attention(attn: nn.MultiheadAttention, x: torch.Tensor, mode: str) -> torch.Tensor:
    """``x`` is [B, N, D] (already layer-normed); returns the attention output [B, N, D].

    ``mode``: "tokens" (corrected: within each image), "batch" (official: across the batch at each
    position), or "self" (official evaluated one image at a time, where attention over a batch of
    one returns each value unchanged; used wherever results must not depend on batch-mates).
    """
    b, n, d = x.shape
    heads = attn.num_heads
    w_v = attn.in_proj_weight[2 * d :]
    b_v = attn.in_proj_bias[2 * d :] if attn.in_proj_bias is not None else None
    v = F.linear(x, w_v, b_v)
    if mode == "self":
        return attn.out_proj(v)
    mix_batch = mode == "batch"
    v = v.view(b, n, heads, d // heads)
    # Attention runs over dim -2: tokens of one image (corrected) or images at one position (official).
    v = v.permute(1, 2, 0, 3) if mix_batch else v.permute(0, 2, 1, 3)
    out = F.scaled_dot_product_attention(v, v, v)
    out = out.permute(2, 0, 1, 3) if mix_batch else out.permute(0, 2, 1, 3)
    return attn.out_proj(out.reshape(b, n, d))


def dpam_block_forward(block: nn.Module, x: torch.Tensor, mode: str) -> torch.Tensor:
    """An OpenCLIP ``ResidualAttentionBlock`` with its attention replaced by DPAM."""
    return residual_block_forward(block, x, lambda h: value_value_attention(block.attn, h, mode))
