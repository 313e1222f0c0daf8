"""The backbone's transformer blocks, run batch-first with the blocks' own weights.

``nn.MultiheadAttention`` turns batch-first input sequence-first before its input projection. With
gradients on (stage 2; stage 1's text side) that projection then runs as one small matrix product
per token position (a batch of B rows each) forwards and backwards, which made a frozen block's
forward+backward ~1.7x slower than it needs to be (torch 2.x, CPU). Without gradients its fused
fast path avoids that, but uses unfused attention, which costs more than fused attention at 518 px
(1370 tokens). Here the projection is one product over all tokens and attention is
``scaled_dot_product_attention``: the same arithmetic as the block's own forward, in another order
(outputs agree to float rounding, ~1e-7 relative).

When autograd records nothing (test, predict, frozen features), the residual sums and the GELU
write into tensors the block has just made instead of new ones: the same bits, but ~6x fewer fresh
pages for the allocator to fault in, which made a ViT-L forward ~5 % faster on CPU.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def records_autograd(x: torch.Tensor, module: nn.Module) -> bool:
    """Whether autograd records ``module`` applied to ``x``; if not, its intermediate tensors may be
    overwritten in place (nothing will read them again)."""
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in module.parameters()))


def linear_leaky_relu(fc: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``fc(x)`` for a bare ``Linear`` or ``Sequential(Linear, LeakyReLU)``, the activation in place
    when autograd records nothing."""
    if not isinstance(fc, nn.Sequential) or records_autograd(x, fc):
        return fc(x)
    linear, act = fc
    return F.leaky_relu_(linear(x), act.negative_slope)


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


def _mlp(mlp: nn.Module, x: torch.Tensor, in_place: bool) -> torch.Tensor:
    gelu = getattr(mlp, "gelu", None)
    if not in_place or not isinstance(gelu, nn.GELU) or not hasattr(mlp, "c_fc"):
        return mlp(x)
    hidden = mlp.c_fc(x)
    torch.ops.aten.gelu_(hidden, approximate=gelu.approximate)
    return mlp.c_proj(hidden)


def residual_block_forward(
    block: nn.Module, x: torch.Tensor, attention: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """``x + ls_1(attention(ln_1(x)))``, then ``+ ls_2(mlp(ln_2(.)))``: an OpenCLIP block with its
    attention given. Each branch's output is new, so the sums may land in it (``a + x`` and
    ``x + a`` are the same bits)."""
    in_place = not records_autograd(x, block)
    a = block.ls_1(attention(block.ln_1(x)))
    x = a.add_(x) if in_place else x + a
    m = block.ls_2(_mlp(block.mlp, block.ln_2(x), in_place))
    return m.add_(x) if in_place else x + m


def block_forward(block: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """An OpenCLIP ``ResidualAttentionBlock`` on batch-first ``x``; any other block runs as itself."""
    attn = getattr(block, "attn", None)
    if attn is None or not _is_plain_self_attention(attn) or not hasattr(block, "ls_1"):
        return block(x, attn_mask=attn_mask)
    return residual_block_forward(block, x, lambda h: self_attention(attn, h, attn_mask))
