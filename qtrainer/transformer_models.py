"""Built-in transformer models, small enough to train on a CPU: a vision transformer for 32x32
images and a sequence classifier for token ids. Both are plain torch modules built from
``nn.Embedding``/``nn.Conv2d``, ``nn.TransformerEncoder`` and ``nn.Linear``, so qtrainer
quantizes them like any user's transformer (attention projections, feed-forward layers, the
embedding or patch projection and the head).
"""

from __future__ import annotations

import torch
from torch import nn


def _add_trunk(model: nn.Module, tokens: int, width: int, depth: int, heads: int,
               mlp_ratio: int, dropout: float, num_classes: int) -> None:
    """``model.pos`` (learned positions ``(1, tokens, width)``), ``model.encoder`` (pre-norm
    GELU layers, batch first), ``model.norm`` and ``model.head``."""
    model.pos = nn.Parameter(torch.zeros(1, tokens, width))
    nn.init.trunc_normal_(model.pos, std=0.02)
    layer = nn.TransformerEncoderLayer(width, heads, mlp_ratio * width, dropout,
                                       activation="gelu", batch_first=True, norm_first=True)
    model.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
    model.norm = nn.LayerNorm(width)
    model.head = nn.Linear(width, num_classes)


class VisionTransformer(nn.Module):
    """ViT (Dosovitskiy et al., 2021) for small images: ``patch_size`` x ``patch_size``
    patches projected by a strided conv, learned position embeddings, a pre-norm encoder,
    mean pooling over tokens (no class token) and a linear head.

    Input ``(N, in_channels, image_size, image_size)``; output logits ``(N, num_classes)``.
    Default: 32x32 images in 4x4 patches (64 tokens), width 64, 4 layers of 4 heads.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, image_size: int = 32,
                 patch_size: int = 4, width: int = 64, depth: int = 4, heads: int = 4,
                 mlp_ratio: int = 2, dropout: float = 0.0):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size={image_size} must be a multiple of "
                             f"patch_size={patch_size}")
        tokens = (image_size // patch_size) ** 2
        self.patch = nn.Conv2d(in_channels, width, patch_size, patch_size)
        _add_trunk(self, tokens, width, depth, heads, mlp_ratio, dropout, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.norm(self.encoder(x)).mean(1))


class SequenceClassifier(nn.Module):
    """Token embedding plus learned positions, a pre-norm encoder, the mean over non-padding
    tokens and a linear head.

    Input: token ids ``(N, T)`` (int64, ``T <= max_len``); ids equal to ``padding_idx`` are
    padding, masked out of attention (``src_key_padding_mask``) and of the mean. Output
    logits ``(N, num_classes)``.
    """

    def __init__(self, vocab_size: int = 32, num_classes: int = 4, max_len: int = 64,
                 width: int = 32, depth: int = 2, heads: int = 2, mlp_ratio: int = 2,
                 dropout: float = 0.0, padding_idx: int = 0):
        super().__init__()
        self.padding_idx = padding_idx
        self.embed = nn.Embedding(vocab_size, width, padding_idx=padding_idx)
        _add_trunk(self, max_len, width, depth, heads, mlp_ratio, dropout, num_classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pad = ids == self.padding_idx
        x = self.embed(ids) + self.pos[:, :ids.shape[1]]
        x = self.encoder(x, src_key_padding_mask=pad)
        keep = (~pad).unsqueeze(-1).to(x.dtype)
        return self.head(self.norm((x * keep).sum(1) / keep.sum(1).clamp(min=1.0)))


__all__ = ["SequenceClassifier", "VisionTransformer"]
