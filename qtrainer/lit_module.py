"""The generic classification LightningModule that :class:`qtrainer.QTrainer` wraps a plain
``nn.Module`` in.

- loss: softmax cross-entropy (optionally label-smoothed), plus, with a teacher, knowledge
  distillation: ``CE(student, y) + weight * soft_CE(student / T, teacher / T)`` where
  ``soft_CE(s, t) = mean_batch(-sum_k softmax(t)_k * log_softmax(s)_k)`` (no ``T^2`` factor, as
  in NIPQ's official ``CrossEntropyLossSoft``; with ``T = 1`` it does not matter);
- metrics: top-1 and top-5 accuracy (torchmetrics, micro-averaged), logged as
  ``train_loss``/``train_acc``, ``val_loss``/``val_acc``/``val_acc_top5`` and
  ``test_loss``/``test_acc``/``test_acc_top5`` (epoch means);
- optimizer: the ``optimizer`` mapping (SGD or AdamW, cosine or constant schedule per step with
  an optional linear warm-up). Under ``QTrainer`` a QAT recipe with ``optimizer.policy: auto``
  (every built-in one) or ``replace`` replaces it with the recipe's optimizer; ``keep`` keeps
  this one.

The teacher is held outside the module tree (not a submodule), so model surgery never quantizes
it, the optimizer never sees it and checkpoints do not store it; it is moved to the module's
device on first use and always runs in eval mode without gradients.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

DEFAULT_OPTIMIZER = {"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": False,
                     "weight_decay": 5e-4, "schedule": "cosine", "warmup_epochs": 0}


def soft_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                       temperature: float = 1.0) -> torch.Tensor:
    """``mean_batch(-sum_k softmax(teacher / T)_k * log_softmax(student / T)_k)``; the teacher's
    probabilities are detached."""
    target = F.softmax(teacher_logits.detach().float() / temperature, dim=-1)
    log_p = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return -(target * log_p).sum(-1).mean()


def distillation_loss(student_logits: torch.Tensor, labels: torch.Tensor,
                      teacher_logits: torch.Tensor, temperature: float = 1.0,
                      weight: float = 1.0) -> torch.Tensor:
    """``CE(student, labels) + weight * soft_cross_entropy(student, teacher, T)``."""
    return (F.cross_entropy(student_logits.float(), labels)
            + weight * soft_cross_entropy(student_logits, teacher_logits, temperature))


def _split(batch) -> tuple[Any, torch.Tensor]:
    if isinstance(batch, Mapping):
        for xk in ("input", "inputs", "x", "image"):
            if xk in batch:
                for yk in ("target", "targets", "label", "labels", "y"):
                    if yk in batch:
                        return batch[xk], batch[yk]
        raise ValueError(f"cannot find input and label in a batch with keys {sorted(batch)}")
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise ValueError(f"a classification batch must be (input, label), got {type(batch).__name__}")


class ClassificationModule(pl.LightningModule):
    """Cross-entropy classification of ``model`` with top-1/top-5 accuracy and optional
    distillation.

    Args:
        model: any ``nn.Module`` mapping an input batch to logits ``N x num_classes``.
        num_classes: number of classes (for the accuracy metrics).
        optimizer: ``name`` (sgd | adamw), ``lr``, ``momentum``, ``nesterov``,
            ``weight_decay``, ``schedule`` (cosine | constant), ``warmup_epochs``; missing keys
            take :data:`DEFAULT_OPTIMIZER`'s values.
        teacher: a frozen full-precision model for distillation (None: no distillation).
        distill_temperature, distill_weight: ``T`` and the weight of the soft term.
        label_smoothing: of the cross-entropy term.
        example_input: an input batch; becomes ``example_input_array`` (what the QAT
            callback traces the layers with).
        eval_fp32: run validation, test and predict steps with autocast off, i.e. in fp32
            when training under a mixed precision (``bf16-mixed``, ``16-mixed``): the weights
            are fp32 there, so evaluation is exactly the fp32 model's.
    """

    def __init__(self, model: nn.Module, num_classes: int, optimizer: Mapping | None = None,
                 teacher: nn.Module | None = None, distill_temperature: float = 1.0,
                 distill_weight: float = 1.0, label_smoothing: float = 0.0,
                 example_input: torch.Tensor | None = None, eval_fp32: bool = False):
        super().__init__()
        self.eval_fp32 = bool(eval_fp32)
        self.model = model
        self.num_classes = int(num_classes)
        self.optimizer_config = {**DEFAULT_OPTIMIZER, **dict(optimizer or {})}
        self.distill_temperature = float(distill_temperature)
        self.distill_weight = float(distill_weight)
        self.label_smoothing = float(label_smoothing)
        self._teacher = [teacher] if teacher is not None else []  # a list: not a submodule
        if teacher is not None:
            teacher.eval().requires_grad_(False)
        if example_input is not None:
            self.example_input_array = example_input
        top5 = min(5, self.num_classes)
        for stage in ("train", "val", "test"):
            setattr(self, f"{stage}_top1", MulticlassAccuracy(self.num_classes, top_k=1,
                                                              average="micro"))
        self.val_top5 = MulticlassAccuracy(self.num_classes, top_k=top5, average="micro")
        self.test_top5 = MulticlassAccuracy(self.num_classes, top_k=top5, average="micro")

    # ------------------------------------------------------------------ teacher
    @property
    def teacher(self) -> nn.Module | None:
        return self._teacher[0] if self._teacher else None

    def set_teacher(self, teacher: nn.Module | None) -> None:
        self._teacher = [teacher.eval().requires_grad_(False)] if teacher is not None else []

    def _teacher_logits(self, x) -> torch.Tensor:
        teacher = self._teacher[0]
        if next(teacher.parameters()).device != self.device:
            teacher.to(self.device)
        teacher.eval()
        with torch.no_grad():
            return teacher(x)

    # ------------------------------------------------------------------ steps
    def forward(self, x):
        return self.model(x)

    def loss(self, logits: torch.Tensor, y: torch.Tensor, x=None) -> torch.Tensor:
        """The training loss of one batch (distillation included when a teacher is set)."""
        ce = F.cross_entropy(logits.float(), y, label_smoothing=self.label_smoothing)
        if not self._teacher:
            return ce
        soft = soft_cross_entropy(logits, self._teacher_logits(x), self.distill_temperature)
        self.log("train_distill_loss", soft.detach(), on_step=False, on_epoch=True)
        return ce + self.distill_weight * soft

    def training_step(self, batch, batch_idx):
        x, y = _split(batch)
        logits = self(x)
        loss = self.loss(logits, y, x)
        self.train_top1(logits.detach(), y)
        self.log("train_loss", loss.detach(), on_step=True, on_epoch=True, prog_bar=True)
        self.log("train_acc", self.train_top1, on_step=False, on_epoch=True)
        return loss

    def _eval_forward(self, x) -> torch.Tensor:
        if not self.eval_fp32:
            return self(x)
        with torch.autocast(self.device.type, enabled=False):
            return self(x)

    def _eval_step(self, batch, stage: str):
        x, y = _split(batch)
        logits = self._eval_forward(x)
        loss = F.cross_entropy(logits.float(), y)
        getattr(self, f"{stage}_top1")(logits, y)
        getattr(self, f"{stage}_top5")(logits, y)
        self.log(f"{stage}_loss", loss, on_epoch=True, prog_bar=False)
        self.log(f"{stage}_acc", getattr(self, f"{stage}_top1"), on_epoch=True, prog_bar=True)
        self.log(f"{stage}_acc_top5", getattr(self, f"{stage}_top5"), on_epoch=True)

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, "test")

    def predict_step(self, batch, batch_idx):
        x = _split(batch)[0] if isinstance(batch, (tuple, list, Mapping)) else batch
        return self._eval_forward(x)

    # ------------------------------------------------------------------ optimizer
    def configure_optimizers(self):
        cfg = self.optimizer_config
        decay, no_decay = [], []
        for p in self.parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 else decay).append(p)
        groups = [{"params": decay, "weight_decay": cfg["weight_decay"]},
                  {"params": no_decay, "weight_decay": 0.0}]
        if cfg["name"] == "sgd":
            opt = torch.optim.SGD(groups, lr=cfg["lr"], momentum=cfg["momentum"],
                                  nesterov=bool(cfg["nesterov"]) and cfg["momentum"] > 0)
        elif cfg["name"] == "adamw":
            opt = torch.optim.AdamW(groups, lr=cfg["lr"])
        else:
            raise ValueError(f"optimizer name {cfg['name']!r}; allowed: sgd, adamw")
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        epochs = max(int(self.trainer.max_epochs or 1), 1)
        warmup = round(cfg.get("warmup_epochs", 0) * total / epochs)
        cosine = cfg["schedule"] == "cosine"

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            if not cosine:
                return 1.0
            t = min((step - warmup) / max(total - warmup, 1), 1.0)
            return 0.5 * (1 + math.cos(math.pi * t))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


__all__ = ["ClassificationModule", "DEFAULT_OPTIMIZER", "distillation_loss", "soft_cross_entropy"]
