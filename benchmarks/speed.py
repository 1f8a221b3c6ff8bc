#!/usr/bin/env python
"""Training-step cost of QAT with qtrainer against full precision, the textbook LSQ
formulation and torchao's QAT, measured in one run so the ratios share a machine, a model and
a batch.

Per model (ResNet-18 at 224 px and CIFAR ResNet-20 at 32 px by default) and mode (eager,
torch.compile, torch.compile with CUDA graphs), each variant trains on a fixed random batch:
``fp``; ``textbook_lsq`` (LSQ with the detach trick, every intermediate kept by autograd);
``torchao_qat`` (torchao's ``IntxFakeQuantizer``, dynamic scales, when torchao imports);
qtrainer's ``lsq_w4a4``, ``tempering_w4a4``, ``nipq_uniform_w4a4``, ``nipq_histogram_w4a4``
(first and last layer 8-bit, the recipes' default); and on the GPU two diagnostics,
``lsq_w4a4_no_recompute`` and ``lsq_w4a4_reference`` (``QTRAINER_FUSED=off``: torch formulas
and plain layers). Per variant: median time per step over interleaved rounds (CUDA events; on
a CPU with one thread, the thread's CPU time) and its ratio to ``fp``; aten operators per step;
Triton launches per step of the GPU path (counted through Triton's interpreter on CPU, any
device); bytes autograd saves in one forward and the CUDA peak, with their ratios to ``fp``.

``--check`` (default on CUDA) first compares the fused kernels on the device with the closed
forms (speed_checks.py), and ``--micro`` times one quantizer's forward + backward.

    python benchmarks/speed.py                                  # GPU: the full table
    taskset -c 0 python benchmarks/speed.py --device cpu --threads 1 --batch 128
    python benchmarks/speed.py --device cpu --quick             # anywhere, in seconds

Writes a JSON file (``--json``) with the configuration, the rows, the checks and the micro
timings, and prints a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed_lib import (MODELS, ROOT, VARIANTS, aten_ops, build, cleanup, clock_for,  # noqa: E402
                       count_launches, make_step, median, peak_mb, profile_step, saved_mb,
                       timed_rounds, torchao_available)

from qtrainer.nn import named_quantizers  # noqa: E402
from qtrainer.quantizers import kernels, ops  # noqa: E402

MODES = ("eager", "compile", "compile-cg")


def run_mode(name, mode, variants, args, device) -> list[dict]:
    """Every variant of one model and mode, timed in interleaved rounds."""
    size = args.size or MODELS[name]
    rows, steps = [], {}
    for variant in variants:
        row = {"model": name, "mode": mode, "variant": variant, "batch": args.batch, "size": size}
        rows.append(row)
        try:
            fused = VARIANTS[variant].get("fused", "auto")
            model = build(name, variant, device, size, args.channels_last)
            x = torch.randn(args.batch, 3, size, size, device=device)
            if args.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            y = torch.randint(0, 1000 if name == "resnet18" else 10, (args.batch,), device=device)
            row["quantizers"] = sum(1 for _ in named_quantizers(model))
            if mode == "eager":
                row["saved_mb"] = saved_mb(model, x, args.amp_dtype, fused)
            opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
            run_model = model
            if mode != "eager":
                kw = {"mode": "reduce-overhead"} if mode == "compile-cg" else {}
                run_model = torch.compile(model, backend=args.compile_backend, **kw)
            step = make_step(run_model, opt, x, y, args.amp_dtype, device, mode == "compile-cg",
                             fused)
            step()  # initialization, compilation
            row["aten_ops"] = aten_ops(step) if mode == "eager" else None
            row["peak_mb"] = peak_mb(step, device)
            steps[variant] = step
        except Exception as exc:  # keep the other rows
            row["error"] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
    warmup = args.warmup if mode == "eager" else max(args.warmup, 3)
    times = timed_rounds(steps, warmup, args.rounds, args.iters, device, args.clock)
    for row in rows:
        ts = times.get(row["variant"])
        if ts:
            ms = sorted(t * 1e3 for t in ts)
            row.update(ms_per_step=median(ms), ms_min=ms[0], ms_max=ms[-1], rounds=len(ms))
        if args.profile and mode == "eager" and row["variant"] in steps:
            row["profile"] = profile_step(steps[row["variant"]])
    steps.clear()
    cleanup(device)
    return rows


def add_ratios(rows, launches):
    for row in rows:
        fp = next((r for r in rows if r["model"] == row["model"] and r["mode"] == row["mode"]
                   and r["variant"] == "fp" and "ms_per_step" in r), None)
        for key in ("time_ratio_vs_fp", "saved_ratio_vs_fp", "peak_ratio_vs_fp"):
            row[key] = None
        count = launches.get(row["variant"], {})
        row["triton_launches"] = count.get("launches")
        if count.get("quantizers"):
            row["launches_per_quantizer"] = round(count["launches"] / count["quantizers"], 3)
        if fp is None or "ms_per_step" not in row:
            continue
        row["time_ratio_vs_fp"] = round(row["ms_per_step"] / fp["ms_per_step"], 4)
        for key, ratio in (("saved_mb", "saved_ratio_vs_fp"), ("peak_mb", "peak_ratio_vs_fp")):
            if row.get(key) is not None and fp.get(key):
                row[ratio] = round(row[key] / fp[key], 4)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="small batch and few rounds")
    p.add_argument("--models", help=f"comma list of {', '.join(MODELS)}")
    p.add_argument("--modes", help=f"comma list of {', '.join(MODES)}")
    p.add_argument("--variants", help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--batch", type=int)
    p.add_argument("--size", type=int, help="image size for every model (default per model)")
    p.add_argument("--warmup", type=int, help="untimed steps per variant")
    p.add_argument("--rounds", type=int, help="interleaved rounds (median reported)")
    p.add_argument("--iters", type=int, help="steps per variant and round")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--channels-last", dest="channels_last", action="store_true", default=None)
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--check", dest="check", action="store_true", default=None,
                   help="fused vs closed forms on the device first (default on CUDA)")
    p.add_argument("--no-check", dest="check", action="store_false")
    p.add_argument("--micro", dest="micro", action="store_true", default=True)
    p.add_argument("--no-micro", dest="micro", action="store_false")
    p.add_argument("--no-launches", dest="launches", action="store_false", default=True,
                   help="skip counting Triton launches through the interpreter")
    p.add_argument("--profile", action="store_true",
                   help="also profile three eager steps of each variant after its timing (top "
                        "operators by self CPU time)")
    p.add_argument("--check-only", action="store_true", help="run the device checks and stop")
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="combine earlier result files (rows, checks, micro) into --json")
    p.add_argument("--json", help="output file (default benchmarks/results/speed_<device>.json)")
    args = p.parse_args(argv)
    if args.merge:
        args.json = Path(args.json or ROOT / "benchmarks" / "results" / "speed_merged.json")
        return args
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA device is available (use --device cpu)")
    args.models = (args.models or ("resnet18,resnet20" if cuda else "resnet20")).split(",")
    args.modes = (args.modes or (",".join(MODES) if cuda else "eager")).split(",")
    default = [v for v in VARIANTS if cuda or v not in ("lsq_w4a4_no_recompute",
                                                        "lsq_w4a4_reference")]
    args.variants = args.variants.split(",") if args.variants else default
    for value, known, what in ((args.models, MODELS, "model"), (args.modes, MODES, "mode"),
                               (args.variants, VARIANTS, "variant")):
        bad = [v for v in value if v not in known]
        if bad:
            p.error(f"unknown {what} {bad}; known: {', '.join(known)}")
    args.skipped = {}
    if "torchao_qat" in args.variants and not torchao_available():
        args.variants.remove("torchao_qat")
        args.skipped["torchao_qat"] = "torchao is not importable"
    if "fp" not in args.variants:
        args.variants.insert(0, "fp")
    if args.batch is None:
        args.batch = 256 if cuda else (4 if args.quick else 32)
    if args.warmup is None:
        args.warmup = (5 if args.quick else 10) if cuda else 1
    if args.rounds is None:
        args.rounds = (3 if args.quick else 10) if cuda else (2 if args.quick else 5)
    if args.iters is None:
        args.iters = 3 if cuda else 1
    dtype = args.dtype or ("bf16" if cuda else "fp32")
    args.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[dtype]
    if args.channels_last is None:
        args.channels_last = cuda
    if args.check is None or args.check_only:
        args.check = cuda or args.check_only
    args.json = Path(args.json or ROOT / "benchmarks" / "results" /
                     f"speed_{args.device.split(':')[0]}.json")
    return args


def config(args, device):
    cfg = {"device": device.type, "torch": torch.__version__, "python": platform.python_version(),
           "triton": None, "gpu": None, "cpu": platform.processor() or platform.machine(),
           "batch": args.batch, "size": args.size, "models": args.models, "modes": args.modes,
           "variants": args.variants, "skipped": args.skipped,
           "dtype": str(args.amp_dtype or torch.float32)[6:], "channels_last": args.channels_last,
           "warmup": args.warmup, "rounds": args.rounds, "iters": args.iters,
           "clock": args.clock.__name__, "compile_backend": args.compile_backend,
           "fused": ops.get_options(), "quick": args.quick, "threads": torch.get_num_threads(),
           "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}
    if kernels.available():
        import triton

        cfg["triton"] = triton.__version__
    if device.type == "cuda":
        cfg["gpu"] = torch.cuda.get_device_name(device)
    return cfg


def print_table(rows):
    head = (f"{'model':<9} {'mode':<10} {'variant':<22} {'ms/step':>8} {'x FP':>6} "
            f"{'aten ops':>8} {'launch':>6} {'/quant':>6} {'saved MiB':>9} {'x FP':>5} "
            f"{'peak MiB':>8} {'x FP':>5}")
    print(head)
    print("-" * len(head))

    def fmt(v, f):
        return "-" if v is None else format(v, f)

    for r in rows:
        if "error" in r:
            print(f"{r['model']:<9} {r['mode']:<10} {r['variant']:<22} ERROR {r['error'][:60]}")
            continue
        print(f"{r['model']:<9} {r['mode']:<10} {r['variant']:<22} "
              f"{fmt(r.get('ms_per_step'), '8.1f')} {fmt(r.get('time_ratio_vs_fp'), '6.3f')} "
              f"{fmt(r.get('aten_ops'), '8d')} {fmt(r.get('triton_launches'), '6d')} "
              f"{fmt(r.get('launches_per_quantizer'), '6.2f')} "
              f"{fmt(r.get('saved_mb'), '9.1f')} {fmt(r.get('saved_ratio_vs_fp'), '5.2f')} "
              f"{fmt(r.get('peak_mb'), '8.0f')} {fmt(r.get('peak_ratio_vs_fp'), '5.2f')}")


def merge(args) -> int:
    """One result from several runs (e.g. one per model and mode, to fit time limits); the
    ratios stay those measured within each run."""
    parts = [json.loads(Path(f).read_text()) for f in args.merge]
    result = {"config": [p["config"] for p in parts], "check": [], "rows": [], "micro": [],
              "launches": {}}
    for part in parts:
        result["check"].extend(part.get("check") or [])
        result["rows"].extend(part.get("rows") or [])
        result["micro"].extend(part.get("micro") or [])
        result["launches"].update(part.get("launches") or {})
    print_table(result["rows"])
    bad = [c for c in result["check"] if not c["ok"]]
    print(f"\ncheck: {len(result['check']) - len(bad)}/{len(result['check'])} passed")
    _write(args, result)
    return 1 if bad else 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.merge:
        return merge(args)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.clock = clock_for(device, torch.get_num_threads())
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    result = {"config": config(args, device), "check": None, "rows": [], "micro": None,
              "launches": {}}
    failed = False
    if args.check:
        from speed_checks import run_checks

        checks = run_checks(device, big=not args.quick)
        result["check"] = checks
        bad = [c for c in checks if not c["ok"]]
        failed = bool(bad)
        print(f"check: {len(checks) - len(bad)}/{len(checks)} passed"
              + "".join(f"\n  FAIL {c}" for c in bad), flush=True)
        if args.check_only:
            _write(args, result)
            return 1 if failed else 0
    if args.launches:
        result["launches"] = count_launches(args.variants) if kernels.available() else {
            "error": "triton is not installed"}
    for name in args.models:
        for mode in args.modes:
            rows = run_mode(name, mode, args.variants, args, device)
            result["rows"].extend(rows)
            for row in rows:
                print(f"  {name} {mode} {row['variant']}: "
                      + (row["error"] if "error" in row else
                         f"{row.get('ms_per_step', float('nan')):.2f} ms/step"), flush=True)
    add_ratios(result["rows"], result["launches"])
    for row in result["rows"]:  # the eager steps' profiles, by model and variant
        if "profile" in row:
            result.setdefault("profile", {}).setdefault(row["model"], {})[row["variant"]] = \
                row.pop("profile")
    if args.micro:
        from speed_checks import run_micro

        result["micro"] = run_micro(device, args)
    print()
    print_table(result["rows"])
    for variant, why in args.skipped.items():
        print(f"  {variant}: skipped ({why})")
    if result["micro"]:
        print("\none quantizer, forward + backward (x textbook LSQ):")
        for r in result["micro"]:
            print(f"  {r['case']:<22} " + (r["error"] if "error" in r else
                                            f"{r['ratio_vs_textbook']:.3f}"))
    for name, variants in (result.get("profile") or {}).items():
        for variant, ops_ in variants.items():
            print(f"\nprofile {name} {variant} (share of self CPU time, calls per step):")
            for r in ops_:
                print(f"  {r['op'][:48]:<48} {100 * r['share']:5.1f}%  {r['calls_per_step']:g}")
    _write(args, result)
    return 1 if failed or any("error" in r for r in result["rows"]) else 0


def _write(args, result):
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    sys.exit(main())
