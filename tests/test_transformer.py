"""Transformers under qtrainer: quantized attention (packed and separate q/k/v projections),
embeddings, the fused fast paths off, first/last layers, type overrides, weight-only recipes and
whole-model accounting, on a user's small encoder the way a user writes it."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qtrainer
from qtrainer.nn import (QuantEmbedding, QuantizedLayer, QuantLinear, QuantMultiheadAttention,
                         named_quantizers)
from qtrainer.resources import summarize

pytestmark = pytest.mark.usefixtures("one_thread")


class TextEncoder(nn.Module):
    """Token embedding, a 2-layer nn.TransformerEncoder (optionally causal) and a linear head on
    the mean token."""

    def __init__(self, vocab=20, width=16, heads=2, layers=2, classes=3, batch_first=True,
                 causal=False):
        super().__init__()
        self.batch_first, self.causal = batch_first, causal
        self.embed = nn.Embedding(vocab, width)
        layer = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0,
                                           batch_first=batch_first)
        self.encoder = nn.TransformerEncoder(layer, layers)
        self.head = nn.Linear(width, classes)

    def forward(self, ids, pad=None):
        x = self.embed(ids if self.batch_first else ids.t())
        mask = nn.Transformer.generate_square_subsequent_mask(ids.shape[1]) if self.causal else None
        x = self.encoder(x, mask=mask, src_key_padding_mask=pad, is_causal=self.causal or None)
        return self.head(x.mean(1 if self.batch_first else 0))


def batch(n=4, t=7, vocab=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, t), generator=g)
    pad = torch.zeros(n, t, dtype=torch.bool)
    pad[1:, t - 2:] = True  # right padding on all but the first sequence
    return ids, pad


def test_quantized_weight_tensors_of_a_transformer_encoder_by_number_and_name():
    torch.manual_seed(0)
    model = TextEncoder()
    report = qtrainer.quantize_model(model, example_input=batch())
    weights = {name: param for name, layer in model.named_modules()
               if isinstance(layer, QuantizedLayer) and layer.weight_quantizer is not None
               for param_name in [layer.WEIGHT_NAME]
               for name, param in [(f"{name}.{param_name}", getattr(layer, param_name))]}
    expected = ["embed.weight"] + [
        f"encoder.layers.{i}.{w}" for i in range(2)
        for w in ("self_attn.in_proj_weight", "self_attn.out_proj.weight", "linear1.weight",
                  "linear2.weight")] + ["head.weight"]
    assert sorted(weights) == sorted(expected) and len(weights) == 10
    every_matrix = [n for n, p in model.named_parameters() if p.dim() == 2]
    assert sorted(every_matrix) == sorted(expected)  # every weight matrix is quantized
    kinds = {r.name: (r.kind, r.position, r.weight_bits, r.act_bits) for r in report}
    assert kinds["embed"] == ("Embedding", "first", 8, None)  # first: the embedding
    assert kinds["head"] == ("Linear", "last", 8, 8)  # last: the head, not layers.0.linear1
    assert kinds["encoder.layers.0.linear1"] == ("Linear", "", 4, 4)
    assert kinds["encoder.layers.0.self_attn"][:1] == ("MultiheadAttention",)
    assert kinds["encoder.layers.0.self_attn.out_proj"][:1] == ("NonDynamicallyQuantizableLinear",)
    assert isinstance(model.encoder.layers[0].self_attn, QuantMultiheadAttention)
    assert isinstance(model.encoder.layers[0].self_attn.out_proj, QuantLinear)
    assert isinstance(model.embed, QuantEmbedding)


def test_first_and_last_layer_can_be_named():
    report = qtrainer.quantize_model(TextEncoder(), example_input=batch(),
                                     first_layer="encoder.layers.0.self_attn",
                                     last_layer="encoder.layers.1.linear2")
    position = {r.name: r.position for r in report}
    assert position["encoder.layers.0.self_attn"] == "first" and position["embed"] == ""
    assert position["encoder.layers.1.linear2"] == "last" and position["head"] == ""
    with pytest.raises(ValueError, match=r"first_layer='embedd' .*did you mean 'embed'"):
        qtrainer.quantize_model(TextEncoder(), example_input=batch(), first_layer="embedd")


def test_state_dict_names_are_the_float_models():
    torch.manual_seed(0)
    fp = TextEncoder()
    q = copy.deepcopy(fp)
    qtrainer.quantize_model(q, example_input=batch())
    q.load_state_dict(fp.state_dict(), strict=False)
    assert set(fp.state_dict()) <= set(q.state_dict())
    fp.load_state_dict(qtrainer.fp_state_dict(q))  # strict: exactly the FP names


class Holder(nn.Module):
    """A user's module around one attention layer (surgery replaces layers inside a model)."""

    def __init__(self, attn):
        super().__init__()
        self.attn = attn

    def forward(self, *args, **kwargs):
        return self.attn(*args, **kwargs)


def _disabled_copy(module):
    for _, q in named_quantizers(module):
        q.enabled = False
    return module


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
def test_quantized_attention_with_quantizers_off_is_torch_attention(batch_first, need_weights):
    """Same outputs and weights as nn.MultiheadAttention: self- and cross-attention, separate
    q/k/v weights (kdim/vdim), attention/padding/causal masks, unbatched inputs."""
    torch.manual_seed(0)
    l, s, n, e = 5, 4, 3, 8
    for kdim in (None, 6):
        fp = nn.MultiheadAttention(e, 2, batch_first=batch_first, kdim=kdim, vdim=kdim).eval()
        q = Holder(copy.deepcopy(fp))
        shape = (lambda t, d: (n, t, d)) if batch_first else (lambda t, d: (t, n, d))
        memory = torch.randn(shape(s, kdim or e))
        qtrainer.quantize_model(q, example_input=(torch.randn(shape(l, e)), memory, memory))
        assert isinstance(q.attn, QuantMultiheadAttention)
        assert isinstance(q.attn.out_proj, QuantLinear)
        _disabled_copy(q).eval()
        query, memory = torch.randn(shape(l, e)), torch.randn(shape(s, kdim or e))
        pad = torch.zeros(n, s, dtype=torch.bool)
        pad[0, -1] = True
        blocked = torch.rand(l, s) > 0.7
        blocked[:, 0] = False  # no fully masked row (NaN in both)
        cases = [{}, {"key_padding_mask": pad}, {"attn_mask": torch.randn(l, s)},
                 {"attn_mask": blocked, "key_padding_mask": pad}]
        for kwargs in cases:
            a = fp(query, memory, memory, need_weights=need_weights, **kwargs)
            b = q(query, memory, memory, need_weights=need_weights, **kwargs)
            # fp32 sums of e products of unit-size values: a few ulps of the result scale
            assert torch.allclose(a[0], b[0], rtol=0, atol=1e-5), kwargs
            if need_weights:
                assert torch.allclose(a[1], b[1], rtol=0, atol=1e-6)
            else:
                assert a[1] is None and b[1] is None
        if kdim is None:
            causal = nn.Transformer.generate_square_subsequent_mask(l)
            a = fp(query, query, query, attn_mask=causal, is_causal=True, need_weights=False)
            b = q(query, query, query, attn_mask=causal, is_causal=True, need_weights=False)
            assert torch.allclose(a[0], b[0], rtol=0, atol=1e-5)
            one = torch.randn(l, e)  # unbatched
            a, b = fp(one, one, one), q(one, one, one)
            assert torch.allclose(a[0], b[0], rtol=0, atol=1e-5)
            assert torch.allclose(a[1], b[1], rtol=0, atol=1e-6)


def test_eval_under_no_grad_runs_the_quantized_layers():
    """Torch's fused encoder-layer kernel and nested tensors read the float weights at
    inference; after surgery the eval output under no_grad equals the one with gradients."""
    torch.manual_seed(0)
    model = TextEncoder()
    ids, pad = batch()
    qtrainer.quantize_model(model, example_input=(ids, pad))  # a padding mask: nested path
    qtrainer.initialize_quantizers(model, ids, pad)
    model.eval()
    with torch.no_grad():
        fast = model(ids, pad)
    slow = model(ids, pad)
    assert torch.equal(fast, slow.detach())
    # and the quantizers act: the float model's output differs by more than rounding
    qtrainer.set_quantizers(model, enabled=False)
    with torch.no_grad():
        assert (model(ids, pad) - fast).abs().max() > 1e-3


def test_decoder_layer_and_causal_mask_train():
    torch.manual_seed(0)
    layer = nn.TransformerDecoderLayer(16, 2, 32, dropout=0.0, batch_first=False)
    tgt, memory = torch.randn(6, 2, 16), torch.randn(5, 2, 16)
    causal = nn.Transformer.generate_square_subsequent_mask(6)
    report = qtrainer.quantize_model(layer, example_input=(tgt, memory),
                                     example_kwargs={"tgt_mask": causal, "tgt_is_causal": True})
    names = {r.name for r in report}
    assert {"self_attn", "multihead_attn", "self_attn.out_proj", "multihead_attn.out_proj",
            "linear1", "linear2"} == names
    qtrainer.initialize_quantizers(layer, tgt, memory, tgt_mask=causal, tgt_is_causal=True)
    out = layer(tgt, memory, tgt_mask=causal, tgt_is_causal=True)
    out.square().mean().backward()
    steps = [q.step for _, q in named_quantizers(layer)]
    assert all(s.grad is not None and torch.isfinite(s.grad).all() for s in steps)
    assert layer.self_attn.in_proj_weight.grad.abs().sum() > 0


def test_type_overrides_and_their_errors():
    report = qtrainer.quantize_model(
        TextEncoder(), example_input=batch(), first_last_bits="same",
        overrides={"type:Embedding": {"weight_bits": 8}, "type:MultiheadAttention": {"skip": True}})
    bits = {r.name: r.weight_bits for r in report}
    assert bits["embed"] == 8 and bits["encoder.layers.0.linear1"] == 4
    assert "encoder.layers.0.self_attn" not in bits
    assert bits["encoder.layers.0.self_attn.out_proj"] == 4  # a Linear of its own
    # type:Linear matches out_proj too (a subclass of nn.Linear)
    report = qtrainer.quantize_model(TextEncoder(), example_input=batch(), first_last_bits="same",
                                     exclude=["type:Linear"])
    assert {r.name for r in report} == {"embed", "encoder.layers.0.self_attn",
                                        "encoder.layers.1.self_attn"}
    with pytest.raises(ValueError, match=r"'type:Embeding'.*did you mean 'type:Embedding'"):
        qtrainer.quantize_model(TextEncoder(), example_input=batch(),
                                overrides={"type:Embeding": {"weight_bits": 8}})


def test_weight_only_leaves_every_layer_input_bit_identical():
    """``act_bits=None``: no input quantizer anywhere; each layer computes on exactly the
    tensor it was given (its output is the float op on that input with the quantized weight)."""
    torch.manual_seed(0)
    model = TextEncoder()
    ids, pad = batch()
    qtrainer.quantize_model(model, act_bits=None, example_input=(ids, pad))
    qtrainer.initialize_quantizers(model, ids, pad)
    layers = [m for m in model.modules() if isinstance(m, QuantizedLayer)]
    assert len(layers) == 10 and all(m.input_quantizer is None for m in layers)
    checked = []

    def check(module, inputs, output):
        x = inputs[0]
        if isinstance(module, QuantEmbedding):
            expected = F.embedding(x, module.quantized_weight())
        elif isinstance(module, QuantLinear):
            expected = F.linear(x, module.quantized_weight(), module.bias)
        else:
            return
        assert torch.equal(output, expected)
        checked.append(module)

    handles = [m.register_forward_hook(check) for m in layers]
    model.eval()
    with torch.no_grad():
        model(ids, pad)
    for h in handles:
        h.remove()
    assert len(checked) == 8  # every linear, out_proj and the embedding
    r = qtrainer.load_recipe("lsq-4bit", overrides={"bits.activation": "none"})
    assert r.surgery_kwargs()["act_bits"] is None


def test_attention_matmul_quantizers_are_off_by_default_and_optional():
    ids, pad = batch()
    plain = TextEncoder()
    qtrainer.quantize_model(plain, example_input=(ids, pad))
    assert plain.encoder.layers[0].self_attn.matmul_quantizers is None
    torch.manual_seed(0)
    model = TextEncoder()
    report = qtrainer.quantize_model(model, example_input=(ids, pad), attention_matmul_bits=8)
    attn = model.encoder.layers[0].self_attn
    assert sorted(attn.matmul_quantizers) == ["k", "probs", "q", "v"]
    assert not attn.matmul_quantizers["probs"].signed and attn.matmul_quantizers["q"].signed
    assert {r.name: r.matmul_bits for r in report}["encoder.layers.0.self_attn"] == 8
    qtrainer.initialize_quantizers(model, ids, pad)
    seen = {}
    handles = [q.register_forward_hook(lambda m, i, o, site=site: seen.setdefault(site, o))
               for site, q in attn.matmul_quantizers.items()]
    model(ids, pad).sum().backward()
    for h in handles:
        h.remove()
    for site, out in seen.items():  # outputs on the quantizer's grid
        step = attn.matmul_quantizers[site].step_size.detach()
        assert torch.allclose(out / step, (out / step).round(), atol=1e-3), site
    assert attn.matmul_quantizers["probs"].step.grad is not None
    fresh = TextEncoder()  # the saved plan rebuilds them
    qtrainer.surgery.quantize_from_plan(fresh, [r.to_dict() for r in report])
    fresh.load_state_dict(model.state_dict())


def test_summary_counts_full_precision_layers_at_their_width():
    torch.manual_seed(0)
    model = TextEncoder()
    report = qtrainer.quantize_model(model, example_input=batch(), first_last_bits="fp")
    assert {r.name for r in report}.isdisjoint({"embed", "head"})
    s = summarize(model)
    n_embed, n_head = model.embed.weight.numel(), model.head.weight.numel()
    n_quant = sum(r.weight_numel for r in report)
    total = n_quant + n_embed + n_head
    assert s.quantized_weight_share == pytest.approx(n_quant / total)
    assert s.avg_weight_bits == pytest.approx((4 * n_quant + 32 * (n_embed + n_head)) / total)
    params = sum(p.numel() for p in model.parameters())
    quantizer_params = sum(p.numel() for _, q in named_quantizers(model) for p in q.parameters())
    # every parameter at 32 bits, except the quantized weights at 4
    expected_bits = 32 * params - (32 - 4) * n_quant
    assert s.size_mb == pytest.approx(expected_bits / 8e6)
    assert quantizer_params > 0
    head_macs = model.head.macs  # the FP head is counted at 32 x 32 bits
    assert head_macs == 16 * 3
    macs = {r.name: r.macs for r in report}
    expected_bops = sum(m * 4 * 4 for m in macs.values()) + head_macs * 32 * 32
    assert s.gbops == pytest.approx(expected_bops / 1e9)


def test_unsupported_attention_options_are_named():
    with pytest.raises(ValueError, match="is itself a quantizable layer.*nn.Sequential"):
        qtrainer.quantize_model(nn.MultiheadAttention(8, 2), example_input=torch.randn(3, 1, 8))
    mha = Holder(nn.MultiheadAttention(8, 2, add_bias_kv=True))
    x = torch.randn(3, 1, 8)
    with pytest.raises(ValueError, match="add_bias_kv or add_zero_attn is not supported"):
        qtrainer.quantize_model(mha, example_input=(x, x, x))
    sep = Holder(nn.MultiheadAttention(8, 2, kdim=6, vdim=6))
    with pytest.raises(ValueError, match="per_channel weight steps need the packed"):
        qtrainer.quantize_model(sep, example_input=(x, torch.randn(3, 1, 6), torch.randn(3, 1, 6)),
                                method_kwargs={"per_channel": True})


def test_callback_trains_cross_attention_with_separate_qkv_weights(recwarn):
    """A user's LightningModule whose attention has separate q/k/v weights (kdim, vdim) and
    quantized attention matmuls: under the callback every quantizer parameter (the matmul
    ones included) joins an undecayed group of the optimizer holding those weights, and the
    recipe's optimizer (``replace``) takes the three weights as parameters."""
    import lightning.pytorch as pl

    class CrossAttention(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, kdim=6, vdim=6, batch_first=True)
            self.head = nn.Linear(8, 2)

        def forward(self, x, memory):
            return self.head(self.attn(x, memory, memory, need_weights=False)[0].mean(1))

        def training_step(self, batch, batch_idx):
            x, memory, y = batch
            return F.cross_entropy(self(x, memory), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01, weight_decay=1e-4)

    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(16, 5, 8, generator=g),
                                          torch.randn(16, 4, 6, generator=g),
                                          torch.randint(0, 2, (16,), generator=g))
    for policy in ("keep", "replace"):
        module = CrossAttention()
        q_before = module.attn.q_proj_weight.detach().clone()
        cb = qtrainer.QuantizationCallback(
            "lsq-4bit", overrides={"optimizer.policy": policy, "optimizer.lr": 0.01,
                                   "bits.attention_matmul": 8},
            input_fn=lambda b: (b[0], b[1]))
        trainer = pl.Trainer(max_epochs=1, callbacks=[cb], logger=False, accelerator="cpu",
                             enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False)
        trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=8))
        assert isinstance(module.attn, QuantMultiheadAttention)
        assert not torch.equal(module.attn.q_proj_weight.detach(), q_before)
        in_optimizer = {id(p) for group in trainer.optimizers[0].param_groups
                        for p in group["params"]}
        assert all(id(p) in in_optimizer for p in module.attn.weight_parameters())
        assert all(id(p) in in_optimizer for _, q in named_quantizers(module)
                   for p in q.parameters())
        undecayed = {id(p) for group in trainer.optimizers[0].param_groups
                     if group["weight_decay"] == 0 for p in group["params"]}
        matmul_steps = [q.step for q in module.attn.matmul_quantizers.values()]
        assert len(matmul_steps) == 4 and all(id(p) in undecayed for p in matmul_steps)
    assert not [w for w in recwarn if "in no optimizer" in str(w.message)]


def test_run_file_patterns_name_layer_types_and_first_last_layers():
    """``qtrainer validate``/``run`` check ``type:`` patterns and first_last names against the
    model (inside qtrainer's LightningModule, as ``model.<name>``)."""
    from qtrainer.run.errors import RunFileError
    from qtrainer.run.layers import check_layer_patterns

    model = TextEncoder()
    good = qtrainer.load_recipe("lsq-4bit", overrides={
        "overrides.type:Embedding.weight_bits": 8, "exclude": ["type:MultiheadAttention"],
        "first_last.first": "model.embed"})
    assert check_layer_patterns([good], model) == 10
    typo = qtrainer.load_recipe("lsq-4bit", overrides={"exclude": ["type:MultiHeadAttention"]})
    with pytest.raises(RunFileError, match=r"did you mean 'type:MultiheadAttention'"):
        check_layer_patterns([typo], model)
    wrong = qtrainer.load_recipe("lsq-4bit", overrides={"first_last.last": "model.haed"})
    with pytest.raises(RunFileError, match=r"recipe.first_last.last.*model.head"):
        check_layer_patterns([wrong], model)
