"""Numerical faults during QAT: non-finite gradients, and quantizer parameters that left their
domain (a step size or alpha that is non-positive or non-finite)."""

from __future__ import annotations

import warnings

import torch

from ..nn import named_quantizers


class QuantizationFault(RuntimeError):
    """Training produced a value QAT cannot continue from (non-finite loss or gradient, a step
    size or alpha that is non-positive or non-finite). The message names the layer, the
    parameter, the value and the optimizer step."""


def check_gradients(pl_module, optimizer, step: int, on_nonfinite: str) -> bool:
    """Stop (``on_nonfinite="stop"``) or skip the step (``"skip"``: every gradient is dropped,
    so the optimizer leaves all parameters and its state as they were) when a gradient is
    nan/inf. Returns True when the step was skipped."""
    grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
    if not grads or bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()):
        return False
    name, value = next((n, p.grad) for n, p in pl_module.named_parameters()
                       if p.grad is not None and not bool(torch.isfinite(p.grad).all()))
    bad = value[~torch.isfinite(value)].flatten()[0].item()
    where = f"non-finite gradient of {name} ({bad}) at optimizer step {step}"
    if on_nonfinite == "skip":
        warnings.warn(f"{where}: step skipped (faults.on_nonfinite=skip)", stacklevel=3)
        optimizer.zero_grad(set_to_none=True)
        return True
    raise QuantizationFault(f"{where}; the loss or the model diverged. The run stops here and "
                            "the last checkpoint is intact (set faults.on_nonfinite=skip to "
                            "skip such steps)")


def check_quantizers(pl_module, step: int) -> None:
    """Every quantizer parameter finite and every step size positive, else
    :class:`QuantizationFault` naming the quantizer, the parameter, the value and ``step`` (the
    optimizer step that produced it)."""
    named = list(named_quantizers(pl_module))
    if not named:
        return
    values = torch.cat([p.detach().float().reshape(-1) for _, q in named for p in q.parameters()]
                       + [q.step_size.detach().float().reshape(-1) for _, q in named])
    steps = torch.cat([q.step_size.detach().float().reshape(-1) for _, q in named])
    if bool(torch.isfinite(values).all()) and bool((steps > 0).all()):
        return
    for name, q in named:
        for pname, p in [*q.named_parameters(), ("step_size", q.step_size)]:
            t = p.detach().float().reshape(-1)
            bad = ~torch.isfinite(t) | ((t <= 0) if pname in ("step", "step_size") else False)
            if bool(bad.any()):
                raise QuantizationFault(
                    f"quantizer {name}: parameter {pname} became {t[bad][0].item()} at "
                    f"optimizer step {step} (step sizes must be positive and finite); the run "
                    "stops here and the last checkpoint is intact. Lower the learning rate or "
                    "check the data")


__all__ = ["QuantizationFault", "check_gradients", "check_quantizers"]
