"""Device checks and one-quantizer timings of ``benchmarks/speed.py``.

``run_checks``: the fused ops on the device (Triton on CUDA) against the closed forms of
``tests/closed_forms.py`` (forward bit-identical given the noise drawn, ``grad_x`` exact,
parameter gradients within the fp32 accumulation bound) and the plain torch path.
``run_micro``: one quantizer's forward + backward on one activation tensor.
"""

from __future__ import annotations

import traceback

import torch
import torch.nn.functional as F
from torch import nn

from speed_lib import TextbookLSQ, cleanup, median, timed_rounds  # puts tests/ on the path

import closed_forms as cf  # noqa: E402
from quant_harness import recompute_pair, run  # noqa: E402

from qtrainer.quantizers import (LSQQuantizer, NIPQQuantizer, TemperingQuantizer,  # noqa: E402
                                 formulas, kernels, ops)


def _bounded(got, terms, rows=1, scale=1.0, slack=0.0) -> bool:
    try:
        cf.assert_fp32_sum(got.cpu(), terms.cpu(), rows, scale, slack)
    except AssertionError:
        return False
    return True


def _seed(x, seed):
    torch.manual_seed(seed)
    return ops.draw_seed(x)


def run_checks(device, big: bool) -> list[dict]:
    """Fused (Triton on CUDA) against the closed forms and the plain path on ``device``."""
    out = []

    def record(name, **flags):
        out.append({"name": name, "ok": all(flags.values()), **flags})

    gen = torch.Generator(device="cpu").manual_seed(0)
    triton = ops.use_triton(torch.zeros(1, device=device))
    for bits in (2, 4, 8):  # LSQ sweep
        for signed in (True, False):
            for per_channel in (False, True):
                for dtype in (torch.float32, torch.bfloat16):
                    q = LSQQuantizer(bits, signed, per_channel=per_channel,
                                     channels=8 if per_channel else None).to(device)
                    q_n, q_p = q.levels
                    q.step.data.copy_(torch.linspace(0.2, 0.5, 8 if per_channel else 1))
                    q._mark_initialized()
                    x = (torch.randn(8, 16, 17, 17, generator=gen) * 0.4 * q_p).to(device, dtype)
                    x = x.contiguous(memory_format=torch.channels_last)
                    w = torch.randn(x.shape, generator=gen).to(device)
                    y0, gx0, _ = run(q, x, w, "off")
                    y1, gx1, g1 = run(q, x, w, "on")
                    s = q.step.detach()
                    wq = w.to(dtype)
                    record(f"lsq b{bits} {'s' if signed else 'u'} {'pc' if per_channel else 'pt'} "
                           f"{str(dtype)[6:]} cl",
                           forward_bit_identical=cf.same_bits(
                               y1.cpu(), cf.lsq_forward(x, s, q_n, q_p).to(dtype).cpu()),
                           same_as_plain=cf.same_bits(y0.cpu(), y1.cpu())
                           and cf.same_bits(gx0.cpu(), gx1.cpu()),
                           grad_x_exact=cf.same_bits(
                               gx1.cpu(), cf.lsq_grad_x(x, s, q_n, q_p, wq).to(dtype).cpu()),
                           grad_s_within_fp32=_bounded(
                               g1["step"], cf.lsq_step_terms(x, s, q_n, q_p, wq),
                               8 if per_channel else 1, q.grad_scale_value(x)))
    for noise, dist, code in (("error", "uniform", 1), ("error", "gaussian", 2),
                              ("uniform_step", "uniform", 3)):
        lam = 0.8
        q = TemperingQuantizer(3, True, noise=noise, noise_dist=dist, lambda_=lam).to(device)
        q.step.data.fill_(0.21)
        q._mark_initialized()
        x = (torch.randn(64, 1000, generator=gen) * 1.2).to(device)
        w = torch.randn(x.shape, generator=gen).to(device)
        y, gx, g = run(q, x, w, "on", seed=5)
        s, lam_t, seed = q.step.detach(), torch.tensor([lam], device=device), _seed(x, 5)
        xil = (lam_t * kernels.step().forward(x, s, 4, 3, lam_t, code, seed,
                                              return_noise=True)[1]
               if triton else formulas.tempering_noise(code, seed, x, lam_t))
        c = torch.clamp(x / s, -4, 3)
        codes = torch.round(c)
        expected = (codes + xil) * s if code == 3 else (codes + (codes - c) * xil) * s
        record(f"tempering {noise}/{dist}", forward_bit_identical=cf.same_bits(y, expected),
               grad_x_exact=cf.same_bits(gx.cpu(), cf.lsq_grad_x(x, s, 4, 3, w).cpu()),
               grad_s_within_fp32=_bounded(g["step"], cf.lsq_step_terms(
                   x, s, 4, 3, w, 1.0, xil, noise), scale=q.grad_scale_value(x)))
    sig = torch.sigmoid(torch.tensor(1.3)).item()
    for signed in (True, False):  # NIPQ noise phase
        for noise in ("uniform", "histogram"):
            q = NIPQQuantizer(3, signed, noise=noise).to(device)
            q.theta_a.data.fill_(1.3)
            q._mark_initialized()
            alpha = F.softplus(torch.tensor([1.3], device=device))
            n = 3 if signed else 7
            x = torch.randn(64, 1000, generator=gen).to(device) * alpha
            x = x if signed else x.relu()
            w = torch.randn(x.shape, generator=gen).to(device)
            y, gx, g = run(q, x, w, "on", seed=9)
            seed = _seed(x, 9)
            lut = ops.nipq_lut(x, alpha, alpha / n, signed) if noise == "histogram" else None
            z = (kernels.nipq().noise_forward(x, alpha, alpha / n, seed, lut, signed,
                                              return_z=True)[1]
                 if triton else formulas.nipq_z(seed, lut, x))
            xc, zc, wc = x.cpu(), z.cpu(), w.cpu()
            _, _, inside = cf.nipq_noise_masks(xc, alpha.item(), signed)
            terms = cf.nipq_alpha_terms(xc, alpha.item(), signed, wc) + \
                wc.double() * zc.double() / n * inside
            record(f"nipq noise {noise} {'s' if signed else 'u'}",
                   forward_bit_identical=cf.same_bits(y.cpu(), cf.nipq_noise_forward(
                       xc, alpha.item(), alpha.cpu() / n, zc, signed)),
                   grad_x_exact=cf.same_bits(gx.cpu(), torch.where(inside, wc, 0.0)),
                   grad_alpha_within_fp32=_bounded(g["theta_a"], terms, scale=sig))
    for bits, signed in ((2, True), (4, False), (8, True)):  # NIPQ hard
        q = NIPQQuantizer(bits, signed, noise="uniform").to(device)
        q.theta_a.data.fill_(1.3)
        q._mark_initialized()
        q.set_hard(True)
        x = (torch.randn(64, 1000, generator=gen) * 1.5).to(device)
        w = torch.randn(x.shape, generator=gen).to(device)
        y0, gx0, _ = run(q, x, w, "off")
        y1, gx1, g1 = run(q, x, w, "on")
        n, alpha = q.code_range[1], q.alpha.item()
        terms, slack = cf.nipq_hard_alpha_terms(x.cpu(), alpha, n, signed, w.cpu())
        record(f"nipq hard b{bits} {'s' if signed else 'u'}",
               forward_bit_identical=cf.same_bits(
                   y1.cpu(), cf.nipq_hard_forward(x.cpu(), alpha, n, signed)),
               same_as_plain=cf.same_bits(y0, y1) and cf.same_bits(gx0, gx1),
               grad_alpha_within_fp32=_bounded(g1["theta_a"], terms, scale=sig, slack=slack))
    _check_recompute(device, record)
    if big and device.type == "cuda":  # ResNet-18's largest activation, bf16
        q = LSQQuantizer(4, False).to(device)
        q.step.data.fill_(0.05)
        q._mark_initialized()
        x = torch.randn(256, 64, 56, 56, device=device, dtype=torch.bfloat16).relu().contiguous(
            memory_format=torch.channels_last)
        w = torch.randn(x.shape, device=device, dtype=torch.bfloat16)
        y1, gx1, g1 = run(q, x, w, "on")
        terms = cf.lsq_step_terms(x, q.step.detach(), 0, 15, w)
        record("lsq 51M-element bf16 activation", grad_s_within_fp32=_bounded(
            g1["step"], terms, scale=q.grad_scale_value(x)))
        cleanup(device)
    return out


def _check_recompute(device, record):
    """A recomputing conv under bf16 autocast (channels_last) against the plain layer."""
    from qtrainer.nn import QuantConv2d

    for method in ("lsq", "tempering", "nipq"):
        torch.manual_seed(0)
        fp = nn.Conv2d(16, 32, 3, padding=1).to(device)
        make = {"lsq": LSQQuantizer, "tempering": TemperingQuantizer}.get(method)
        wq, aq = ((make(4, True), make(4, False)) if make else
                  (NIPQQuantizer(4, True, role="weight"), NIPQQuantizer(4, False)))
        layer = QuantConv2d.from_float(fp, wq.to(device), aq.to(device))
        x = torch.randn(8, 16, 20, 20, device=device).relu().contiguous(
            memory_format=torch.channels_last)
        with torch.no_grad():
            layer(x)
        (a, ga, pa), (b, gb, pb) = recompute_pair(layer, x)
        record(f"recompute conv {method} bf16 cl", forward_bit_identical=cf.same_bits(a, b),
               grad_x_exact=cf.same_bits(ga, gb),
               param_grads_close=all(torch.allclose(u, v, rtol=1e-5, atol=1e-6)
                                     for u, v in zip(pa, pb)))


def run_micro(device, args) -> list[dict]:
    """One quantizer's forward + backward on one activation tensor (ratios to textbook LSQ)."""
    if device.type == "cuda":
        shape, dtype = (256, 64, 56, 56), args.amp_dtype or torch.float32
    else:
        shape, dtype = ((4, 16, 16, 16) if args.quick else (128, 16, 32, 32)), torch.float32
    x = torch.randn(shape, device=device, dtype=dtype).relu()
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    g = torch.randn_like(x)

    def lsq(cls=LSQQuantizer):
        q = cls(4, False).to(device)
        q.initialize(x)
        return q

    def nipq(noise):
        q = NIPQQuantizer(4, False, noise=noise).to(device)
        q._mark_initialized()
        return q

    cases = {"textbook_lsq": (lambda: TextbookLSQ(lsq(), "input"), "off"),
             "lsq_plain": (lsq, "off"), "lsq_fused": (lsq, "on"),
             "tempering_fused": (lambda: lsq(TemperingQuantizer), "on"),
             "nipq_uniform_fused": (lambda: nipq("uniform"), "on"),
             "nipq_histogram_fused": (lambda: nipq("histogram"), "on")}
    steps = {}
    for name, (make, fused) in cases.items():
        q = make().train()
        xi = x.detach().requires_grad_(True)

        def step(q=q, xi=xi, fused=fused):
            with ops.options(fused=fused):
                q(xi).backward(g)
            xi.grad = None

        steps[name] = step
    rows = []
    try:
        times = timed_rounds(steps, max(1, args.warmup // 2), args.rounds, 1, device, args.clock)
    except Exception as exc:
        traceback.print_exc()
        return [{"case": "micro", "error": f"{type(exc).__name__}: {exc}"}]
    base = median(times["textbook_lsq"])
    for name, ts in times.items():
        rows.append({"case": name, "shape": list(shape), "dtype": str(dtype)[6:],
                     "ms_fwd_bwd": median(ts) * 1e3, "ratio_vs_textbook": median(ts) / base})
    cleanup(device)
    return rows
