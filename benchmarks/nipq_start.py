"""Where a NIPQ run starts: validation top-1 of the FP model right after quantization, for each
``method.alpha_init`` (issue #12's diagnosis of the 2-bit gap).

For a run file (e.g. a CPU-preset row's ``run.yaml``, whose model loads the FP checkpoint),
the FP model is quantized by the run's recipe with ``alpha_init`` official and mse, the
quantizers initialized from the first training batch, BatchNorm re-estimated over
``--bn-batches`` training batches with hard quantization (what NIPQ's switch does), and the
hard-quantized model evaluated on the validation split in fp32. No training step is taken.

    python benchmarks/nipq_start.py runs/cpu/runs/nipq-w2a2-seed0/run.yaml
    python benchmarks/nipq_start.py RUN.yaml recipe.bits.weight=3 recipe.bits.activation=3
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # this checkout's qtrainer, whatever else is installed
    sys.path.insert(0, str(ROOT))


def start_accuracy(cfg, fp_model, batches: list, val, alpha_init: str) -> float:
    """Validation top-1 (%) of ``fp_model`` (left untouched) quantized by the run's recipe with
    ``alpha_init``, before any training step: quantizers initialized from the first of
    ``batches``, BatchNorm re-estimated over all of them with hard quantization, fp32."""
    import torch

    from qtrainer.bn import reestimate_batchnorm
    from qtrainer.recipes import load_recipe
    from qtrainer.surgery import initialize_quantizers, quantize_model, set_quantizers

    torch.manual_seed(cfg.seed)
    recipe = load_recipe(cfg.recipe, {"method.alpha_init": alpha_init})
    x0 = batches[0][0].float()
    model = copy.deepcopy(fp_model).float()
    quantize_model(model, **recipe.surgery_kwargs(), example_input=x0[:1])
    initialize_quantizers(model, x0)
    set_quantizers(model, hard=True)
    with torch.no_grad():
        reestimate_batchnorm(model, batches, lambda b: model(b[0].float()), len(batches))
        model.eval()
        right = total = 0
        for x, y in val:
            right += int((model(x.float()).argmax(1) == y).sum())
            total += len(y)
    return 100.0 * right / total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_file", help="a run file (e.g. a CPU-preset row's run.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the run file (key=value)")
    p.add_argument("--bn-batches", type=int, default=20, help="BatchNorm re-estimation batches")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args(argv)

    import torch

    from qtrainer.recipes.io import parse_overrides
    from qtrainer.run import load_run_file

    torch.set_num_threads(1)
    cfg = load_run_file(args.run_file, parse_overrides(args.overrides))
    out = {"run_file": args.run_file, "overrides": args.overrides,
           "bn_batches": args.bn_batches, "bits": f"W{cfg.recipe.bits.weight}"
           f"A{cfg.recipe.bits.activation}"}
    from qtrainer.run.runner import bundle_loaders, prepare

    bundle, fp_model = prepare(cfg)  # data and FP model once, for both inits
    train, val, _ = bundle_loaders(bundle, cfg.seed)
    batches = [b for _, b in zip(range(max(args.bn_batches, 1)), train)]
    for init in ("official", "mse"):
        out[f"val_acc_{init}"] = start_accuracy(cfg, fp_model, batches, val, init)
        print(f"alpha_init {init:8s}: validation top-1 at the start {out[f'val_acc_{init}']:.2f}%",
              flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
