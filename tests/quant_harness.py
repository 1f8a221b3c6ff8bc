"""Running quantizers and quantized layers for the tests (and ``benchmarks/speed.py``): one
forward + backward under given fused-op settings, the bytes autograd saves, and a layer's
results with and without the recomputing path."""

from __future__ import annotations

import torch

from qtrainer.quantizers import ops


def run(module, x, w, fused, backend="auto", seed=0):
    """Forward + backward of ``module`` on a fresh leaf copy of ``x`` with upstream grad
    ``w``: ``(output, grad_x, {parameter name: grad})``."""
    for p in module.parameters():
        p.grad = None
    x = x.detach().clone().requires_grad_(True)
    with ops.options(fused=fused, backend=backend):
        torch.manual_seed(seed)
        y = module(x)
        (y.float() * w).sum().backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return y.detach(), x.grad, grads


def saved_bytes(module, *inputs, fused="auto", autocast_dtype=None) -> int:
    """Bytes of distinct storages the autograd graph keeps for one forward of ``module``
    (parameters and the inputs themselves excluded)."""
    skip = {p.untyped_storage().data_ptr() for p in module.parameters()}
    skip |= {t.untyped_storage().data_ptr() for t in inputs}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    device = inputs[0].device.type
    with ops.options(fused=fused), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast(device, dtype=autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None):
            module(*inputs)
    return sum(seen.values())


def recompute_pair(layer, x, autocast_dtype=torch.bfloat16):
    """A quantized layer's ``(output, grad_x, parameter grads)`` on ``x`` under autocast with
    ``recompute`` False, then True (same seed): the two results to compare."""
    results = []
    for flag in (False, True):
        layer.recompute = flag
        for p in layer.parameters():
            p.grad = None
        xi = x.clone().requires_grad_(True)
        with ops.options(fused="on"):
            torch.manual_seed(3)
            with torch.autocast(x.device.type, dtype=autocast_dtype):
                y = layer(xi)
            y.float().square().sum().backward()
        results.append((y.detach(), xi.grad, [p.grad.clone() for p in layer.parameters()
                                              if p.grad is not None]))
    return results
