#!/usr/bin/env python
"""Training-step time and memory of QAT with qtrainer, against full precision and the textbook
LSQ formulation, measured in one run so the ratios share a machine, a model and a batch.

Per model (ResNet-18 at 224 px and CIFAR ResNet-20 at 32 px by default) and mode (eager,
torch.compile, torch.compile with CUDA graphs), each variant trains on a fixed random batch:
``fp``; ``textbook_lsq`` (LSQ with the detach trick, every intermediate kept by autograd);
qtrainer's ``lsq_w4a4``, ``tempering_w4a4``, ``nipq_uniform_w4a4``, ``nipq_histogram_w4a4``
(first and last layer 8-bit, the recipes' default); and two diagnostics, ``lsq_w4a4_no_recompute``
(fused kernels, plain layers) and ``lsq_w4a4_reference`` (the pure-torch closed form). Reported:
median ms per step (CUDA events, after warm-up), peak allocated memory (CUDA), the bytes autograd
saves in one forward, and both as ratios to ``fp`` of the same model and mode.

``--check`` (default on CUDA) first compares the fused kernels with the reference quantizers on
the device (forward bit-identical, grad_x exact, parameter gradients within relative 1e-5 of
fp64), and ``--micro`` times one quantizer's forward + backward on one activation tensor
(histogram noise measured there separately too).

    python benchmarks/speed.py                          # GPU: the full table
    python benchmarks/speed.py --device cpu --quick     # anywhere, in seconds

Writes a JSON file (``--json``) with the configuration, the rows, the checks and the micro
timings, and prints a table.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from qtrainer.models import resnet20  # noqa: E402
from qtrainer.nn import QuantizedLayer, named_quantizers  # noqa: E402
from qtrainer.quantizers import (LSQFunction, LSQQuantizer, NIPQQuantizer,  # noqa: E402
                                 TemperingQuantizer, kernels, ops)
from qtrainer.recompute import set_recompute  # noqa: E402
from qtrainer.surgery import initialize_quantizers, quantize_model  # noqa: E402

VARIANTS = {
    "fp": {},
    "textbook_lsq": {"method": "lsq", "textbook": True},
    "lsq_w4a4": {"method": "lsq"},
    "tempering_w4a4": {"method": "tempering"},
    "nipq_uniform_w4a4": {"method": "nipq", "kwargs": {"noise": "uniform"}},
    "nipq_histogram_w4a4": {"method": "nipq", "kwargs": {"noise": "histogram"}},
    "lsq_w4a4_no_recompute": {"method": "lsq", "recompute": False},
    "lsq_w4a4_reference": {"method": "lsq", "fused": "off"},
}
MODELS = {"resnet18": 224, "resnet20": 32}
MODES = ("eager", "compile", "compile-cg")


# -- the textbook formulation ----------------------------------------------------------------

def _grad_scale(s, g):
    return (s - s * g).detach() + s * g


def _round_pass(v):
    return (v.round() - v).detach() + v


class TextbookLSQ(nn.Module):
    """LSQ as in the paper's appendix code: gradient scale and STE by the detach trick."""

    def __init__(self, q: LSQQuantizer):
        super().__init__()
        self.step = q.step
        self.q_n, self.q_p = q.levels
        self.per_channel = q.per_channel

    def forward(self, x):
        n = x.numel() // (x.shape[0] if self.per_channel else 1)
        s = _grad_scale(self.step, 1.0 / math.sqrt(n * self.q_p))
        if self.per_channel:
            s = s.view(-1, *([1] * (x.dim() - 1)))
        return _round_pass(torch.clamp(x / s, -self.q_n, self.q_p)) * s


# -- models and steps ------------------------------------------------------------------------

def make_model(name: str, num_classes: int) -> nn.Module:
    if name == "resnet20":
        return resnet20(num_classes=num_classes)
    if name == "resnet18":
        import torchvision

        return torchvision.models.resnet18(num_classes=num_classes)
    raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")


def build(name, variant, device, size, channels_last):
    torch.manual_seed(0)
    spec = VARIANTS[variant]
    model = make_model(name, 1000 if name == "resnet18" else 10).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if spec.get("method"):
        example = torch.randn(2, 3, size, size, device=device)
        if channels_last:
            example = example.contiguous(memory_format=torch.channels_last)
        quantize_model(model, method=spec["method"], weight_bits=4, act_bits=4,
                       method_kwargs=spec.get("kwargs"), example_input=example)
        initialize_quantizers(model, example)
        if spec.get("textbook"):
            for layer in model.modules():
                if isinstance(layer, QuantizedLayer):
                    layer.recompute = False
                    for attr in ("weight_quantizer", "input_quantizer"):
                        q = getattr(layer, attr)
                        if q is not None:
                            setattr(layer, attr, TextbookLSQ(q))
        if "recompute" in spec:
            set_recompute(model, spec["recompute"])
    model.train()
    return model


def make_step(model, opt, x, y, amp_dtype, device, cudagraphs):
    def step():
        if cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                            enabled=amp_dtype is not None):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
    return step


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(step, warmup, iters, device):
    """Median ms per call after ``warmup`` calls, and the peak memory of the timed calls."""
    for _ in range(warmup):
        step()
    sync(device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(iters)]
        for start, end in events:
            start.record()
            step()
            end.record()
        torch.cuda.synchronize()
        times = [start.elapsed_time(end) for start, end in events]
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
        peak = None
    return statistics.median(times), peak, times


def saved_mb(model, x, amp_dtype, device) -> float:
    """MiB of distinct storages autograd keeps for one forward (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                            enabled=amp_dtype is not None):
            out = model(x)
    del out
    return sum(seen.values()) / 2**20


def cleanup(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_variant(name, mode, variant, args, device):
    spec = VARIANTS[variant]
    size = args.size or MODELS[name]
    row = {"model": name, "mode": mode, "variant": variant, "batch": args.batch, "size": size}
    old = ops.get_options()
    try:
        ops.set_fused(spec.get("fused", "auto"))
        model = build(name, variant, device, size, args.channels_last)
        x = torch.randn(args.batch, 3, size, size, device=device)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 1000 if name == "resnet18" else 10, (args.batch,), device=device)
        row["saved_mb"] = saved_mb(model, x, args.amp_dtype, device) if mode == "eager" else None
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        run_model = model
        warmup = args.warmup
        if mode != "eager":
            torch._dynamo.reset()
            kw = {"mode": "reduce-overhead"} if mode == "compile-cg" else {}
            run_model = torch.compile(model, backend=args.compile_backend, **kw)
            warmup = max(warmup, 3)
        step = make_step(run_model, opt, x, y, args.amp_dtype, device, mode == "compile-cg")
        t0 = time.perf_counter()
        ms, peak, times = timed(step, warmup, args.iters, device)
        row.update(ms_per_step=ms, ms_p10=_pct(times, 10), ms_p90=_pct(times, 90),
                   peak_mb=peak, wall_s=time.perf_counter() - t0,
                   quantizers=sum(1 for _ in named_quantizers(model)))
    except Exception as exc:  # keep the other rows
        row["error"] = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    finally:
        ops.set_fused(old["fused"])
        model = run_model = opt = step = None
        cleanup(device)
    return row


def _pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def add_ratios(rows):
    for row in rows:
        fp = next((r for r in rows if r["model"] == row["model"] and r["mode"] == row["mode"]
                   and r["variant"] == "fp" and "error" not in r), None)
        row["time_ratio_vs_fp"] = row["mem_ratio_vs_fp"] = row["mem_basis"] = None
        if fp is None or "error" in row:
            continue
        row["time_ratio_vs_fp"] = round(row["ms_per_step"] / fp["ms_per_step"], 4)
        if row.get("peak_mb") and fp.get("peak_mb"):
            row["mem_ratio_vs_fp"] = round(row["peak_mb"] / fp["peak_mb"], 4)
            row["mem_basis"] = "cuda_peak_allocated"
        elif row.get("saved_mb") is not None and fp.get("saved_mb"):
            row["mem_ratio_vs_fp"] = round(row["saved_mb"] / fp["saved_mb"], 4)
            row["mem_basis"] = "saved_tensors"


# -- correctness on the device ---------------------------------------------------------------

def _same_bits(a, b):
    view = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.contiguous().view(view[a.dtype]), b.contiguous().view(view[b.dtype])))


def _close64(got, ref, l1, rel=1e-5):
    got, ref, l1 = (t.double().reshape(-1).cpu() for t in (got, ref, l1))
    err = (got - ref).abs()
    ok = bool((err <= rel * ref.abs() + 3e-8 * l1 + 1e-12).all())
    return ok, float((err / ref.abs().clamp(min=1e-30)).max())


def _fwd_bwd(module, x, w, fused, seed=0):
    for p in module.parameters():
        p.grad = None
    x = x.detach().clone().requires_grad_(True)
    with ops.options(fused=fused):
        torch.manual_seed(seed)
        y = module(x)
        (y.float() * w).sum().backward()
    return y.detach(), x.grad, {n: p.grad.clone() for n, p in module.named_parameters()
                                if p.grad is not None}


def run_checks(device, big: bool) -> list[dict]:
    """Fused (Triton on CUDA) against the reference quantizers on ``device``."""
    out = []

    def record(name, ok, **detail):
        out.append({"name": name, "ok": bool(ok), **detail})

    gen = torch.Generator(device="cpu").manual_seed(0)
    # LSQ sweep
    for bits in (2, 4, 8):
        for signed in (True, False):
            for per_channel in (False, True):
                for dtype in (torch.float32, torch.bfloat16):
                    for cl in (False, True):
                        q = LSQQuantizer(bits, signed, per_channel=per_channel,
                                         channels=8 if per_channel else None).to(device)
                        q_n, q_p = q.levels
                        q.step.data.copy_(torch.linspace(0.2, 0.5, 8 if per_channel else 1))
                        q._mark_initialized()
                        x = torch.randn(8, 16, 17, 17, generator=gen) * 0.4 * q_p
                        x = x.to(device, dtype)
                        if cl:
                            x = x.contiguous(memory_format=torch.channels_last)
                        w = torch.randn(x.shape, generator=gen).to(device)
                        y0, gx0, _ = _fwd_bwd(q, x, w, "off")
                        y1, gx1, g1 = _fwd_bwd(q, x, w, "on")
                        s = q._step_view(x.float()).detach()
                        r = x.float() / s
                        inside = (r > -q_n) & (r < q_p)
                        term = torch.where(inside, torch.round(r) - r,
                                           torch.where(r <= -q_n, float(-q_n), float(q_p)))
                        prod = (w.to(dtype).double() * term.double()).reshape(
                            8 if per_channel else 1, -1) * q.grad_scale_value(x)
                        ok, err = _close64(g1["step"], prod.sum(1), prod.abs().sum(1))
                        record(f"lsq b{bits} {'s' if signed else 'u'} "
                               f"{'pc' if per_channel else 'pt'} {str(dtype)[6:]}"
                               f"{' cl' if cl else ''}",
                               _same_bits(y0, y1) and _same_bits(gx0, gx1) and ok,
                               forward_bit_identical=_same_bits(y0, y1),
                               grad_x_exact=_same_bits(gx0, gx1), grad_s_max_rel_err=err)
    # tempering: closed form with the noise the kernel drew
    for noise, dist, code in (("error", "uniform", 1), ("error", "gaussian", 2),
                              ("uniform_step", "uniform", 3)):
        lam, s_val = 0.8, 0.21
        q = TemperingQuantizer(3, True, noise=noise, noise_dist=dist, lambda_=lam).to(device)
        q.step.data.fill_(s_val)
        q._mark_initialized()
        x = (torch.randn(64, 1000, generator=gen) * 1.2).to(device)
        w = torch.randn(x.shape, generator=gen).to(device)
        y, gx, g = _fwd_bwd(q, x, w, "on", seed=5)
        y2, _, _ = _fwd_bwd(q, x, w, "on", seed=5)
        torch.manual_seed(5)
        seed = ops.draw_seed(x)
        xi = (kernels.lsq().lsq_forward(x, q.step.detach(), 4, 3, lam, code, seed,
                                        return_noise=True)[1]
              if ops._use_triton(x) else ops._tempering_noise_torch(code, seed, x))
        xr = x.clone().requires_grad_(True)
        sr = torch.tensor([s_val], device=device, requires_grad=True)
        yr = LSQFunction.apply(xr, sr, 4, 3, q.grad_scale_value(x), xi, lam, noise)
        (yr * w).sum().backward()
        r = x / torch.tensor(s_val, device=device)
        inside = (r > -4) & (r < 3)
        frac = torch.round(r) - r
        term = torch.where(inside, frac, torch.where(r <= -4, -4.0, 3.0)).double()
        term = term + (lam * xi.double() * (frac * inside).double() if noise == "error"
                       else lam * xi.double())
        prod = w.double() * term * q.grad_scale_value(x)
        ok, err = _close64(g["step"], prod.sum(), prod.abs().sum())
        big_xi = (kernels.lsq().lsq_forward(torch.zeros(1 << 20, device=device),
                                            q.step.detach(), 4, 3, 1.0, code,
                                            torch.tensor([123], device=device),
                                            return_noise=True)[1]
                  if ops._use_triton(q.step) else ops._tempering_noise_torch(
                      code, torch.tensor([123]), torch.zeros(1 << 20)))
        var = big_xi.var().item() * (12 if code == 3 else 1)
        stats_ok = abs(big_xi.mean().item()) < 0.005 and abs(var - 1) < 0.01
        record(f"tempering {noise}/{dist}",
               torch.equal(y, y2) and _same_bits(y, yr.detach()) and _same_bits(gx, xr.grad)
               and ok and stats_ok, deterministic=torch.equal(y, y2),
               forward_bit_identical=_same_bits(y, yr.detach()),
               grad_x_exact=_same_bits(gx, xr.grad), grad_s_max_rel_err=err,
               noise_mean=big_xi.mean().item(), noise_var_normalized=var)
    # NIPQ noise phase: closed form with the z the kernel drew
    for signed in (True, False):
        for noise in ("uniform", "histogram"):
            q = NIPQQuantizer(3, signed, noise=noise).to(device)
            q.theta_a.data.fill_(1.3)
            q._mark_initialized()
            q.train()
            alpha = F.softplus(torch.tensor([1.3], device=device))
            n = 3 if signed else 7
            delta = alpha / n
            x = (torch.randn(64, 1000, generator=gen)).to(device) * alpha
            if not signed:
                x = x.relu()
            w = torch.randn(x.shape, generator=gen).to(device)
            y, gx, g = _fwd_bwd(q, x, w, "on", seed=9)
            torch.manual_seed(9)
            seed = ops.draw_seed(x)
            lut = ops.nipq_lut_impl(x, alpha, delta, signed) if noise == "histogram" else None
            z = (kernels.nipq().noise_forward(x, alpha, delta, seed, lut, signed,
                                              return_z=True)[1]
                 if ops._use_triton(x) else ops._nipq_z_torch(seed, lut, x))
            lo = -alpha if signed else torch.zeros_like(alpha)
            above, below = x >= alpha, x <= lo
            expected = torch.where(above, alpha, torch.where(below, lo, x + z * delta))
            prod = w.double() * torch.where(above, 1.0, torch.where(
                below, -1.0 if signed else 0.0, z / n)).double() * torch.sigmoid(
                torch.tensor(1.3)).item()
            ok, err = _close64(g["theta_a"], prod.sum(), prod.abs().sum())
            fwd = _same_bits(y, expected)
            gxe = _same_bits(gx, torch.where(~above & ~below, w, 0.0))
            record(f"nipq noise {noise} {'s' if signed else 'u'}", fwd and gxe and ok,
                   forward_bit_identical=fwd, grad_x_exact=gxe, grad_alpha_max_rel_err=err)
    # NIPQ hard
    for bits, signed in ((2, True), (4, False), (8, True)):
        q = NIPQQuantizer(bits, signed, noise="uniform").to(device)
        q.theta_a.data.fill_(1.3)
        q._mark_initialized()
        q.set_hard(True)
        x = (torch.randn(64, 1000, generator=gen) * 1.5).to(device)
        w = torch.randn(x.shape, generator=gen).to(device)
        y0, gx0, g0 = _fwd_bwd(q, x, w, "off")
        y1, gx1, g1 = _fwd_bwd(q, x, w, "on")
        rel = ((g1["theta_a"] - g0["theta_a"]).abs() / g0["theta_a"].abs()).item()
        record(f"nipq hard b{bits} {'s' if signed else 'u'}",
               _same_bits(y0, y1) and _same_bits(gx0, gx1) and rel < 1e-4,
               forward_bit_identical=_same_bits(y0, y1), grad_x_exact=_same_bits(gx0, gx1),
               grad_alpha_rel_diff_vs_reference=rel)
    # recompute conv under bf16 autocast, channels_last
    from qtrainer.nn import QuantConv2d

    for method in ("lsq", "tempering", "nipq"):
        torch.manual_seed(0)
        fp = nn.Conv2d(16, 32, 3, padding=1).to(device)
        if method == "lsq":
            wq, aq = LSQQuantizer(4, True), LSQQuantizer(4, False)
        elif method == "tempering":
            wq, aq = TemperingQuantizer(4, True), TemperingQuantizer(4, False)
        else:
            wq, aq = NIPQQuantizer(4, True, role="weight"), NIPQQuantizer(4, False)
        layer = QuantConv2d.from_float(fp, wq.to(device), aq.to(device))
        x = torch.randn(8, 16, 20, 20, device=device).relu().contiguous(
            memory_format=torch.channels_last)
        with torch.no_grad():
            layer(x)
        res = []
        for flag in (False, True):
            layer.recompute = flag
            for p in layer.parameters():
                p.grad = None
            xi = x.clone().requires_grad_(True)
            with ops.options(fused="on"):
                torch.manual_seed(3)
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    yy = layer(xi)
                yy.float().square().sum().backward()
            res.append((yy.detach(), xi.grad, [p.grad.clone() for p in layer.parameters()
                                               if p.grad is not None]))
        (a, ga, pa), (b, gb, pb) = res
        grads_ok = all(torch.allclose(u, v, rtol=1e-5, atol=1e-6) for u, v in zip(pa, pb))
        record(f"recompute conv {method} bf16 cl",
               _same_bits(a, b) and _same_bits(ga, gb) and grads_ok,
               forward_bit_identical=_same_bits(a, b), grad_x_exact=_same_bits(ga, gb),
               param_grads_close=grads_ok)
    if big and device.type == "cuda":  # ResNet-18's largest activation, bf16: grad_s vs fp64
        q = LSQQuantizer(4, False).to(device)
        q.step.data.fill_(0.05)
        q._mark_initialized()
        x = torch.randn(256, 64, 56, 56, device=device, dtype=torch.bfloat16).relu().contiguous(
            memory_format=torch.channels_last)
        w = torch.randn(x.shape, device=device, dtype=torch.bfloat16)
        y1, gx1, g1 = _fwd_bwd(q, x, w, "on")
        y0, gx0, _ = _fwd_bwd(q, x, w, "off")
        r = x.double() / 0.05
        inside = (r > 0) & (r < 15)
        term = torch.where(inside, torch.round(r.float()).double() - r,
                           torch.where(r <= 0, 0.0, 15.0))
        prod = w.double() * term
        g = q.grad_scale_value(x)
        ok, err = _close64(g1["step"], prod.sum() * g, prod.abs().sum() * g)
        record("lsq 51M-element bf16 activation", ok and _same_bits(y0, y1)
               and _same_bits(gx0, gx1), grad_s_max_rel_err=err,
               forward_bit_identical=_same_bits(y0, y1), grad_x_exact=_same_bits(gx0, gx1))
        del x, w, y1, gx1, y0, gx0, r, inside, term, prod
        cleanup(device)
    return out


# -- one quantizer, forward + backward -------------------------------------------------------

def run_micro(device, args) -> list[dict]:
    if device.type == "cuda":
        shape, dtype = (256, 64, 56, 56), args.amp_dtype or torch.float32
    else:
        shape, dtype = ((4, 16, 16, 16) if args.quick else (16, 32, 32, 32)), torch.float32
    x = torch.randn(shape, device=device, dtype=dtype).relu()
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    g = torch.randn_like(x)

    def lsq():
        q = LSQQuantizer(4, False).to(device)
        q.initialize(x)
        return q

    def tempering():
        q = TemperingQuantizer(4, False).to(device)
        q.initialize(x)
        return q

    def nipq(noise):
        q = NIPQQuantizer(4, False, noise=noise).to(device)
        q._mark_initialized()
        return q

    cases = [("textbook_lsq", lambda: TextbookLSQ(lsq()), "off"), ("lsq_reference", lsq, "off"),
             ("lsq_fused", lsq, "on"), ("tempering_reference", tempering, "off"),
             ("tempering_fused", tempering, "on"),
             ("nipq_uniform_reference", lambda: nipq("uniform"), "off"),
             ("nipq_uniform_fused", lambda: nipq("uniform"), "on"),
             ("nipq_histogram_reference", lambda: nipq("histogram"), "off"),
             ("nipq_histogram_fused", lambda: nipq("histogram"), "on")]
    rows = []
    for name, make, fused in cases:
        try:
            q = make().train()
            xi = x.detach().requires_grad_(True)

            def step():
                with ops.options(fused=fused):
                    q(xi).backward(g)
                xi.grad = None

            ms, peak, _ = timed(step, max(2, args.warmup // 2), args.iters, device)
            rows.append({"case": name, "shape": list(shape), "dtype": str(dtype)[6:],
                         "ms_fwd_bwd": ms, "peak_mb": peak})
        except Exception as exc:
            rows.append({"case": name, "error": f"{type(exc).__name__}: {exc}"})
            traceback.print_exc()
        cleanup(device)
    return rows


# -- main ------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="small batch and few steps")
    p.add_argument("--models", help=f"comma list of {', '.join(MODELS)}")
    p.add_argument("--modes", help=f"comma list of {', '.join(MODES)}")
    p.add_argument("--variants", help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--batch", type=int)
    p.add_argument("--size", type=int, help="image size for every model (default per model)")
    p.add_argument("--warmup", type=int)
    p.add_argument("--iters", type=int, help="timed steps (median reported)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--channels-last", dest="channels_last", action="store_true", default=None)
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--check", dest="check", action="store_true", default=None,
                   help="fused vs reference on the device first (default on CUDA)")
    p.add_argument("--no-check", dest="check", action="store_false")
    p.add_argument("--micro", dest="micro", action="store_true", default=True)
    p.add_argument("--no-micro", dest="micro", action="store_false")
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
    default_variants = list(VARIANTS) if cuda else list(VARIANTS)[:6]  # diagnostics: GPU only
    args.variants = args.variants.split(",") if args.variants else default_variants
    for value, known, what in ((args.models, MODELS, "model"), (args.modes, MODES, "mode"),
                               (args.variants, VARIANTS, "variant")):
        bad = [v for v in value if v not in known]
        if bad:
            p.error(f"unknown {what} {bad}; known: {', '.join(known)}")
    if "fp" not in args.variants:
        args.variants.insert(0, "fp")
    if args.batch is None:
        args.batch = 256 if cuda else (4 if args.quick else 32)
    if args.warmup is None:
        args.warmup = (5 if args.quick else 10) if cuda else (1 if args.quick else 2)
    if args.iters is None:
        args.iters = (10 if args.quick else 30) if cuda else (3 if args.quick else 5)
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
           "triton": None, "gpu": None, "batch": args.batch, "size": args.size,
           "models": args.models, "modes": args.modes, "variants": args.variants,
           "dtype": str(args.amp_dtype or torch.float32)[6:], "channels_last": args.channels_last,
           "warmup": args.warmup, "iters": args.iters, "compile_backend": args.compile_backend,
           "fused": ops.get_options(), "quick": args.quick, "threads": torch.get_num_threads(),
           "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}
    if kernels.available():
        import triton

        cfg["triton"] = triton.__version__
    if device.type == "cuda":
        cfg["gpu"] = torch.cuda.get_device_name(device)
    return cfg


def print_table(rows):
    head = (f"{'model':<9} {'mode':<10} {'variant':<22} {'ms/step':>9} {'x FP':>6} "
            f"{'peak MiB':>9} {'x FP':>6} {'saved MiB':>9}")
    print(head)
    print("-" * len(head))
    for r in rows:
        if "error" in r:
            print(f"{r['model']:<9} {r['mode']:<10} {r['variant']:<22} ERROR {r['error'][:60]}")
            continue
        fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        print(f"{r['model']:<9} {r['mode']:<10} {r['variant']:<22} {r['ms_per_step']:>9.2f} "
              f"{fmt(r['time_ratio_vs_fp'], '6.2f'):>6} {fmt(r['peak_mb'], '9.0f'):>9} "
              f"{fmt(r['mem_ratio_vs_fp'], '6.2f'):>6} {fmt(r.get('saved_mb'), '9.1f'):>9}")


def merge(args) -> int:
    """One result from several runs (e.g. one per model and mode, to fit time limits); the
    ratios stay those measured within each run."""
    parts = [json.loads(Path(f).read_text()) for f in args.merge]
    result = {"config": [p["config"] for p in parts], "check": [], "rows": [], "micro": []}
    for part in parts:
        result["check"].extend(part.get("check") or [])
        result["rows"].extend(part.get("rows") or [])
        result["micro"].extend(part.get("micro") or [])
    print_table(result["rows"])
    bad = [c for c in result["check"] if not c["ok"]]
    print(f"\ncheck: {len(result['check']) - len(bad)}/{len(result['check'])} passed")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.json}")
    return 1 if bad else 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.merge:
        return merge(args)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    result = {"config": config(args, device), "check": None, "rows": [], "micro": None}
    failed = False
    if args.check:
        checks = run_checks(device, big=not args.quick)
        result["check"] = checks
        bad = [c for c in checks if not c["ok"]]
        failed = bool(bad)
        print(f"check: {len(checks) - len(bad)}/{len(checks)} passed"
              + "".join(f"\n  FAIL {c}" for c in bad), flush=True)
        if args.check_only:
            for c in checks:
                print(f"  {'ok  ' if c['ok'] else 'FAIL'} {c['name']}")
            _write(args, result)
            return 1 if failed else 0
    for name in args.models:
        for mode in args.modes:
            for variant in args.variants:
                row = run_variant(name, mode, variant, args, device)
                result["rows"].append(row)
                print(f"  {name} {mode} {variant}: "
                      + (row["error"] if "error" in row else f"{row['ms_per_step']:.2f} ms/step"),
                      flush=True)
    add_ratios(result["rows"])
    if args.micro:
        result["micro"] = run_micro(device, args)
    print()
    print_table(result["rows"])
    if result["micro"]:
        print("\none quantizer, forward + backward:")
        for r in result["micro"]:
            print(f"  {r['case']:<26} " + (r["error"] if "error" in r
                                            else f"{r['ms_fwd_bwd']:.3f} ms"))
    _write(args, result)
    return 1 if failed or any("error" in r for r in result["rows"]) else 0


def _write(args, result):
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    sys.exit(main())
