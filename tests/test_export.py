"""Export: int (safetensors codes), QDQ ONNX, TorchScript, ExportedProgram, BN folding.

Numbers, not smoke: ONNX Runtime vs PyTorch on 1,000 real CIFAR-10 test images for briefly
trained LSQ 4-bit, LSQ 2-bit and NIPQ mixed-precision models; bit-identical int round trips;
the ResNet-18 size ratio. Torch runs single-threaded here: on a shared 2-core machine a
2-thread torch is ~10x slower under contention.
"""

from __future__ import annotations

import copy
import math
import os
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qdq_parity import codes_up_to_ties
from qtrainer import initialize_quantizers, quantize_model, set_quantizers
from qtrainer.atomic import atomic_write, write_bytes_atomic, write_text_atomic
from qtrainer.export import export, fold_batchnorm, load_int, pack_codes, read_header, unpack_codes
from qtrainer.export._common import eval_copy, quantized_layers
from qtrainer.export.int_format import storage_dtype
from qtrainer.models import SmallCNN, resnet20
from qtrainer.nn import named_quantizers
from qtrainer.quantizers import NIPQQuantizer
from threads import one_thread  # noqa: F401 (autouse: one torch thread)

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

CIFAR_MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
CIFAR_STD = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)


# -- fixtures ---------------------------------------------------------------------------------
def _cifar_root():
    try:
        from qtrainer.data import default_cifar10_jpeg_root

        return default_cifar10_jpeg_root()
    except (ImportError, FileNotFoundError):
        root = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "cifar10-jpeg")
        if not os.path.isfile(os.path.join(root, "test.npz")):
            pytest.skip("CIFAR-10 JPEG data not found")
        return root


def _load_split(root, split: str, per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    path = os.path.join(root, f"{split}.npz")
    with np.load(path) as z:
        labels = z["labels"].astype(np.int64)
    rng = np.random.default_rng(seed)
    idx = np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per_class]
                                  for c in range(10)]))
    try:
        from qtrainer.data import load_npz_jpeg

        images, y, _ = load_npz_jpeg(path, idx)
    except ImportError:
        import io

        from PIL import Image

        with np.load(path) as z:
            jpeg, off = z["jpeg"], z["offsets"]
            images = np.stack([np.asarray(Image.open(io.BytesIO(jpeg[off[i]:off[i + 1]].tobytes())).convert("RGB"))
                               for i in idx])
        y = labels[idx]
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255
    return (x - CIFAR_MEAN) / CIFAR_STD, torch.as_tensor(y, dtype=torch.int64)


@pytest.fixture(scope="module")
def cifar():
    root = _cifar_root()
    xtr, ytr = _load_split(root, "train", 300, 0)
    xte, yte = _load_split(root, "test", 100, 0)  # 1,000 test images
    return xtr, ytr, xte, yte


def _train(model, xtr, ytr, steps, lr, seed):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(xtr), (64,), generator=g)
        xb = xtr[idx].flip(3) if torch.rand(1, generator=g) < 0.5 else xtr[idx]
        loss = F.cross_entropy(model(xb), ytr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model


def _accuracy(model, x, y):
    with torch.no_grad():
        return _top1(model(x), y)


def _top1(logits, y):
    return (logits.argmax(1) == y).float().mean().item()


@pytest.fixture(scope="module")
def fp_model(cifar):
    xtr, ytr, xte, yte = cifar
    torch.manual_seed(0)
    model = _train(SmallCNN(width=16), xtr, ytr, steps=80, lr=5e-3, seed=0)
    assert _accuracy(model, xte, yte) > 0.25  # 10 classes: clearly better than chance
    return model


def _set_bits(q: NIPQQuantizer, bits: int) -> None:
    """Learned bit-width rounding to ``bits``: b_c = b_min + (b_max - b_min) sigmoid(theta_b)."""
    p = (bits - q.b_min + 0.1) / (q.b_max - q.b_min)
    q.theta_b.data.fill_(math.log(p / (1 - p)))


MIXED_BITS = [3, 5, 6, 4, 7, 2, 3, 5]


def _quantize(fp, xtr, ytr, method, bits, kwargs=None, mixed=False, qat_steps=12):
    model = copy.deepcopy(fp)
    quantize_model(model, method=method, weight_bits=bits, act_bits=bits,
                   method_kwargs=kwargs or {}, example_input=xtr[:2])
    if mixed:
        for (_, q), b in zip(named_quantizers(model), MIXED_BITS * 4):
            _set_bits(q, b)
    initialize_quantizers(model, xtr[:256])
    _train(model, xtr, ytr, steps=qat_steps, lr=1e-3, seed=1)
    for _, q in named_quantizers(model):
        if isinstance(q, NIPQQuantizer):
            q.freeze_bits()
    set_quantizers(model, hard=True)
    return model.eval()


@pytest.fixture(scope="module")
def qmodels(fp_model, cifar):
    xtr, ytr, _, _ = cifar
    return {
        "lsq4": _quantize(fp_model, xtr, ytr, "lsq", 4),
        "lsq2": _quantize(fp_model, xtr, ytr, "lsq", 2),
        "nipq_mixed": _quantize(fp_model, xtr, ytr, "nipq", 4, {"learn_bits": True, "noise": "uniform"},
                                mixed=True),
    }


@pytest.fixture(scope="module")
def logits(qmodels, cifar):
    """Eval logits of each quantized model on the 1,000 test images (computed once)."""
    xte = cifar[2]
    with torch.no_grad():
        return {name: model(xte) for name, model in qmodels.items()}


def _ort_run(path, x, codes: bool = False):
    """onnxruntime's logits of ``x`` (CPU, one thread); with ``codes``, also the integer codes
    of every quantized input (the outputs of its QuantizeLinear, or of Round above 8 bits), in
    graph order."""
    proto = onnx.load(str(path))
    taps = [n.output[0] for n in proto.graph.node if n.op_type in ("QuantizeLinear", "Round")]
    if codes:
        proto.graph.output.extend(onnx.ValueInfoProto(name=t) for t in taps)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    out = sess.run(None, {"input": x.numpy()})
    logits = torch.from_numpy(out[0])
    return (logits, [torch.from_numpy(c.astype(np.int64)) for c in out[1:]]) if codes else logits


def _agreement(a, b):
    """(top-1 agreement, max |a - b| / (max b - min b))."""
    return ((a.argmax(1) == b.argmax(1)).float().mean().item(),
            ((a - b).abs().max() / (b.max() - b.min())).item())


def _run_hooked(model, x, pre_hook):
    """``model(x)`` without gradients, ``pre_hook`` a forward pre-hook on every quantized
    layer for that call."""
    hooks = [layer.register_forward_pre_hook(pre_hook) for _, layer in quantized_layers(model)]
    try:
        with torch.no_grad():
            return model(x)
    finally:
        for h in hooks:
            h.remove()


def _codes_of(model, x):
    """The integer input codes of every quantized layer of ``model`` on ``x`` (execution
    order) and its logits."""
    seen: list[torch.Tensor] = []
    out = _run_hooked(model, x, lambda layer, args: seen.append(
        layer.input_quantizer.int_codes(args[0])[0].long()))
    return out, seen


def _assert_same_up_to_ties(model, x, logits, codes, label=""):
    """``logits``/``codes`` (another implementation's output and input codes of each quantized
    layer on ``x``) are what ``model`` computes, up to float32 rounding:

    - run ``model`` with each quantized layer fed the other implementation's codes (times the
      step): its own code of every input differs from the other's only where the value lies
      within ``qdq_parity.TIE`` of a rounding boundary, and then by exactly one;
    - the logits, computed by the last layer from identical codes, differ by no more than the
      float32 error bound of that layer's sums, ``(K + 2) * eps * (|x| @ |W|^T + |b|)``.

    Comparing raw logits instead depends on the BLAS build: one code flipped at a tie moves a
    logit by a whole step times a weight, which no fixed tolerance bounds.
    """
    layers = [layer for _, layer in quantized_layers(model)]
    assert len(codes) == len(layers), (label, len(codes), len(layers))
    flips, total, last = 0, 0, {}

    def feed(layer, args):
        nonlocal flips, total
        i = layers.index(layer)
        fed, differ = codes_up_to_ties(layer.input_quantizer, args[0], codes[i], (label, i))
        flips, total = flips + differ, total + fed.numel()
        last.update(x=fed)
        return (fed, *args[1:])

    ref = _run_hooked(model, x, feed)
    fc = layers[-1]
    assert isinstance(fc, nn.Linear), "the bound below is for a final linear layer"
    with torch.no_grad():
        xq = fc.input_quantizer(last["x"]).abs()
        wq = fc.weight_quantizer(fc.weight).abs()
        bias = fc.bias.abs() if fc.bias is not None else 0.0
        bound = (fc.in_features + 2) * torch.finfo(torch.float32).eps * (xq @ wq.T + bias)
    excess = ((logits - ref).abs() - bound).max().item()
    assert excess <= 0, (label, excess)
    return flips, total


def test_parity_check_accepts_ties_only(qmodels, cifar):
    """The check above passes a model against itself and fails on one code moved by one
    step away from a rounding tie, or on a logit moved by more than float rounding."""
    x = cifar[2][:16]
    model = qmodels["lsq4"]
    out, codes = _codes_of(model, x)
    assert _assert_same_up_to_ties(model, x, out, codes) == (0, sum(c.numel() for c in codes))
    moved = [c.clone().contiguous() for c in codes]
    moved[1].view(-1)[moved[1].view(-1).argmax()] -= 1  # a clipped value: far from any tie
    with pytest.raises(AssertionError, match="away from a tie"):
        _assert_same_up_to_ties(model, x, out, moved)
    with pytest.raises(AssertionError):
        _assert_same_up_to_ties(model, x, out + 1e-3 * out.abs().max(), codes)


# -- ONNX parity on real images ---------------------------------------------------------------
@pytest.mark.parametrize("name", ["lsq4", "lsq2", "nipq_mixed"])
def test_onnx_qdq_parity_on_cifar(qmodels, logits, cifar, tmp_path, name):
    _, _, xte, yte = cifar
    model, ref = qmodels[name], logits[name]
    report = export(model, tmp_path / "m.onnx", "onnx", example_input=xte[:2])
    out, codes = _ort_run(tmp_path / "m.onnx", xte, codes=True)
    flips, total = _assert_same_up_to_ties(model, xte, out, codes, name)
    agree, rel = _agreement(out, ref)
    print(f"\n{name}: acc torch {_top1(ref, yte):.3f}, onnxruntime top-1 agreement "
          f"{agree:.4f}, max|diff|/range {rel:.2e}; {flips} of {total} input codes rounded "
          "the other way at a tie")
    assert agree >= 0.99  # ties move a few borderline images at most

    proto = onnx.load(str(tmp_path / "m.onnx"))
    layers = quantized_layers(model)
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("QuantizeLinear") == report["quantize_linear"] == len(layers)
    assert ops.count("DequantizeLinear") == 2 * len(layers)
    inits = {i.name: i for i in proto.graph.initializer}
    for lname, _ in layers:  # weights are integer initializers, no FP copy of them
        assert inits[f"{lname}.weight_quantizer.codes"].data_type == onnx.TensorProto.INT8
        assert f"{lname}.weight" not in inits
    bits = {q.bits for n, q in named_quantizers(model) if n.endswith("input_quantizer")}
    if min(bits) < 8:
        assert "Clip" in ops  # sub-8-bit activation ranges clipped in the float domain
    assert proto.metadata_props[0].key == "qtrainer"


# -- int format -------------------------------------------------------------------------------
INT_CASES = {
    "lsq2": ("lsq", 2, {}, False),
    "lsq4": ("lsq", 4, {}, False),
    "lsq8": ("lsq", 8, {}, False),
    "lsq12_per_channel": ("lsq", 12, {"per_channel": True}, False),
    "tempering4": ("tempering", 4, {}, False),
    "nipq4_fixed": ("nipq", 4, {}, False),
    "nipq_mixed": ("nipq", 4, {"learn_bits": True}, True),
}


def _random_quantized(method, bits, kwargs, mixed, x, first_last=8):
    torch.manual_seed(1)
    model = resnet20()
    quantize_model(model, method=method, weight_bits=bits, act_bits=bits, method_kwargs=kwargs,
                   first_last_bits=first_last, example_input=x[:2])
    if mixed:
        for i, (_, q) in enumerate(named_quantizers(model)):
            _set_bits(q, [2, 3, 4, 5, 6, 7, 8, 9, 12][i % 9])
    initialize_quantizers(model, x)
    for i, (_, q) in enumerate(named_quantizers(model)):
        if isinstance(q, NIPQQuantizer) and mixed and i % 2:
            q.freeze_bits()  # some frozen, some still learned
    return model.eval()


@pytest.mark.parametrize("case", list(INT_CASES))
def test_int_round_trip_bit_identical(cifar, tmp_path, case):
    _, _, xte, _ = cifar
    x = xte[:32]
    method, bits, kwargs, mixed = INT_CASES[case]
    model = _random_quantized(method, bits, kwargs, mixed, x)
    with torch.no_grad():
        ref = model(x)
    path = tmp_path / "m.safetensors"
    report = export(model, path, metadata={"recipe_hash": "abc123", "note": case})
    loaded = load_int(path, resnet20())
    with torch.no_grad():
        out = loaded(x)
    assert torch.equal(out, ref)
    assert not loaded.training and all(q.hard for _, q in named_quantizers(loaded))
    assert report["file_bytes"] == os.path.getsize(path)
    assert sum(c["share"] for c in report["categories"].values()) == pytest.approx(1.0)

    from safetensors import safe_open

    header = read_header(path)
    assert header["recipe_hash"] == "abc123" and header["metadata"]["note"] == case
    with safe_open(str(path), "pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}
    seen_bits = set()
    for entry, (name, layer) in zip(header["layers"], quantized_layers(model)):
        assert entry["name"] == name
        wq, w = layer.weight_quantizer, entry["weight"]
        assert entry["weight_bits"] == wq.bits == w["bits"] and w["code_range"] == list(wq.code_range)
        assert entry["act_bits"] == layer.input_quantizer.bits
        assert entry["signed_input"] == layer.input_quantizer.signed
        assert entry["method"] == method and entry["weight_shape"] == list(layer.weight.shape)
        codes = stored[name + ".weight.codes"]
        expect = {"packed": torch.uint8, "int8": torch.int8, "uint8": torch.uint8,
                  "int16": torch.int16}[storage_dtype(wq.bits, *wq.code_range)]
        assert codes.dtype == expect
        if wq.bits <= 4:
            assert codes.dim() == 1 and codes.numel() == math.ceil(layer.weight.numel() * wq.bits / 8)
            got = unpack_codes(codes, wq.bits, wq.code_range[0], layer.weight.numel())
        elif wq.bits <= 8:
            assert codes.dtype == torch.int8
            got = codes.reshape(-1).long()
        else:
            assert codes.dtype == torch.int16
            got = codes.reshape(-1).long()
        want, _ = wq.int_codes(layer.weight)
        assert torch.equal(got, want.reshape(-1).long())
        assert got.min() >= wq.code_range[0] and got.max() <= wq.code_range[1]
        seen_bits.add(wq.bits)
    if mixed:
        assert len(seen_bits) >= 5  # per-layer bit-widths really differ


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("n", [1, 3, 7, 1001])
@pytest.mark.parametrize("signed", [True, False])
def test_pack_round_trip_exact(bits, n, signed):
    lo = -(2 ** (bits - 1)) if signed else 0
    g = torch.Generator().manual_seed(bits * 1000 + n)
    codes = torch.randint(lo, lo + 2**bits, (n,), generator=g)
    codes[0] = lo
    packed = pack_codes(codes, bits, lo)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(n * bits / 8)
    assert torch.equal(unpack_codes(packed, bits, lo, n), codes)
    if bits == 4 and n >= 3:  # two codes per byte, low nibble first, offset binary
        assert packed[0].item() == (codes[0] - lo) | ((codes[1] - lo) << 4)
    with pytest.raises(ValueError):
        pack_codes(torch.tensor([lo + 2**bits]), bits, lo)


def test_storage_dtypes_are_narrowest():
    assert storage_dtype(4, -8, 7) == "packed" and storage_dtype(2, 0, 3) == "packed"
    assert storage_dtype(8, -128, 127) == "int8" and storage_dtype(5, -15, 15) == "int8"
    assert storage_dtype(8, 0, 255) == "uint8"
    assert storage_dtype(9, -256, 255) == "int16" and storage_dtype(16, -32768, 32767) == "int16"
    assert storage_dtype(16, 0, 65535) == "uint16"


def test_resnet18_int_file_tracks_bit_width(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    x = torch.randn(2, 3, 64, 64)
    quantize_model(model, method="lsq", weight_bits=4, act_bits=4, example_input=x[:1])
    initialize_quantizers(model, x)
    model.eval()
    path = tmp_path / "r18.safetensors"
    report = export(model, path)
    fp32 = sum(t.numel() * 4 if t.is_floating_point() else t.numel() * t.element_size()
               for t in torchvision.models.resnet18(weights=None).state_dict().values())
    cats = report["categories"]
    assert report["fp32_bytes"] == fp32
    assert set(cats) >= {"layers_4bit", "layers_8bit", "batchnorm", "quant_params", "header"}
    excl = cats["batchnorm"]["bytes"] + cats["layers_8bit"]["bytes"]
    excl_fp = cats["batchnorm"]["fp32_bytes"] + cats["layers_8bit"]["fp32_bytes"]
    ratio = (report["file_bytes"] - excl) / (fp32 - excl_fp)
    print(f"\nResNet-18 W4A4 (8-bit first/last): file {report['file_bytes'] / 1e6:.2f} MB, FP32 "
          f"{fp32 / 1e6:.2f} MB (x{report['ratio']:.3f}); BN + 8-bit layers = "
          f"{report['excluded_share']:.1%} of the file; the rest is x{ratio:.4f} of its FP32 size")
    assert ratio == pytest.approx(report["ratio_excluding_bn_8bit"])
    assert ratio < 1 / 7
    assert report["excluded_share"] == pytest.approx((cats["batchnorm"]["bytes"] + cats["layers_8bit"]["bytes"])
                                                     / report["file_bytes"])
    assert cats["layers_4bit"]["bytes"] * 8 == pytest.approx(cats["layers_4bit"]["fp32_bytes"], rel=1e-3)
    loaded = load_int(path, torchvision.models.resnet18(weights=None))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_onnx_above_8_bits_uses_int32_codes_and_float_fake_quant(cifar, tmp_path):
    _, _, xte, _ = cifar
    torch.manual_seed(0)
    model = SmallCNN(width=8)
    quantize_model(model, weight_bits=12, act_bits=12, method_kwargs={"per_channel": True},
                   example_input=xte[:2])
    initialize_quantizers(model, xte[:128])
    model.eval()
    report = export(model, tmp_path / "m.onnx", "onnx", example_input=xte[:2], opset=13)
    assert (report["act_qdq"], report["act_float"], report["weight_dq"]) == (2, 2, 4)  # 8-bit first/last
    proto = onnx.load(str(tmp_path / "m.onnx"))
    types = {i.name: i.data_type for i in proto.graph.initializer}
    assert types["features.3.weight_quantizer.codes"] == onnx.TensorProto.INT32
    assert types["features.0.weight_quantizer.codes"] == onnx.TensorProto.INT8
    assert "Round" in [n.op_type for n in proto.graph.node]
    out, codes = _ort_run(tmp_path / "m.onnx", xte[:200], codes=True)
    _assert_same_up_to_ties(model, xte[:200], out, codes)


# -- TorchScript / ExportedProgram ------------------------------------------------------------
def test_torchscript_and_exported_program_equal_eval_model(qmodels, cifar, tmp_path):
    _, _, xte, _ = cifar
    x = xte[:200]
    for name in ("lsq4", "nipq_mixed"):
        model = qmodels[name]
        with torch.no_grad():
            ref = model(x)
        export(model, tmp_path / f"{name}.pt", "torchscript", example_input=xte[:2])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            ts = torch.jit.load(str(tmp_path / f"{name}.pt"))
        with torch.no_grad():
            assert torch.equal(ts(x), ref), name
    model = qmodels["nipq_mixed"]
    export(model, tmp_path / "m.pt2", "exported_program", example_input=xte[:2])
    program = torch.export.load(str(tmp_path / "m.pt2"))
    with torch.no_grad():
        assert torch.equal(program.module()(x), model(x))  # dynamic batch: 2 at export, 200 here


# -- BN folding -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["lsq4", "nipq_mixed"])
def test_fold_bn_parity(qmodels, logits, cifar, tmp_path, name):
    _, _, xte, yte = cifar
    model, ref = qmodels[name], logits[name]
    acc = _top1(ref, yte)
    folded = {}
    for bias in ("float", "int"):
        work = eval_copy(model)
        pairs = fold_batchnorm(work, bias)
        assert [p[1] for p in pairs] == ["features.1", "features.4", "features.7"]
        assert not any(isinstance(m, nn.BatchNorm2d) for m in work.modules())
        out, codes = _codes_of(work, xte)
        agree, rel = _agreement(out, ref)
        acc_folded = _top1(out, yte)
        print(f"\n{name} folded ({bias} bias) vs unfolded (torch): top-1 agreement {agree:.4f}, "
              f"max|diff|/range {rel:.2e}, accuracy {acc:.3f} -> {acc_folded:.3f}", end="")
        if bias == "float":  # the same function up to float rounding
            _assert_same_up_to_ties(model, xte, out, codes, f"{name} folded")
        else:  # the bias on the int32 grid s_in * s_w moves some codes by one step
            assert agree >= 0.85 and abs(acc - acc_folded) <= 0.03
        for (n, a), (_, b) in zip(quantized_layers(model), quantized_layers(work)):
            ca, _ = a.weight_quantizer.int_codes(a.weight)
            cb, sb = b.weight_quantizer.int_codes(b.weight)
            assert torch.equal(ca, cb), n  # folding keeps the integer codes
            assert sb.numel() == b.weight.shape[0] or n == "fc"  # per-channel steps where folded
        folded[bias] = out

        # onnxruntime runs the folded model as PyTorch does
        report = export(model, tmp_path / f"{bias}.onnx", "onnx", example_input=xte[:2], fold_bn=bias)
        proto = onnx.load(str(tmp_path / f"{bias}.onnx"))
        ops = [n.op_type for n in proto.graph.node]
        assert "BatchNormalization" not in ops
        if bias == "int":  # int32 bias codes through DequantizeLinear
            assert report["bias_int32"] == 3 and report["bias_add"] == 1  # fc keeps its float bias
            assert {i.data_type for i in proto.graph.initializer if "bias_dq.codes" in i.name} == {onnx.TensorProto.INT32}
        else:  # float bias added after the conv: onnxruntime does not round it
            assert report["bias_add"] >= 3 and ops.count("Add") >= 3
        ort_out, ort_codes = _ort_run(tmp_path / f"{bias}.onnx", xte[:500], codes=True)
        flips, total = _assert_same_up_to_ties(work, xte[:500], ort_out, ort_codes, f"{name} {bias}")
        print(f"; onnxruntime vs folded torch: {flips} of {total} codes differ, at ties", end="")

    # int: load_int rebuilds the folded model bit-identically (fold_bn=True: float bias)
    report = export(model, tmp_path / "f.safetensors", fold_bn=True)
    assert "batchnorm" not in report["categories"] and len(report["folded_bn"]) == 3
    loaded = load_int(tmp_path / "f.safetensors", SmallCNN(width=16))
    with torch.no_grad():
        assert torch.equal(loaded(xte), folded["float"])


# -- bad input --------------------------------------------------------------------------------
def test_training_mode_warns_and_leaves_model_unchanged(qmodels, cifar, tmp_path):
    _, _, xte, _ = cifar
    model = copy.deepcopy(qmodels["nipq_mixed"])
    model.train()
    set_quantizers(model, hard=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match="training mode"):
        export(model, tmp_path / "m.safetensors")
    assert model.training and all(m.training for m in model.modules())
    assert not any(q.hard for _, q in named_quantizers(model))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # the file holds the eval model with hard quantization
    model.eval()
    loaded = load_int(tmp_path / "m.safetensors", SmallCNN(width=16))
    with torch.no_grad():
        assert torch.equal(loaded(xte[:50]), model(xte[:50]))


def test_unknown_format_and_bad_models(qmodels, tmp_path):
    model = qmodels["lsq4"]
    with pytest.raises(ValueError, match=r"allowed: int, onnx, torchscript, exported_program.*did you mean 'onnx'"):
        export(model, tmp_path / "m", "onxx")
    with pytest.raises(ValueError, match="no quantized layer"):
        export(SmallCNN(), tmp_path / "m")
    with pytest.raises(ValueError, match="example_input"):
        export(model, tmp_path / "m.onnx", "onnx")
    with pytest.raises(ValueError, match="opset"):
        export(model, tmp_path / "m.onnx", "onnx", example_input=torch.zeros(1, 3, 32, 32), opset=11)
    fresh = SmallCNN()
    quantize_model(fresh, example_input=torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="initialize_quantizers"):
        export(fresh, tmp_path / "m")
    with pytest.raises(ValueError, match="JSON"):
        export(model, tmp_path / "m", metadata={"x": object()})
    assert not os.path.exists(tmp_path / "m")


def test_load_int_damaged_files(qmodels, tmp_path):
    path = tmp_path / "m.safetensors"
    export(qmodels["lsq4"], path)
    data = path.read_bytes()
    cases = {
        "truncated.safetensors": data[: len(data) // 2],
        "short.safetensors": data[:5],
        "header.safetensors": data[:8] + data[8:40].replace(b'"', b"#") + data[40:],
        "payload.safetensors": data[:-10] + bytes([data[-10] ^ 0xFF]) + data[-9:],
    }
    from safetensors import safe_open
    from safetensors.torch import save

    with safe_open(str(path), "pt") as f:  # valid JSON, a layer's bit-width edited
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    edited = meta["qtrainer"].replace('"weight_bits": 4', '"weight_bits": 3', 1)
    assert edited != meta["qtrainer"]
    meta["qtrainer"] = edited
    cases["edited.safetensors"] = save(tensors, metadata=meta)
    for name, blob in cases.items():
        bad = tmp_path / name
        bad.write_bytes(blob)
        with pytest.raises(ValueError, match=name):
            load_int(bad, SmallCNN(width=16))
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="plain.safetensors.*header"):
        load_int(tmp_path / "plain.safetensors", SmallCNN(width=16))
    for name in ("payload.safetensors", "edited.safetensors"):
        with pytest.raises(ValueError, match="checksum"):
            load_int(tmp_path / name, SmallCNN(width=16))
    with pytest.raises(ValueError, match="features.0"):
        load_int(path, SmallCNN(width=8))  # different architecture
    with pytest.raises(ValueError, match="already holds quantized layers"):
        load_int(path, copy.deepcopy(qmodels["lsq4"]))
    with pytest.raises(FileNotFoundError):
        load_int(tmp_path / "missing.safetensors", SmallCNN(width=16))


# -- atomic writes ----------------------------------------------------------------------------
def test_atomic_write_keeps_previous_file(tmp_path):
    path = tmp_path / "a.bin"
    write_bytes_atomic(path, b"old")
    with pytest.raises(RuntimeError):
        with atomic_write(path) as f:
            f.write(b"partial")
            raise RuntimeError("writer died")
    assert path.read_bytes() == b"old"
    write_text_atomic(path, "new")
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["a.bin"]


def test_export_failure_mid_write_leaves_previous_file(qmodels, cifar, tmp_path, monkeypatch):
    _, _, xte, _ = cifar
    model = qmodels["lsq4"]
    path = tmp_path / "m.safetensors"
    export(model, path)
    good = path.read_bytes()

    import qtrainer.export.int_format as int_format

    def dying_writer(p, data):
        with atomic_write(p) as f:
            f.write(data[: len(data) // 2])
            raise OSError("disk full")

    monkeypatch.setattr(int_format, "write_bytes_atomic", dying_writer)
    with pytest.raises(OSError, match="disk full"):
        export(qmodels["lsq2"], path)
    assert path.read_bytes() == good and os.listdir(tmp_path) == ["m.safetensors"]
    load_int(path, SmallCNN(width=16))  # still the complete previous export

    onnx_path = tmp_path / "m.onnx"
    onnx_path.write_bytes(b"previous")

    def dying_export(model, args, f, **kwargs):
        with open(f, "wb") as out:
            out.write(b"half an onnx file")
        raise RuntimeError("exporter crashed")

    monkeypatch.setattr(torch.onnx, "export", dying_export)
    with pytest.raises(RuntimeError, match="exporter crashed"):
        export(model, onnx_path, "onnx", example_input=xte[:2])
    assert onnx_path.read_bytes() == b"previous"
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.safetensors"]
