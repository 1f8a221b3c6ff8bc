"""Rebuilding a run's model from one of its checkpoints (``qtrainer eval``/``export``)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..checkpoint_io import check_checkpoint_digest
from ..lit_module import ClassificationModule
from ..models import load_error_reason
from .runfile import RunConfig
from .runner import prepare


def find_run_file(ckpt: str | os.PathLike) -> Path:
    """The ``run.yaml`` of the run a checkpoint belongs to: in the checkpoint's folder or up to
    three folders above it."""
    here = Path(ckpt).resolve().parent
    for folder in [here, *list(here.parents)[:3]]:
        if (folder / "run.yaml").is_file():
            return folder / "run.yaml"
    raise FileNotFoundError(f"no run.yaml next to or above {ckpt}; pass --run-file")


def load_checkpoint_model(ckpt: str | os.PathLike, cfg: RunConfig):
    """Rebuild a run's model from a checkpoint: a QAT checkpoint gives the quantized model
    (surgery per the run's recipe, then the weights and quantizer parameters), a plain state
    dict such as ``fp.ckpt`` the FP model. Returns ``(module, bundle, quantized)``."""
    from ..surgery import quantize_model

    path = Path(ckpt)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {ckpt} does not exist")
    bundle, model = prepare(RunConfig(**{**cfg.__dict__, "model": {
        k: v for k, v in cfg.model.items() if k != "checkpoint"}}))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"could not read checkpoint {ckpt} (truncated, damaged or not a "
                         f"checkpoint of weights): {load_error_reason(e)}") from None
    check_checkpoint_digest(state, ckpt)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {ckpt} holds no state dict")
    quantized = any(".weight_quantizer." in k or ".input_quantizer." in k for k in state)
    module = ClassificationModule(model, bundle.num_classes, example_input=bundle.example_input,
                                  eval_fp32=cfg.eval_precision == "32-true")
    if quantized:
        quantize_model(module, **cfg.recipe.surgery_kwargs(), example_input=bundle.example_input)
    if not any(k.startswith("model.") for k in state):
        state = {f"model.{k}": v for k, v in state.items()}
    missing, unexpected = module.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(("train_", "val_", "test_"))]
    if missing or unexpected:
        raise ValueError(f"checkpoint {ckpt} does not match the run's model: missing "
                         f"{missing[:5]}, unexpected {unexpected[:5]}")
    return module, bundle, quantized


__all__ = ["find_run_file", "load_checkpoint_model"]
