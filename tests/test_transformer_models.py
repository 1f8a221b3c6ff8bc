"""The built-in transformers (``vit``, ``sequence_transformer``), the synthetic
``majority-tokens`` task, and a transformer learning under every method from scratch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import qtrainer
from qtrainer.data import build_data
from qtrainer.data.sequences import majority_token_dataset
from qtrainer.models import build_model
from qtrainer.transformer_models import SequenceClassifier

pytestmark = pytest.mark.usefixtures("one_thread")


def test_vit_builds_from_the_data_shape_and_quantizes_patch_projection_to_head():
    model = build_model({"name": "vit", "width": 32, "depth": 2, "heads": 2}, num_classes=10,
                        input_shape=(3, 32, 32))
    x = torch.randn(2, 3, 32, 32)
    assert model(x).shape == (2, 10)
    report = qtrainer.quantize_model(model, example_input=x)
    position = {r.name: r.position for r in report if r.position}
    assert position == {"patch": "first", "head": "last"}
    assert len(report) == 1 + 2 * 4 + 1  # patch conv, 2 x (in-proj, out_proj, linear1/2), head
    with pytest.raises(ValueError, match="multiple of patch_size"):
        build_model({"name": "vit", "image_size": 30}, num_classes=10, input_shape=(3, 30, 30))


def test_majority_tokens_labels_are_the_unique_most_frequent_marker():
    data = majority_token_dataset(300, max_len=24, vocab_size=16, num_classes=4, seed=3)
    ids, labels = data.tensors
    counts = torch.stack([(ids == c + 1).sum(1) for c in range(4)], 1)
    top = counts.max(1)
    assert torch.equal(top.indices, labels)
    assert ((counts == top.values[:, None]).sum(1) == 1).all()  # unique maximum
    lengths = (ids != 0).sum(1)
    assert lengths.min() >= 12 and lengths.max() <= 24
    assert torch.equal(majority_token_dataset(300, seed=3).tensors[0], ids)  # reproducible
    assert torch.bincount(labels, minlength=4).min() > 40  # every class present
    with pytest.raises(ValueError, match="max_len=8 must be at least 4 \\* num_classes"):
        majority_token_dataset(10, max_len=8)


def test_majority_tokens_data_source():
    bundle = build_data({"name": "majority-tokens", "train_size": 200, "test_size": 50,
                         "batch_size": 32})
    assert bundle.num_classes == 4 and bundle.input_shape == (24,)
    assert len(bundle.train) == 180 and len(bundle.val) == 20 and len(bundle.test) == 50
    assert bundle.example_input.dtype == torch.int64
    model = build_model({"name": "sequence_transformer"}, num_classes=bundle.num_classes,
                        input_shape=bundle.input_shape)
    assert model(bundle.example_input).shape == (8, 4)


def _accuracy(model, data):
    model.eval()
    with torch.no_grad():
        acc = (model(data.tensors[0]).argmax(1) == data.tensors[1]).float().mean().item()
    model.train()
    return acc


@pytest.mark.parametrize("kwargs", [
    {"method": "lsq", "weight_bits": 4, "act_bits": 4},
    {"method": "nipq", "weight_bits": 4, "act_bits": 4, "first_last_bits": "same"},
    {"method": "tempering", "weight_bits": 4, "act_bits": 4},
    {"method": "lsq", "weight_bits": 4, "act_bits": None, "attention_matmul_bits": 8},
], ids=["lsq-w4a4", "nipq-w4a4", "tempering-w4a4", "lsq-w4-weight-only-attn8"])
def test_a_quantized_transformer_learns_from_scratch(kwargs):
    """100 AdamW steps from random weights with every weight matrix quantized: at least 90%
    on held-out sequences (chance: 25%; the full-precision model reaches 100%)."""
    train, test = majority_token_dataset(2000, seed=0), majority_token_dataset(500, seed=1)
    torch.manual_seed(0)
    model = SequenceClassifier(vocab_size=16, num_classes=4, max_len=24, width=32, depth=1,
                               heads=2)
    report = qtrainer.quantize_model(model, example_input=test.tensors[0][:64], **kwargs)
    assert len(report) == 6  # embedding, in-proj, out_proj, linear1, linear2, head
    qtrainer.initialize_quantizers(model, train.tensors[0][:256])
    before = _accuracy(model, test)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(100):
        i = torch.randint(0, len(train.tensors[1]), (64,), generator=g)
        loss = F.cross_entropy(model(train.tensors[0][i]), train.tensors[1][i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = _accuracy(model, test)
    assert before < 0.5 and after >= 0.9, (before, after)
