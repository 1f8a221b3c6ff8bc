"""How many step sizes (or truncation boundaries) a weight quantizer holds, and which elements
share one: the ``granularity`` of a quantizer (docs/algorithms.md, "Granularity").

- ``tensor``: one value for the whole tensor (weights and activations);
- ``channel``: one per output channel (dim 0 of the weight);
- ``group``: one per group of ``group_size`` consecutive input elements of each output row,
  as torchao and GPTQ group: a weight ``[out, in]`` is read as ``[out, in / group_size,
  group_size]``, a convolution weight ``[out, in, kh, kw]`` as ``[out, in * kh * kw]`` first.
  The groups are the rows of :func:`qtrainer.quantizers.formulas.step_rows`: the elements in
  row-major order cut into ``out * in / group_size`` equal contiguous pieces.

Activations always have one value (``tensor``).
"""

from __future__ import annotations

import math

from .base import check_choice

GRANULARITIES = ("tensor", "channel", "group")
GRAD_SCALE_COUNTS = ("per_step", "tensor")


def check_group_size(group_size) -> int:
    """A positive int (bools rejected), else ``ValueError`` naming ``group_size``."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size={group_size!r} must be a positive integer (elements per "
                         "group along a weight's input dimension, e.g. 32, 64, 128)")
    return group_size


def step_count(granularity: str, group_size: int, shape: tuple[int, ...] | None,
               channels: int | None) -> int:
    """The number of step sizes of a weight quantizer.

    Args:
        granularity: ``tensor``, ``channel`` or ``group``.
        group_size: elements per group (``group`` only).
        shape: the weight's shape (``group`` needs it; ``channel`` takes dim 0 when
            ``channels`` is None).
        channels: output channels (``channel``).

    Raises ``ValueError`` naming the value and what is allowed: a group size that does not
    divide the input elements per output row lists the sizes that do.
    """
    check_choice("granularity", granularity, GRANULARITIES)
    if granularity == "tensor":
        return 1
    if granularity == "channel":
        channels = channels if channels is not None else (shape[0] if shape else None)
        if not (isinstance(channels, int) and channels > 0):
            raise ValueError(f"channels={channels!r}: granularity='channel' needs a positive "
                             "channel count")
        return channels
    check_group_size(group_size)
    if not shape or len(shape) < 2:
        raise ValueError(f"granularity='group' needs the weight's shape [out, in, ...] "
                         f"(got shape={shape!r})")
    out, per_row = int(shape[0]), math.prod(int(d) for d in shape[1:])
    if per_row % group_size:
        allowed = [d for d in range(1, per_row + 1) if per_row % d == 0]
        raise ValueError(f"group_size={group_size} does not divide the {per_row} input elements "
                         f"per output row of a weight shaped {list(shape)}; allowed group sizes "
                         f"for it: {', '.join(map(str, allowed))} (or granularity 'channel')")
    return out * (per_row // group_size)


def grad_scale_elements(numel: int, steps: int, count: str) -> int:
    """``N`` of LSQ's gradient scale ``g = 1 / sqrt(N Q_P)`` for a weight of ``numel``
    elements and ``steps`` step sizes: ``per_step`` counts the elements that share one step
    (``numel / steps``: per channel ``numel / C``, per group ``group_size``), ``tensor`` the
    whole tensor (lsq-net's code, whatever the granularity); ``count`` is checked by the
    quantizer's constructor."""
    return numel // max(steps, 1) if count == "per_step" else numel


__all__ = ["GRAD_SCALE_COUNTS", "GRANULARITIES", "check_group_size", "grad_scale_elements",
           "step_count"]
