"""A short CPU probe of issue #15: LSQ against LSQ + oscillation dampening and LSQ + iterative
freezing at W2A2 on real CIFAR-10 (a stratified subset of the JPEG copy), reporting per variant
the final oscillating fraction, the mean oscillation frequency and the test accuracy.

Not the issue's full evidence (the CPU accuracy preset with two seeds and tempering/NIPQ rows):
a small model (``SmallCNN``), a few thousand images and a few epochs, so that it runs in
minutes on one CPU thread. Every variant starts from the same FP model, trained first for
``--fp-epochs`` (SGD, cosine); the QAT recipe is ``lsq-2bit`` (first/last layer 8-bit) fitted
to ``--epochs`` with ``--overrides``. Nothing is chosen on the test split: the variants and
their settings are fixed in advance (the paper's defaults), the validation split (held out of
the training images) is only logged.

    nice -n 10 python benchmarks/oscillation_probe.py --json out/osc_probe.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from qtrainer import QTrainer
from qtrainer.data import default_cifar10_jpeg_root, load_npz_jpeg, stratified_indices
from qtrainer.models import SmallCNN

VARIANTS = {
    "lsq": {},
    "lsq+dampening": {"oscillation.dampening.enabled": True},
    "lsq+freezing": {"oscillation.freezing.enabled": True},
}
MEAN = torch.tensor([0.491, 0.482, 0.447]).view(1, 3, 1, 1)
STD = torch.tensor([0.247, 0.243, 0.261]).view(1, 3, 1, 1)


def tensors(split: str, indices) -> TensorDataset:
    images, labels, _ = load_npz_jpeg(default_cifar10_jpeg_root() / f"{split}.npz", indices)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255)
    return TensorDataset((x - MEAN) / STD, torch.from_numpy(labels).long())


def splits(per_class: int, val_per_class: int, test_per_class: int):
    """Train and validation: disjoint stratified subsets of train.npz; test: of test.npz."""
    with np.load(default_cifar10_jpeg_root() / "train.npz") as npz:
        labels = npz["labels"]
    both = stratified_indices(labels, per_class + val_per_class, 0)
    by_class = {c: [i for i in both if labels[i] == c] for c in range(10)}
    train = [i for c in range(10) for i in by_class[c][:per_class]]
    val = [i for c in range(10) for i in by_class[c][per_class:]]
    with np.load(default_cifar10_jpeg_root() / "test.npz") as npz:
        test = stratified_indices(npz["labels"], test_per_class, 0)
    return tensors("train", train), tensors("train", val), tensors("test", test)


def augment(x: torch.Tensor) -> torch.Tensor:
    """Random crop (pad 4) and horizontal flip, per batch."""
    flip = torch.rand(x.shape[0]) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
    dx, dy = torch.randint(0, 9, (2,)).tolist()
    return F.pad(x, (4, 4, 4, 4))[:, :, dy:dy + 32, dx:dx + 32]


class Augmented(torch.utils.data.Dataset):
    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        return augment(x[None])[0], y


def train_fp(model, train, epochs: int, lr: float = 0.05, batch: int = 128):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4,
                          nesterov=True)
    steps = epochs * math.ceil(len(train) / batch)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    loader = DataLoader(train, batch_size=batch, shuffle=True)
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(augment(x)), y).backward()
            opt.step()
            sched.step()
    return model


@torch.no_grad()
def accuracy(model, data) -> float:
    model.eval()
    x, y = data.tensors
    return float((model(x).argmax(1) == y).float().mean())


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--per-class", type=int, default=400)
    ap.add_argument("--val-per-class", type=int, default=50)
    ap.add_argument("--test-per-class", type=int, default=500)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--fp-epochs", type=int, default=15)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    train, val, test = splits(args.per_class, args.val_per_class, args.test_per_class)
    rows = []
    for seed in args.seeds:
        torch.manual_seed(seed)
        fp = train_fp(SmallCNN(width=args.width), train, args.fp_epochs)
        fp_acc = accuracy(fp, test)
        print(f"seed {seed}: FP test {100 * fp_acc:.2f}%", flush=True)
        for name in args.variants:
            over = {"optimizer.lr": 0.01, "lr_schedule.warmup_epochs": 0, **VARIANTS[name]}
            qt = QTrainer(copy.deepcopy(fp), "lsq-2bit", overrides=over, seed=seed,
                          batch_size=128)
            start = time.process_time()
            qt.fit(Augmented(train), val, epochs=args.epochs, measure_fp=False)
            cpu = time.process_time() - start
            test_acc = qt.evaluate(test)["acc"]
            osc = qt.summary()["oscillation"]
            row = {"seed": seed, "variant": name, "fp_test_acc": fp_acc,
                   "val_acc": qt.evaluate(val)["acc"], "test_acc": test_acc,
                   "oscillating": osc["oscillating"], "mean_freq": osc["mean_freq"],
                   "frozen": osc["frozen"], "boundary_distance": osc["boundary_distance"],
                   "cpu_s": round(cpu, 1)}
            rows.append(row)
            print(f"seed {seed} {name:14s} test {100 * test_acc:.2f}%  oscillating "
                  f"{100 * osc['oscillating']:.2f}%  mean f {osc['mean_freq']:.4f}  frozen "
                  f"{100 * osc['frozen']:.2f}%", flush=True)
    out = {"args": vars(args), "rows": rows}
    if args.json:
        from pathlib import Path

        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
