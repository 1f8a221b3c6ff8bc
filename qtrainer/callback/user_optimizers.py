"""``optimizer.policy: keep``: the user's optimizers and LR schedulers train the quantized module.

- The quantizer parameters of each layer leave the groups ``configure_optimizers`` put them in
  (it runs after surgery, so ``self.parameters()`` held them) and join the optimizer holding the
  layer's weight, in a group of their own next to the weight's group ``i``:
  ``qtrainer/quantizers/<i>``, weight decay ``weight_decay.quantizer_params``, and every
  learning-rate key of group ``i`` (``lr``, ``initial_lr``, OneCycleLR's ``max_lr``/``min_lr``)
  times the quantizer lr factor. A group holding only quantizer parameters is the user's own
  choice for them and is left as it is.
- Weight decay by precision: a quantized weight whose bit-width has a factor other than 1 moves
  to ``qtrainer/weights_<b>bit/<i>``, a copy of its group's options with ``factor x`` the
  group's weight decay.
- The user's groups keep their index; new groups are appended, and the per-group lists of the
  user's schedulers (``base_lrs``, ``lr_lambdas``, ``min_lrs``...) are extended to match, with
  the learning rates scaled like the group's. The structure depends only on the layer plan (the
  planned bits, not learned ones), so saved optimizer and scheduler states load on resume.
"""

from __future__ import annotations

import warnings
from collections import defaultdict

import torch

from ..nn import QuantizedLayer
from ..recipes import Recipe

GROUP_LR_KEYS = ("lr", "initial_lr", "max_lr", "min_lr")
SCHEDULER_LR_LISTS = ("base_lrs", "_last_lr", "min_lrs", "max_lrs")
SCHEDULER_COPIED_LISTS = ("lr_lambdas", "base_momentums", "max_momentums")


def _layers(pl_module) -> list[tuple[str, QuantizedLayer, list[torch.nn.Parameter]]]:
    out = []
    for name, m in pl_module.named_modules():
        if isinstance(m, QuantizedLayer):
            matmul = (getattr(m, "matmul_quantizers", None) or {}).values()
            params = [p for q in (m.weight_quantizer, m.input_quantizer, *matmul)
                      if q is not None for p in q.parameters()]
            out.append((name, m, params))
    return out


def _extend_scheduler(scheduler, n_old: int, added: list[tuple[int, float]]) -> None:
    """Extend a scheduler's per-group lists (length ``n_old``) by one entry per added group
    ``(origin group, lr factor)``; chained/sequential schedulers recursively."""
    for sub in getattr(scheduler, "_schedulers", None) or []:
        _extend_scheduler(sub, n_old, added)
    for attr in (*SCHEDULER_LR_LISTS, *SCHEDULER_COPIED_LISTS):
        values = getattr(scheduler, attr, None)
        if isinstance(values, list) and len(values) == n_old:
            scale = attr in SCHEDULER_LR_LISTS
            values.extend(values[i] * f if scale else values[i] for i, f in added)


def _quantizer_lr_factor(recipe: Recipe, optimizer, group: dict) -> float:
    spec = recipe.optimizer
    if spec.quantizer_lr is not None:
        return spec.quantizer_lr / float(group.get("initial_lr", group["lr"]))
    return spec.quantizer_factor(recipe.method.name, isinstance(optimizer, torch.optim.SGD))


def keep_user_optimizers(recipe: Recipe, pl_module, optimizers: list,
                         scheduler_configs: list) -> list[str]:
    """Regroup the user's ``optimizers`` in place as the module docstring says and extend the
    schedulers of ``scheduler_configs``. Returns phrases saying what changed."""
    layers = _layers(pl_module)
    quantizer_ids = {id(p) for _, _, params in layers for p in params}
    owner: dict[int, tuple[int, int]] = {}
    own_groups: set[tuple[int, int]] = set()  # the user's groups of quantizer parameters only
    for i, opt in enumerate(optimizers):
        for j, g in enumerate(opt.param_groups):
            ids = [id(p) for p in g["params"]]
            if ids and all(pid in quantizer_ids for pid in ids):
                own_groups.add((i, j))
            for pid in ids:
                owner.setdefault(pid, (i, j))
    if not optimizers:
        warnings.warn("the module has no optimizer: the quantizer parameters are not trained",
                      stacklevel=3)
        return ["no optimizer: quantizer parameters not trained"]

    wd = recipe.weight_decay
    moves: dict[tuple[int, int, str, int], list] = defaultdict(list)
    homeless = []
    for name, layer, params in layers:
        weights = layer.weight_parameters()
        home = owner.get(id(weights[0]))
        if home is None:
            homeless.append(name or type(layer).__name__)
            home = (0, 0)
        mine = [p for p in params if owner.get(id(p)) not in own_groups]
        if mine:
            moves[(*home, "quantizers", 0)] += mine
        bits = layer.qreport.weight_bits if layer.weight_quantizer is not None else None
        factor = wd.factors.get(bits, 1.0) if bits is not None else 1.0
        if id(weights[0]) in owner and factor != 1.0 and \
                optimizers[home[0]].param_groups[home[1]].get("weight_decay", 0.0):
            moves[(*home, "weights", bits)] += weights
    if homeless:
        warnings.warn(f"layers {', '.join(homeless[:5])}{', ...' if len(homeless) > 5 else ''}: "
                      "their weight is in no optimizer; their quantizer parameters join "
                      f"{type(optimizers[0]).__name__} (optimizer 0), group 0", stacklevel=3)

    moving = {id(p) for params in moves.values() for p in params}
    n_old = [len(opt.param_groups) for opt in optimizers]
    for opt in optimizers:
        for g in opt.param_groups:
            g["params"][:] = [p for p in g["params"] if id(p) not in moving]
    added: dict[int, list[tuple[int, float]]] = defaultdict(list)
    said = []
    for (i, j, kind, bits), params in sorted(moves.items(), key=lambda kv: kv[0]):
        opt = optimizers[i]
        origin = opt.param_groups[j]
        options = {k: v for k, v in origin.items() if k != "params"}
        if kind == "quantizers":
            factor = _quantizer_lr_factor(recipe, opt, origin)
            options.update({k: options[k] * factor for k in GROUP_LR_KEYS if k in options})
            options.update(weight_decay=wd.quantizer_params, name=f"qtrainer/quantizers/{j}")
            said.append(f"{len(params)} quantizer parameters into {type(opt).__name__} "
                        f"(optimizer {i}) group 'qtrainer/quantizers/{j}' with lr "
                        f"{float(options['lr']):g} ({factor:g} x the weights' "
                        f"{float(origin['lr']):g}), weight decay {wd.quantizer_params:g}")
        else:
            factor, decay = 1.0, origin["weight_decay"] * wd.factors[bits]
            options.update(weight_decay=decay, name=f"qtrainer/weights_{bits}bit/{j}")
            said.append(f"weight decay of {len(params)} {bits}-bit weights {wd.factors[bits]:g} x "
                        f"{origin['weight_decay']:g} (group 'qtrainer/weights_{bits}bit/{j}')")
        opt.add_param_group({**options, "params": params})
        added[i].append((j, factor))
    for config in scheduler_configs:
        for i, opt in enumerate(optimizers):
            if getattr(config.scheduler, "optimizer", None) is opt and added[i]:
                _extend_scheduler(config.scheduler, n_old[i], added[i])
    return said


def describe_optimizers(optimizers: list, scheduler_configs: list) -> str:
    """``Adam (lr 0.05) + StepLR``: the optimizers and their schedulers, for log lines."""
    parts = []
    for opt in optimizers:
        lrs = sorted({float(g["lr"]) for g in opt.param_groups if g["params"]})
        scheds = [type(c.scheduler).__name__ for c in scheduler_configs
                  if getattr(c.scheduler, "optimizer", None) is opt]
        text = f"{type(opt).__name__} (lr {', '.join(f'{lr:g}' for lr in lrs)})"
        parts.append(" + ".join([text, *scheds]))
    return "; ".join(parts) or "no optimizer"


__all__ = ["describe_optimizers", "keep_user_optimizers"]
