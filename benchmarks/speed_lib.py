"""Variants and measurements of ``benchmarks/speed.py``: how each variant is built and trained,
and how a step is counted (aten ops, Triton launches through the interpreter), timed
(interleaved rounds) and weighed (bytes saved for backward)."""

from __future__ import annotations

import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(ROOT / "tests"))
from quant_harness import saved_bytes  # noqa: E402

from qtrainer.models import resnet20  # noqa: E402
from qtrainer.nn import QuantizedLayer, named_quantizers  # noqa: E402
from qtrainer.quantizers import LSQQuantizer, ops  # noqa: E402
from qtrainer.recompute import set_recompute  # noqa: E402
from qtrainer.surgery import initialize_quantizers, quantize_model  # noqa: E402

VARIANTS = {
    "fp": {},
    "textbook_lsq": {"method": "lsq", "replace": "textbook"},
    "torchao_qat": {"method": "lsq", "replace": "torchao"},
    "lsq_w4a4": {"method": "lsq"},
    "tempering_w4a4": {"method": "tempering"},
    "nipq_uniform_w4a4": {"method": "nipq", "kwargs": {"noise": "uniform"}},
    "nipq_histogram_w4a4": {"method": "nipq", "kwargs": {"noise": "histogram"}},
    "lsq_w4a4_no_recompute": {"method": "lsq", "recompute": False},
    "lsq_w4a4_reference": {"method": "lsq", "fused": "off"},
}
MODELS = {"resnet18": 224, "resnet20": 32}


def torchao_available() -> bool:
    try:
        import torchao.quantization.qat  # noqa: F401
    except Exception:
        return False
    return True


# -- peers: the textbook formulation and torchao's QAT fake quantizers ----------------------

def _grad_scale(s, g):
    return (s - s * g).detach() + s * g


def _round_pass(v):
    return (v.round() - v).detach() + v


class TextbookLSQ(nn.Module):
    """LSQ as in the paper's appendix code: gradient scale and STE by the detach trick (the
    same for weights and inputs: ``role`` is unused)."""

    def __init__(self, q: LSQQuantizer, role: str):
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


class TorchaoFake(nn.Module):
    """torchao's QAT fake quantizer (``IntxFakeQuantizer``, dynamic scales): weights
    symmetric per output channel, inputs asymmetric per sample, at the quantizer's bit-width
    (int4 or int8)."""

    def __init__(self, q: LSQQuantizer, role: str):
        super().__init__()
        from torchao.quantization.qat import IntxFakeQuantizeConfig, IntxFakeQuantizer

        dtype = {4: torch.int4, 8: torch.int8}[q.bits]
        if role == "weight":
            self.fq = None  # built on first use (the group size is the weight's row)
            self._make = lambda group: IntxFakeQuantizer(IntxFakeQuantizeConfig(
                dtype, group_size=group, is_symmetric=True))
        else:
            self.fq = IntxFakeQuantizer(IntxFakeQuantizeConfig(dtype, "per_token",
                                                               is_symmetric=False))

    def forward(self, x):
        if self.fq is None:
            self.fq = self._make(x[0].numel())
        flat = x.reshape(x.shape[0], -1) if x.dim() > 1 else x.reshape(1, -1)
        return self.fq(flat).reshape(x.shape)


PEERS = {"textbook": TextbookLSQ, "torchao": TorchaoFake}


# -- models and steps ------------------------------------------------------------------------

def make_model(name: str, num_classes: int) -> nn.Module:
    if name == "resnet20":
        return resnet20(num_classes=num_classes)
    if name == "resnet18":
        import torchvision

        return torchvision.models.resnet18(num_classes=num_classes)
    raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")


def build(name, variant, device, size, channels_last):
    """The model of ``variant``: quantized W4A4 (first and last layer 8-bit, the recipes'
    default), initialized on a random batch, in training mode."""
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
        if spec.get("replace"):
            for layer in model.modules():
                if isinstance(layer, QuantizedLayer):
                    layer.recompute = False
                    for attr in ("weight_quantizer", "input_quantizer"):
                        q = getattr(layer, attr)
                        if q is not None:
                            role = "weight" if attr == "weight_quantizer" else "input"
                            setattr(layer, attr, PEERS[spec["replace"]](q, role).to(device))
        if "recompute" in spec:
            set_recompute(model, spec["recompute"])
    model.train()
    return model


def make_step(model, opt, x, y, amp_dtype, device, cudagraphs, fused="auto"):
    """One SGD training step on the fixed batch, under the variant's fused-op setting."""
    def step():
        with ops.options(fused=fused):
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


def cleanup(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# -- measurements ----------------------------------------------------------------------------

def timed_rounds(steps: dict, warmup: int, rounds: int, iters: int, device, clock):
    """Interleaved timing: ``rounds`` times, each step function runs ``iters`` steps in turn.
    Returns ``{name: [seconds per step of each round]}``; on CUDA times come from events."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    sync(device)
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(
                    enable_timing=True)
                start.record()
                for _ in range(iters):
                    step()
                end.record()
                torch.cuda.synchronize()
                times[name].append(start.elapsed_time(end) / 1e3 / iters)
            else:
                t0 = clock()
                for _ in range(iters):
                    step()
                times[name].append((clock() - t0) / iters)
    return times


def peak_mb(step, device):
    """Peak allocated CUDA memory (MiB) of one step, None elsewhere."""
    if device.type != "cuda":
        return None
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated(device) / 2**20


def saved_mb(model, x, amp_dtype, fused="auto") -> float:
    """MiB of distinct storages autograd keeps for one forward (parameters and the input
    excluded)."""
    return saved_bytes(model, x, fused=fused, autocast_dtype=amp_dtype) / 2**20


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def aten_ops(step) -> int:
    """aten operators dispatched by one training step (forward, backward, optimizer)."""
    with _CountOps() as mode:
        step()
    return mode.count


def uses_kernels(variant: str) -> bool:
    """The variant's quantizers run the fused ops (the others launch no Triton kernel)."""
    spec = VARIANTS[variant]
    return bool(spec.get("method")) and not spec.get("replace") and spec.get("fused") != "off"


def count_launches(variants, timeout=900) -> dict:
    """Triton launches per training step of each variant's GPU path, counted through Triton's
    interpreter on CPU (a subprocess with ``TRITON_INTERPRET=1``; launches do not depend on the
    batch or image size, so ResNet-20 on 2 images of 8 px): ``{variant: {"launches",
    "quantizers"}}`` (0 launches for variants without fused ops), or ``{"error": ...}``."""
    fused = [v for v in variants if uses_kernels(v)]
    out = {v: {"launches": 0, "quantizers": None} for v in variants if v not in fused}
    if fused:
        env = dict(os.environ, TRITON_INTERPRET="1")
        proc = subprocess.run([sys.executable, __file__, "launches", ",".join(fused)], env=env,
                              capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        if proc.returncode != 0:
            return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}
        out.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    return out


def _launches_main(variants: list[str]) -> None:
    """The interpreter subprocess of :func:`count_launches`."""
    from qtrainer.quantizers import kernels

    if not kernels.available():
        raise SystemExit("triton is not installed")
    from triton.runtime.interpreter import InterpretedFunction

    calls = []
    real = InterpretedFunction.run

    def counted(self, *args, **kwargs):
        calls.append(1)
        return real(self, *args, **kwargs)

    InterpretedFunction.run = counted
    device, out = torch.device("cpu"), {}
    for variant in variants:
        model = build("resnet20", variant, device, 8, False)
        x, y = torch.randn(2, 3, 8, 8), torch.randint(0, 10, (2,))
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        fused = VARIANTS[variant].get("fused", "on")
        step = make_step(model, opt, x, y, None, device, False, fused)
        calls.clear()
        with ops.options(backend="triton"):
            step()
        out[variant] = {"launches": len(calls),
                        "quantizers": sum(1 for _ in named_quantizers(model))}
    print(json.dumps(out))



def profile_step(step, top: int = 10, steps: int = 3) -> list[dict]:
    """Where a (warmed-up) training step spends its time: the ``top`` operators by self CPU
    time over ``steps`` profiled steps, ``[{"op", "share", "calls_per_step"}, ...]`` with
    ``share`` the fraction of the steps' total self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    ranked = sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]
    return [{"op": e.key, "share": e.self_cpu_time_total / total,
             "calls_per_step": e.count / steps} for e in ranked]


def median(values):
    return statistics.median(values) if values else None


def clock_for(device, threads: int):
    """The CPU clock: this thread's CPU time with one thread (immune to other processes on a
    shared core), wall time otherwise."""
    return time.thread_time if device.type == "cpu" and threads == 1 else time.perf_counter


if __name__ == "__main__" and sys.argv[1:2] == ["launches"]:
    torch.set_num_threads(1)
    _launches_main(sys.argv[2].split(","))
