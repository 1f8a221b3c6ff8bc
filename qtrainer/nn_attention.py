"""The attention computation of :class:`qtrainer.nn.QuantMultiheadAttention`, in plain torch ops.

``nn.MultiheadAttention`` computes its input and output projections inside
``F.multi_head_attention_forward`` (or a fused kernel) from the raw weights, so neither a
quantized ``out_proj`` nor a quantizer on ``in_proj_weight`` would ever run. The quantized layer
computes the projections itself and uses :func:`merged_mask` and :func:`attend` here for what
lies between them: the scaled dot-product attention over heads with the masks of
``nn.MultiheadAttention`` (``attn_mask`` 2-D ``(L, S)`` or 3-D ``(N*H, L, S)``,
``key_padding_mask`` ``(N, S)``, boolean = True where not allowed, or additive floats;
``is_causal`` without a mask builds the causal mask) and, optionally, quantizers on the inputs of
its two matmuls (``q``, ``k``, the softmax output ``probs`` and ``v``).

Shapes: ``L`` target length, ``S`` source length, ``N`` batch, ``H`` heads, ``E`` embedding
width, ``D = E / H`` head width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MATMUL_SITES = ("q", "k", "probs", "v")
"""The attention matmul inputs that ``attention.matmul_bits`` quantizes: ``softmax(q k^T /
sqrt(D)) v`` with ``q``, ``k``, ``v`` after the in-projection and ``probs`` the softmax output."""


def additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask (True = not allowed) as ``0 / -inf`` in ``dtype``; a float mask as is."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            mask, float("-inf"))
    return mask.to(dtype)


def merged_mask(attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None,
                is_causal: bool, n: int, h: int, lq: int, s: int, dtype: torch.dtype,
                device: torch.device) -> torch.Tensor | None:
    """One additive mask broadcasting over ``(N, H, L, S)``, or None when nothing is masked.

    ``is_causal`` is torch's hint that ``attn_mask`` is causal: with a mask given, the mask is
    used as it is; without one, the causal mask is built.
    """
    mask = None
    if attn_mask is not None:
        m = additive(attn_mask, dtype)
        mask = m.view(1, 1, lq, s) if m.dim() == 2 else m.view(n, h, lq, s)
    elif is_causal:
        mask = torch.full((lq, s), float("-inf"), dtype=dtype, device=device).triu(1)
        mask = mask.view(1, 1, lq, s)
    if key_padding_mask is not None:
        kp = additive(key_padding_mask, dtype).view(n, 1, 1, s)
        mask = kp if mask is None else mask + kp
    return mask


def split_heads(x: torch.Tensor, h: int) -> torch.Tensor:
    """``(T, N, E)`` -> ``(N, H, T, D)``."""
    t, n, e = x.shape
    return x.reshape(t, n, h, e // h).permute(1, 2, 0, 3)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``(N, H, T, D)`` -> ``(T, N, E)``."""
    n, h, t, d = x.shape
    return x.permute(2, 0, 1, 3).reshape(t, n, h * d)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
           dropout_p: float, need_weights: bool, quantizers=None
           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``softmax(q k^T / sqrt(D) + mask) v`` over ``(N, H, T, D)`` tensors; returns the output
    ``(N, H, L, D)`` and, when ``need_weights``, the attention weights ``(N, H, L, S)``.

    ``quantizers``: None, or a mapping of :data:`MATMUL_SITES` to quantizers applied to those
    matmul inputs. Without quantizers and weights the fused ``F.scaled_dot_product_attention``
    runs (same math).
    """
    if quantizers is None and not need_weights:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p), None
    if quantizers is not None:
        q, k, v = quantizers["q"](q), quantizers["k"](k), quantizers["v"](v)
    scores = (q * (1.0 / math.sqrt(q.shape[-1]))) @ k.transpose(-2, -1)
    if mask is not None:
        scores = scores + mask
    probs = torch.softmax(scores, dim=-1)
    weights = probs
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    if quantizers is not None:
        probs = quantizers["probs"](probs)
    return probs @ v, (weights if need_weights else None)


__all__ = ["MATMUL_SITES", "additive", "attend", "merge_heads", "merged_mask", "split_heads"]
