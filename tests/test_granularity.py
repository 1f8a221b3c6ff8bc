"""Per-channel and group-wise steps (``method.granularity``, ``group_size``,
``grad_scale_count``) through the quantizers, surgery, recipes and the int/ONNX exports, on a
model written the way a user writes one (a small transformer-style MLP block with a conv stem).

The op-level checks (forward and gradients of every contract against the closed forms, torch
and Triton) are in tests/test_kernels.py (``test_*group*``, ``test_nipq_rows_*``).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from lightning import pytorch as pl
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from qtrainer import QuantizationCallback, quantize_model, set_quantizers
from qtrainer.export import export, load_int
from qtrainer.export._common import quantized_layers
from qtrainer.quantizers import LSQQuantizer, NIPQQuantizer, TemperingQuantizer, formulas
from qtrainer.recipes import load_recipe
from threads import one_thread  # noqa: F401 (autouse: one torch thread)


class TokenMixer(nn.Module):
    """A user's model: a conv stem over a 4x8x8 image, then a pre-norm MLP block on 16 tokens
    of 32 features and a linear head (every layer's inputs per output row a multiple of 32)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(4, 32, 4, stride=2)  # 4 * 4 * 4 = 64 inputs per output row
        self.norm = nn.LayerNorm(32)
        self.up = nn.Linear(32, 64)
        self.down = nn.Linear(64, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        t = self.stem(x).flatten(2).transpose(1, 2)  # [B, 9, 32]
        t = t + self.down(F.gelu(self.up(self.norm(t))))
        return self.head(t.mean(1))


def _quantized(method="lsq", **kw):
    torch.manual_seed(0)
    model = TokenMixer()
    args = {"granularity": "group", "group_size": 32, **kw}
    quantize_model(model, method=method, weight_bits=4, act_bits=8, method_kwargs=args,
                   first_last_bits="same", example_input=torch.randn(2, 4, 8, 8))
    return model


# -- quantizers ----------------------------------------------------------------------------------

@pytest.mark.parametrize("init", ["lsq", "minmax"])
def test_lsq_init_per_group(init):
    """ALGORITHMS.md's init applied to each group: ``2 mean|v| / sqrt(Q_P)`` or the minmax step
    of that group's elements only."""
    torch.manual_seed(1)
    w = torch.randn(6, 64) * torch.linspace(0.1, 3.0, 12).repeat_interleave(32).view(6, 64)
    q = LSQQuantizer(4, True, granularity="group", group_size=32, shape=(6, 64), init=init)
    q.initialize(w)
    groups = w.reshape(12, 32)
    if init == "lsq":
        want = 2 * groups.abs().mean(1) / math.sqrt(7)
    else:
        want = torch.maximum(groups.amax(1) / 7, -groups.amin(1) / 8)
    torch.testing.assert_close(q.step.detach(), want, rtol=2e-7, atol=0)
    assert q.step.detach().max() / q.step.detach().min() > 10  # really one step per group


def test_nipq_init_per_group_and_channel():
    torch.manual_seed(2)
    w = torch.randn(4, 3, 2, 2)
    g = NIPQQuantizer(4, True, role="weight", granularity="group", group_size=6, shape=(4, 3, 2, 2))
    c = NIPQQuantizer(4, True, role="weight", granularity="channel", channels=4)
    g.initialize(w)
    c.initialize(w)
    torch.testing.assert_close(g.alpha, w.reshape(8, 6).abs().amax(1), rtol=1e-6, atol=0)
    torch.testing.assert_close(c.alpha, w.reshape(4, 12).abs().amax(1), rtol=1e-6, atol=0)
    # activations keep one alpha whatever the recipe's granularity
    a = NIPQQuantizer(4, False, role="input", granularity="group", group_size=6)
    assert a.theta_a.shape == (1,)


@pytest.mark.parametrize("cls", [LSQQuantizer, TemperingQuantizer])
def test_grad_scale_count_per_step_or_whole_tensor(cls):
    """``per_step`` counts the elements sharing one step (numel / C per channel, group_size per
    group), ``tensor`` the whole weight (lsq-net); the step gradients differ by exactly that
    factor (up to the fp32 product with ``g``)."""
    torch.manual_seed(3)
    w = torch.randn(8, 96)
    cases = {("channel", "per_step"): 96, ("channel", "tensor"): 768,
             ("group", "per_step"): 32, ("group", "tensor"): 768}
    grads = {}
    for (gran, count), n in cases.items():
        q = cls(4, True, granularity=gran, group_size=32, shape=(8, 96), grad_scale_count=count)
        q.eval()
        assert q.grad_scale_value(w) == 1 / math.sqrt(n * 7)
        q(w).square().sum().backward()
        grads[gran, count] = q.step.grad.clone()
    for gran, ratio in (("channel", math.sqrt(8)), ("group", math.sqrt(24))):
        torch.testing.assert_close(grads[gran, "per_step"], grads[gran, "tensor"] * ratio,
                                   rtol=4e-7, atol=0)


def test_bad_arguments_name_the_value_and_what_is_allowed():
    with pytest.raises(ValueError, match="granularity='grup'.*did you mean 'group'"):
        LSQQuantizer(4, True, granularity="grup")
    with pytest.raises(ValueError, match="group_size=0"):
        LSQQuantizer(4, True, granularity="group", group_size=0, shape=(4, 8))
    with pytest.raises(ValueError, match="needs the weight's shape"):
        LSQQuantizer(4, True, granularity="group", group_size=4)
    with pytest.raises(ValueError, match="contradict"):
        LSQQuantizer(4, True, per_channel=True, granularity="group", shape=(4, 8), group_size=4)
    q = LSQQuantizer(4, True, granularity="group", group_size=4, shape=(4, 8))
    with pytest.raises(ValueError, match="do not match a tensor shaped"):
        q(torch.randn(4, 12))


# -- surgery and recipes -----------------------------------------------------------------------

def test_quantized_weight_tensors_and_step_counts():
    model = _quantized()
    counts = {name: layer.weight_quantizer.step.numel() for name, layer in quantized_layers(model)}
    assert counts == {"stem": 32 * 64 // 32, "up": 64, "down": 32 * 64 // 32, "head": 10}
    for _, layer in quantized_layers(model):
        assert layer.input_quantizer.step.numel() == 1  # activations: one step


def test_a_group_size_that_does_not_divide_names_the_layer_and_leaves_the_model():
    model = TokenMixer()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as info:
        quantize_model(model, method="lsq", weight_bits=4, act_bits=8,
                       method_kwargs={"granularity": "group", "group_size": 48},
                       example_input=torch.randn(2, 4, 8, 8))
    msg = str(info.value)
    for fragment in ("'stem'", "Conv2d", "group_size=48", "64 input elements", "1, 2, 4, 8, 16, 32, 64"):
        assert fragment in msg, msg
    assert not any("quantizer" in k for k in model.state_dict())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_recipe_keys_reach_the_quantizers():
    recipe = load_recipe("lsq-w4-g128", {"method.group_size": 32, "first_last.bits": "same"})
    model = TokenMixer()
    quantize_model(model, **recipe.surgery_kwargs(), example_input=torch.randn(2, 4, 8, 8))
    qs = [layer.weight_quantizer for _, layer in quantized_layers(model)]
    assert {(q.granularity, q.group_size, q.grad_scale_count, q.bits) for q in qs} == {
        ("group", 32, "per_step", 4)}


@pytest.mark.parametrize("method,kw", [("tempering", {}), ("nipq", {"noise": "histogram"})])
def test_group_wise_model_compiles_without_graph_breaks(method, kw):
    """``torch.compile`` (Dynamo + AOTAutograd) traces group-wise quantizers through the ops'
    custom ops (their fake shapes per group) in one graph, with eager's values."""
    from torch._dynamo.utils import counters

    model = _quantized(method, **kw)
    x = torch.randn(4, 4, 8, 8)
    with torch.no_grad():
        model(x)
    model.train()
    results = []
    torch._dynamo.reset()
    counters.clear()
    for m in (model, torch.compile(model, backend="aot_eager", fullgraph=True)):
        for p in model.parameters():
            p.grad = None
        torch.manual_seed(1)
        y = m(x)
        y.square().sum().backward()
        results.append((y.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                     if p.grad is not None}))
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    (y0, g0), (y1, g1) = results
    assert torch.equal(y0, y1) and g0.keys() == g1.keys()
    param = "theta_a" if method == "nipq" else "step"
    assert g0[f"down.weight_quantizer.{param}"].numel() == 64  # one per group of 32
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-6, atol=1e-7)


# -- codes and exports -------------------------------------------------------------------------

def _trained(method):
    """A few optimizer steps so steps and weights move away from their init."""
    model = _quantized(method)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    torch.manual_seed(4)
    x, y = torch.randn(16, 4, 8, 8), torch.randint(0, 10, (16,))
    model.train()
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    set_quantizers(model, hard=True)
    return model, x


@pytest.mark.parametrize("method", ["lsq", "tempering", "nipq"])
def test_group_codes_in_range_and_exact_round_trip(method):
    model, _ = _trained(method)
    for _, layer in quantized_layers(model):
        q = layer.weight_quantizer
        codes, scale = q.int_codes(layer.weight.detach())
        lo, hi = q.code_range
        assert codes.shape == layer.weight.shape and scale.numel() == q.step_size.numel()
        assert torch.equal(codes, codes.round()) and lo <= codes.min() and codes.max() <= hi
        assert codes.unique().numel() > 4  # the groups use the range, not one code
        assert torch.equal(formulas.dequantize(codes, scale), q(layer.weight.detach()))


@pytest.mark.parametrize("method", ["lsq", "nipq"])
def test_int_export_round_trip_with_group_steps(method, tmp_path):
    """save -> load_int into a fresh model: the same eval outputs bit for bit, the scales
    stored per group (``[R]``), 4-bit codes packed."""
    model, x = _trained(method)
    with torch.no_grad():
        want = model(x)
    path = tmp_path / "m.safetensors"
    export(model, path, format="int")
    fresh = load_int(path, TokenMixer())
    with torch.no_grad():
        assert torch.equal(fresh(x), want)
    header = __import__("qtrainer.export", fromlist=["read_header"]).read_header(path)
    stem = next(e for e in header["layers"] if e["name"] == "stem")
    assert stem["weight"]["scale_count"] == 64 and stem["weight"]["storage"] == "packed"
    assert stem["weight"]["kwargs"]["granularity"] == "group"


@pytest.mark.parametrize("method", ["lsq", "nipq"])
def test_onnx_group_steps_match_onnxruntime(method, tmp_path):
    """Group-wise weights exported as per-axis DequantizeLinear of ``[groups, group_size]``
    codes and a Reshape (opset <= 20 has no blocked DQ): onnxruntime's output equals the eval
    model's up to the reassociation of the layer sums (about 1e-7 of the output's size; the
    bound 1e-4 of it is far below what one wrong weight code, a whole step of about 1e-2
    times an input, would move)."""
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    model, x = _trained(method)
    path = tmp_path / "m.onnx"
    report = export(model, path, format="onnx", example_input=x[:2])
    assert report["dequantize_linear"] >= 4
    graph = onnx.load(path).graph
    assert any(n.op_type == "Reshape" for n in graph.node)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(sess.run(None, {"input": x.numpy()})[0])
    with torch.no_grad():
        want = model(x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4 * want.abs().max().item())
    assert (got.argmax(1) == want.argmax(1)).all()


# -- learning ------------------------------------------------------------------------------------

def _majority_task(n: int, seed: int):
    """Sequences of 12 tokens: 7 drawn from classes 0..3 with one class given a strict
    majority, 5 noise tokens 4..7, shuffled; the label is the majority class (known answer)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    others = (y[:, None] + torch.randint(1, 4, (n, 3), generator=g)) % 4
    votes = torch.cat([y[:, None].expand(n, 4), others], 1)  # 4 of 7 votes: a strict majority
    tokens = torch.cat([votes, torch.randint(4, 8, (n, 5), generator=g)], 1)
    order = torch.argsort(torch.rand(n, 12, generator=g), 1)
    return torch.gather(tokens, 1, order), y


class LitTokens(pl.LightningModule):
    """What a user writes: embedding, a pre-norm MLP block per token, mean pooling, a linear
    head; Adam with a step schedule."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(8, 32)
        self.norm = nn.LayerNorm(32)
        self.up = nn.Linear(32, 64)
        self.down = nn.Linear(64, 32)
        self.head = nn.Linear(32, 4)

    def forward(self, tokens):
        t = self.embed(tokens)
        t = t + self.down(F.gelu(self.up(self.norm(t))))
        return self.head(t.mean(1))

    def training_step(self, batch, _):
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=3e-3)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, 4, 0.5)]


@torch.no_grad()
def _token_accuracy(model, x, y) -> float:
    model.eval()
    acc = (model(x).argmax(1) == y).float().mean().item()
    model.train()
    return acc


@pytest.mark.parametrize("recipe,overrides", [
    ("lsq-w4-g128", {"method.group_size": 16}),
    ("nipq-4bit", {"method.granularity": "group", "method.group_size": 16}),
], ids=["lsq_w4_g16", "nipq_w4_g16"])
def test_group_wise_w4_learns_a_sequence_task(recipe, overrides):
    """FP training, then the quantized fine-tune of the same weights with group-wise 4-bit
    weights: the known-answer task stays above 90% held-out accuracy (FP reaches about 100%,
    chance is 25%), and the layers really are group-wise."""
    torch.manual_seed(0)
    x, y = _majority_task(2048, seed=0)
    xv, yv = _majority_task(512, seed=1)
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    quiet = {"enable_progress_bar": False, "enable_model_summary": False, "logger": False,
             "enable_checkpointing": False, "accelerator": "cpu"}
    model = LitTokens()
    pl.Trainer(max_epochs=8, **quiet).fit(model, loader)
    fp = _token_accuracy(model, xv, yv)
    cb = QuantizationCallback(recipe, overrides={**overrides, "first_last.bits": "same"},
                              example_input=x[:2])
    pl.Trainer(max_epochs=4, callbacks=[cb], **quiet).fit(model, loader)
    layers = dict(quantized_layers(model))
    assert set(layers) == {"embed", "up", "down", "head"}  # the embedding table too
    assert layers["embed"].weight_quantizer.step_size.numel() == 8 * 32 // 16
    assert layers["down"].weight_quantizer.step_size.numel() == 32 * 64 // 16
    quant = _token_accuracy(model, xv, yv)
    assert fp > 0.97 and quant > 0.9, (fp, quant)
