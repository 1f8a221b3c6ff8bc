"""Learning on real data: a small CNN on CIFAR-10-JPEG images, trained FP, then LSQ W4A4
fine-tuned from it, keeps its test accuracy within 3 points (CPU, well under two minutes)."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from qtrainer import initialize_quantizers, quantize_model
from qtrainer.data import default_cifar10_jpeg_root, load_npz_jpeg, stratified_indices
from qtrainer.models import SmallCNN

MEAN = torch.tensor([0.491, 0.482, 0.447]).view(1, 3, 1, 1)
STD = torch.tensor([0.247, 0.243, 0.261]).view(1, 3, 1, 1)


def _tensors(name, per_class, seed):
    path = default_cifar10_jpeg_root() / f"{name}.npz"
    with np.load(path) as npz:
        labels = npz["labels"]
    images, y, _ = load_npz_jpeg(path, stratified_indices(labels, per_class, seed))
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255)
    return (x - MEAN) / STD, torch.from_numpy(y)


def _train(model, x, y, epochs, lr, seed):
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps = epochs * (len(x) // 128)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.15)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(len(x) // 128):
            idx = perm[i * 128:(i + 1) * 128]
            xb = x[idx]
            flip = torch.rand(len(idx), generator=gen) < 0.5
            xb = torch.where(flip.view(-1, 1, 1, 1), xb.flip(3), xb)
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()


@torch.no_grad()
def _accuracy(model, x, y):
    model.eval()
    return sum((model(x[i:i + 500]).argmax(1) == y[i:i + 500]).sum().item()
               for i in range(0, len(x), 500)) / len(x)


@pytest.mark.slow
def test_lsq_w4a4_fine_tune_stays_within_3_points_of_fp():
    torch.manual_seed(0)
    torch.set_num_threads(2)
    x, y = _tensors("train", 500, seed=0)
    xt, yt = _tensors("test", 200, seed=0)
    model = SmallCNN(width=16)
    _train(model, x, y, epochs=15, lr=0.1, seed=0)
    fp_acc = _accuracy(model, xt, yt)
    assert fp_acc > 0.50  # chance is 0.10

    qmodel = copy.deepcopy(model)
    report = quantize_model(qmodel, method="lsq", weight_bits=4, act_bits=4, example_input=x[:8])
    assert [r.act_bits for r in report] == [8, 4, 4, 8]
    initialize_quantizers(qmodel, x[:256])
    init_acc = _accuracy(qmodel, xt, yt)
    _train(qmodel, x, y, epochs=3, lr=0.01, seed=1)
    q_acc = _accuracy(qmodel, xt, yt)
    print(f"FP {fp_acc:.4f}  LSQ W4A4 at init {init_acc:.4f}  after fine-tune {q_acc:.4f}")
    assert q_acc >= fp_acc - 0.03
