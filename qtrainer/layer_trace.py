"""One traced forward that tells surgery what each quantizable layer sees: execution order (the
first and last layers), whether its input has negative values (signed input quantizer), and the
per-example (batch 1) input element count and multiply-accumulates used for size and BOPs.

Per layer kind:

- conv/linear: input ``x``; ``macs = numel(W) * output positions`` (H*W of a conv, tokens of a
  linear on ``(B, T, D)``).
- ``nn.Embedding``: a lookup, no multiply and no quantized input (indices): 0 and 0.
- ``nn.MultiheadAttention``: its input projection sees query, key and value (each counted once
  when they are the same tensor; ``macs`` = ``E * (E L + kdim S + vdim S)``), and its
  ``out_proj`` (whose own forward the float module never calls) is recorded right after it with
  ``E`` inputs per target token, ``E * E * L`` multiply-accumulates and a signed input (the
  attention output is a convex mix of values of either sign). The attention matmuls
  themselves hold no weights and are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .forward import call_args, run_forward


@dataclass
class Trace:
    order: list[str]
    signed: dict[str, bool]
    act_numel: dict[str, int]
    macs: dict[str, int]

    def record(self, name: str, signed: bool, act_numel: int, macs: int) -> None:
        if name not in self.signed:
            self.order.append(name)
            self.signed[name] = False
            self.act_numel[name] = act_numel
            self.macs[name] = macs
        self.signed[name] |= signed


def _per_example(x: torch.Tensor, batch_dim: int | None) -> int:
    """Elements of one example of ``x`` (all of it when unbatched)."""
    return x.numel() if batch_dim is None else x.numel() // max(x.shape[batch_dim], 1)


def _attention(trace: Trace, name: str, out_proj: str | None, m: nn.MultiheadAttention,
               args: tuple, kwargs: dict) -> None:
    names = ("query", "key", "value")
    q, k, v = (args[i] if len(args) > i else kwargs[n] for i, n in enumerate(names))
    batch_dim = None if q.dim() == 2 else (0 if m.batch_first else 1)
    distinct = [q] + [t for t, prev in ((k, q), (v, k)) if t is not prev]
    lq = _per_example(q, batch_dim) // q.shape[-1]
    s = _per_example(k, batch_dim) // k.shape[-1]
    e = m.embed_dim
    trace.record(name, any(bool((t < 0).any()) for t in distinct),
                 sum(_per_example(t, batch_dim) for t in distinct),
                 e * (e * lq + m.kdim * s + m.vdim * s))
    if out_proj is not None:
        trace.record(out_proj, True, lq * e, e * e * lq)


def trace_layers(model: nn.Module, names: list[str], example_input, example_kwargs) -> Trace:
    """Run ``model`` once (eval, no grad, buffers untouched, Transformer fast paths off)
    recording what each of the quantizable layers ``names`` sees."""
    trace = Trace([], {}, {}, {})
    modules = dict(model.named_modules())
    wanted = set(names)

    def hook(name):
        def record(module, args, kwargs, output):
            if isinstance(module, nn.MultiheadAttention):
                out_proj = f"{name}.out_proj" if f"{name}.out_proj" in wanted else None
                _attention(trace, name, out_proj, module, args, kwargs)
                return
            x = args[0] if args else next(iter(kwargs.values()))
            if isinstance(module, nn.Embedding):
                trace.record(name, False, 0, 0)
                return
            conv = isinstance(module, nn.modules.conv._ConvNd)
            positions = output[0].numel() // output.shape[1 if conv else -1] \
                if output.dim() > 2 else 1
            trace.record(name, bool((x < 0).any()), x[0].numel() if x.dim() > 1 else x.numel(),
                         module.weight.numel() * positions)
        return record

    handles = [modules[n].register_forward_hook(hook(n), with_kwargs=True) for n in names]
    was_training = model.training
    model.eval()
    try:
        args, kwargs = call_args(example_input)
        with torch.no_grad():
            run_forward(model, args, {**kwargs, **dict(example_kwargs or {})}, "tracing forward")
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return trace


__all__ = ["Trace", "trace_layers"]
