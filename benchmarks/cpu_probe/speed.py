"""Step time (forward+backward+SGD step, batch B) of candidate models on this CPU, variants
interleaved in one process: fp32 vs bf16 autocast, contiguous vs channels_last; optionally QAT
(qtrainer.quantize_model) variants.

    taskset -c 1 python speed.py --threads 1 --models resnet20,resnet9:16 --rounds 5
    taskset -c 1 python speed.py --threads 1 --models resnet9:16 --qat
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from nets import build, describe  # noqa: E402


def parse_model(text: str):
    name, _, rest = text.partition(":")
    kw = {}
    if rest:
        for part in rest.split("/"):
            if "=" in part:
                k, v = part.split("=")
                kw[k] = {"False": False, "True": True}.get(v, int(v) if v.isdigit() else v)
            else:
                kw["width"] = int(part)
    return name, kw


def make_step(model, opt, bf16: bool, cl: bool, teacher=None):
    def step(x, y):
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(x)
            loss = F.cross_entropy(out.float(), y)
            if teacher is not None:
                with torch.no_grad():
                    t = teacher(x)
                loss = loss + F.cross_entropy(out.float(), F.softmax(t.float(), 1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--models", default="resnet20,small_cnn:32,small_cnn:64,resnet9:16")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--variants", default="fp32,fp32-cl,bf16,bf16-cl")
    ap.add_argument("--qat", default="", help="comma list: lsq,tempering,nipq,nipq-uniform,lsq-kd,...")
    ap.add_argument("--qat-dtype", default="fp32", help="fp32 | bf16 | fp32-cl ...")
    ap.add_argument("--bits", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch,))
    steps = {}
    for text in args.models.split(","):
        name, kw = parse_model(text)
        base = build(name, **kw)
        print(f"{text}: {describe(base)}", flush=True)
        for v in args.variants.split(",") if args.variants else []:
            m = copy.deepcopy(base)
            if "cl" in v:
                m = m.to(memory_format=torch.channels_last)
            opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
            steps[f"{text} {v}"] = make_step(m, opt, v.startswith("bf16"), "cl" in v)
        for q in [s for s in args.qat.split(",") if s]:
            import qtrainer

            m = copy.deepcopy(base)
            method, _, opt_ = q.partition("-")
            mk = {}
            if method == "nipq":
                mk = {"noise": "uniform" if opt_ == "uniform" else "histogram"}
            qtrainer.quantize_model(m, method=method, weight_bits=args.bits, act_bits=args.bits,
                                    first_last_bits=8, method_kwargs=mk,
                                    example_input=x[:8])
            qtrainer.initialize_quantizers(m, x)
            teacher = copy.deepcopy(base).eval() if opt_ == "kd" else None
            cl = "cl" in args.qat_dtype
            if cl:
                m = m.to(memory_format=torch.channels_last)
                if teacher is not None:
                    teacher = teacher.to(memory_format=torch.channels_last)
            opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
            steps[f"{text} {q} {args.qat_dtype}"] = make_step(m, opt, args.qat_dtype.startswith("bf16"), cl, teacher)
    for s in steps.values():  # warm-up
        s(x, y); s(x, y)
    times = {k: [] for k in steps}
    for _ in range(args.rounds):
        for k, s in steps.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                s(x, y)
            times[k].append((time.perf_counter() - t0) / args.steps)
    print(f"threads={args.threads} batch={args.batch}: median ms/step (min)")
    for k, ts in times.items():
        print(f"  {k:40s} {1000 * statistics.median(ts):8.1f}  ({1000 * min(ts):.1f})")


if __name__ == "__main__":
    main()
