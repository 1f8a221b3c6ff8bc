"""What the callback adds to the user's module instance: the mixed-precision resource loss on
what ``training_step`` returns, and quantization by a checkpoint's saved layer plan right
before Lightning loads that checkpoint into a module not yet quantized (a ``validate``, ``test``
or ``predict`` with ``ckpt_path``), removed again when the stage ends."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from ..nn import QuantizedLayer
from ..quantized import QAT_ENTRY, quantize_as_saved
from ..recipes import MixedPrecision
from ..resources import resource_loss


def add_resource_loss(pl_module, mp: MixedPrecision, active: Callable[[], bool]) -> None:
    """Wrap ``pl_module.training_step`` (once) to add the resource loss of ``mp`` to the loss it
    returns (a tensor, or a mapping's ``"loss"``) while ``active()``; logged as
    ``qat/resource_loss``."""
    if getattr(pl_module, "_qtrainer_step_wrapped", False):
        return
    original = pl_module.training_step

    def training_step(*args, **kwargs):
        out = original(*args, **kwargs)
        if out is None or not active():
            return out
        loss = resource_loss(pl_module, mp.target, mp.value, mp.w_scale, mp.a_scale,
                             mp.bops_scale, form=mp.loss).squeeze()
        pl_module.log("qat/resource_loss", loss.detach(), on_step=True, on_epoch=True)
        if isinstance(out, Mapping):
            return {**out, "loss": out["loss"] + loss}
        return out + loss

    pl_module.training_step = training_step
    pl_module._qtrainer_step_wrapped = True


def quantize_on_restore(pl_module, quantized: Callable[[list], None]) -> Callable[[], None]:
    """Make ``pl_module.on_load_checkpoint`` first quantize the module by the checkpoint's
    saved plan (when it has one and the module is not quantized), then call ``quantized(report)``
    and the module's own hook. Returns the function that removes this again."""
    previous = vars(pl_module).get("on_load_checkpoint")
    original = pl_module.on_load_checkpoint

    def on_load_checkpoint(checkpoint):
        entry = checkpoint.get(QAT_ENTRY)
        if isinstance(entry, Mapping) and "plan" in entry \
                and not any(isinstance(m, QuantizedLayer) for m in pl_module.modules()):
            quantized(quantize_as_saved(pl_module, entry))
        return original(checkpoint)

    def remove() -> None:
        if vars(pl_module).get("on_load_checkpoint") is on_load_checkpoint:
            del pl_module.on_load_checkpoint
            if previous is not None:
                pl_module.on_load_checkpoint = previous

    pl_module.on_load_checkpoint = on_load_checkpoint
    return remove


__all__ = ["add_resource_loss", "quantize_on_restore"]
