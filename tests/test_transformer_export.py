"""Exports of a quantized transformer (embedding, nn.TransformerEncoder with a padding mask,
head): the int file round trip is bit-identical, and onnxruntime runs the QDQ ONNX model as
PyTorch does, layer by layer (input codes equal up to float32 ties, logits within the float32
error bound of the head's sums)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import qtrainer
from qtrainer.export import export, load_int
from qtrainer.nn import QuantizedLayer

from qdq_parity import codes_up_to_ties
from test_transformer import Holder, TextEncoder, batch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

pytestmark = pytest.mark.usefixtures("one_thread")


def quantized_encoder(seed=0, causal=False, **kwargs):
    torch.manual_seed(seed)
    model = TextEncoder(vocab=20, width=16, heads=2, layers=2, causal=causal)
    ids, pad = batch(n=8, t=7)
    qtrainer.quantize_model(model, example_input=(ids, pad), **kwargs)
    qtrainer.initialize_quantizers(model, ids, pad)
    return model.eval(), ids, pad


def _input_sites(model):
    return [layer for _, layer in model.named_modules()
            if isinstance(layer, QuantizedLayer) and layer.input_quantizer is not None]


def _ort_run(path, ids, pad):
    """onnxruntime's logits and the integer codes of every QuantizeLinear, in graph order."""
    proto = onnx.load(str(path))
    taps = [n.output[0] for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    proto.graph.output.extend(onnx.ValueInfoProto(name=t) for t in taps)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    out = sess.run(None, {"input_0": ids.numpy(), "input_1": pad.numpy()})
    return torch.from_numpy(out[0]), [torch.from_numpy(c.astype(np.int64)) for c in out[1:]]


@pytest.mark.parametrize("causal", [False, True], ids=["padding-mask", "causal+padding-mask"])
def test_onnx_qdq_matches_pytorch_layer_by_layer_with_masks(tmp_path, causal):
    model, ids, pad = quantized_encoder(causal=causal)
    path = tmp_path / "encoder.onnx"
    info = export(model, path, format="onnx", example_input=(ids, pad))
    sites = _input_sites(model)
    assert info["weight_dq"] == 10 and info["act_qdq"] == len(sites) == 9
    logits, codes = _ort_run(path, ids, pad)
    assert len(codes) == len(sites)

    flips, last = 0, {}

    def feed(layer, args):
        """Check this layer's own input codes against onnxruntime's, then feed it those."""
        nonlocal flips
        i = sites.index(layer)
        fed, differ = codes_up_to_ties(layer.input_quantizer, args[0], codes[i], i)
        flips += differ
        last["x"] = fed
        if isinstance(layer, nn.MultiheadAttention):  # self-attention: query is key is value
            assert args[1] is args[0] and args[2] is args[0]
            return (fed, fed, fed, *args[3:])
        return (fed, *args[1:])

    hooks = [layer.register_forward_pre_hook(feed) for layer in sites]
    with torch.no_grad():
        ref = model(ids, pad)
    for h in hooks:
        h.remove()
    head = model.head
    with torch.no_grad():
        xq = head.input_quantizer(last["x"]).abs()
        wq = head.weight_quantizer(head.weight).abs()
        bound = (head.in_features + 2) * torch.finfo(torch.float32).eps * (xq @ wq.T + head.bias.abs())
    assert ((logits - ref).abs() - bound).max().item() <= 0
    total = sum(c.numel() for c in codes)
    assert flips <= total // 100, (flips, total)  # ties are rare


@pytest.mark.parametrize("kwargs", [{}, {"act_bits": None}, {"attention_matmul_bits": 8},
                                    {"method": "nipq", "first_last_bits": "same"}])
def test_int_file_round_trip_is_bit_identical(tmp_path, kwargs):
    model, ids, pad = quantized_encoder(**kwargs)
    path = tmp_path / "encoder.safetensors"
    export(model, path, format="int")
    with torch.no_grad():
        expected = model(ids, pad)
    fresh = TextEncoder(vocab=20, width=16, heads=2, layers=2)
    loaded = load_int(path, fresh)
    with torch.no_grad():
        got = loaded(ids, pad)
    assert torch.equal(got, expected)
    assert type(loaded.encoder.layers[0].self_attn.out_proj).__name__ == "QuantLinear"


def test_onnx_with_attention_matmul_quantizers_runs_in_onnxruntime(tmp_path):
    model, ids, pad = quantized_encoder(attention_matmul_bits=8)
    path = tmp_path / "encoder.onnx"
    info = export(model, path, format="onnx", example_input=(ids, pad))
    assert info["act_qdq"] == 9 + 2 * 4  # the layer inputs and q, k, softmax, v of 2 layers
    logits, _ = _ort_run(path, ids, pad)
    with torch.no_grad():
        ref = model(ids, pad)
    assert (logits.argmax(1) == ref.argmax(1)).all()


def test_separate_qkv_attention_exports_traced_and_refuses_int_and_onnx(tmp_path):
    torch.manual_seed(0)
    model = Holder(nn.MultiheadAttention(8, 2, kdim=6, vdim=6, batch_first=True))
    x, memory = torch.randn(3, 5, 8), torch.randn(3, 4, 6)
    qtrainer.quantize_model(model, example_input=(x, memory, memory))
    qtrainer.initialize_quantizers(model, x, memory, memory)
    model.eval()
    with torch.no_grad():
        expected = model(x, memory, memory)[0]
    export(model, tmp_path / "attn.pt", format="torchscript", example_input=(x, memory, memory))
    traced = torch.jit.load(str(tmp_path / "attn.pt"))
    with torch.no_grad():
        assert torch.equal(traced(x, memory, memory)[0], expected)
    for fmt, name in (("int", "attn.safetensors"), ("onnx", "attn.onnx")):
        with pytest.raises(ValueError, match="separate q/k/v weights"):
            export(model, tmp_path / name, format=fmt, example_input=(x, memory, memory))
