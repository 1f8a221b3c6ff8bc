"""FP training probe on the CIFAR-10 JPEG copy with qtrainer's npz-jpeg data (DeviceLoader on
the CPU), mirroring qtrainer's pretrain semantics (SGD, weight decay on >1-D params only,
linear warm-up over whole epochs then per-step cosine to 0, label smoothing), but in a plain
loop with optional bf16 autocast and channels_last.

    taskset -c 1 python train_fp.py --model resnet9:16 --per-class 2000 --val 2000 --epochs 15 \
        --lr 0.2 --save fp_resnet9w16.pt
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE))
from nets import build, describe  # noqa: E402
from speed import parse_model  # noqa: E402


def data(per_class, val, batch, seed=0, channels_last=True):
    from qtrainer.data import build_data

    spec = {"name": "npz-jpeg", "batch_size": batch, "val_size": val, "device_resident": True,
            "device": "cpu", "channels_last": channels_last, "seed": seed}
    if per_class:
        spec["subset_per_class"] = per_class
    return build_data(spec)


@torch.no_grad()
def evaluate(model, loader, bf16, cl):
    model.eval()
    correct = n = 0
    loss = 0.0
    for x, y in loader:
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(x).float()
        loss += F.cross_entropy(out, y, reduction="sum").item()
        correct += (out.argmax(1) == y).sum().item()
        n += len(y)
    model.train()
    return correct / n, loss / n


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="resnet9:16")
    ap.add_argument("--per-class", type=int, default=2000)
    ap.add_argument("--val", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--lr", type=float, default=0.2)
    ap.add_argument("--wd", type=float, default=5e-4)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--nesterov", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--ls", type=float, default=0.1, help="label smoothing")
    ap.add_argument("--fp32", action="store_true", help="no bf16 autocast")
    ap.add_argument("--contiguous", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--val-every", type=int, default=5)
    ap.add_argument("--eval-fp32", action="store_true", help="final val/test also in fp32")
    ap.add_argument("--save", default="")
    ap.add_argument("--log", default="")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    bf16, cl = not args.fp32, not args.contiguous
    t0 = time.perf_counter()
    bundle = data(args.per_class, args.val, args.batch, channels_last=cl)
    t_data = time.perf_counter() - t0
    name, kw = parse_model(args.model)
    model = build(name, **kw)
    info = describe(model)
    if cl:
        model = model.to(memory_format=torch.channels_last)
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": args.wd},
                           {"params": no_decay, "weight_decay": 0.0}], lr=args.lr,
                          momentum=args.momentum, nesterov=bool(args.nesterov))
    train = bundle.train_loader()
    steps_per_epoch = len(train)
    total = steps_per_epoch * args.epochs
    warm = args.warmup * steps_per_epoch

    def factor(step):
        if step < warm:
            return (step + 1) / warm
        t = min((step - warm) / max(total - warm, 1), 1.0)
        return 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    print(f"model {args.model} {info}; train {len(bundle.train.labels)} val "
          f"{len(bundle.val.labels) if bundle.val else 0}; data {t_data:.1f} s", flush=True)
    log = {"args": vars(args), "info": info, "epochs": [], "data_s": t_data}
    train_time = 0.0
    for epoch in range(args.epochs):
        model.train()
        te = time.perf_counter()
        correct = n = 0
        loss_sum = 0.0
        for x, y in train:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out = model(x)
                loss = F.cross_entropy(out.float(), y, label_smoothing=args.ls)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(y)
            correct += (out.argmax(1) == y).sum().item()
            n += len(y)
        dt = time.perf_counter() - te
        train_time += dt
        rec = {"epoch": epoch + 1, "s": dt, "train_loss": loss_sum / n, "train_acc": correct / n}
        if bundle.val is not None and ((epoch + 1) % args.val_every == 0 or epoch + 1 == args.epochs):
            tv = time.perf_counter()
            rec["val_acc"], rec["val_loss"] = evaluate(model, bundle.val_loader(), bf16, cl)
            rec["val_s"] = time.perf_counter() - tv
        log["epochs"].append(rec)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in rec.items()}), flush=True)
    tt = time.perf_counter()
    log["test_acc"], log["test_loss"] = evaluate(model, bundle.test_loader(), bf16, cl)
    log["test_s"] = time.perf_counter() - tt
    if args.eval_fp32:
        log["test_acc_fp32"] = evaluate(model, bundle.test_loader(), False, cl)[0]
        if bundle.val is not None:
            log["val_acc_fp32"] = evaluate(model, bundle.val_loader(), False, cl)[0]
    log["train_time_s"] = train_time
    log["wall_s"] = time.perf_counter() - t0
    print(f"TEST {log['test_acc']:.4f} (fp32 {log.get('test_acc_fp32')}) train {train_time:.0f} s "
          f"({train_time / args.epochs:.1f} s/epoch), wall {log['wall_s']:.0f} s", flush=True)
    if args.save:
        sd = {k: v.contiguous() for k, v in model.state_dict().items()}
        torch.save(sd, HERE / args.save)
    if args.log:
        (HERE / args.log).write_text(json.dumps(log, indent=1))
    return log


if __name__ == "__main__":
    main()
