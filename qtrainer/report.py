"""Run reports: the terminal table, ``metrics.csv`` merging and PNG plots.

Files of a job folder this module reads or writes:

- ``summary.json``: written by :func:`qtrainer.run.run` (FP and quantized accuracy, layers...);
- ``logs/csv/<attempt>/metrics.csv``: Lightning's CSV logs, one folder per attempt (a resumed
  run adds one); :func:`merge_metrics` joins them into ``metrics.csv``, later attempts replacing
  the epochs they re-ran;
- ``plots/curves.png`` (loss and accuracy per epoch, FP pretraining included when present),
  ``plots/layers.png`` (weight/input bits and step sizes per layer),
  ``plots/step_sizes.png`` (step sizes over epochs), ``plots/oscillation.png`` (per layer, the
  fraction of oscillating weights over epochs): :func:`make_plots`, needs matplotlib.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any

from .atomic import atomic_path, write_text_atomic

PLOTS_HINT = "matplotlib is not installed: pip install matplotlib  (or: pip install 'qtrainer[plots]')"


class PlotsUnavailable(RuntimeError):
    """matplotlib is missing (the message says how to install it)."""


# ----------------------------------------------------------------------------- table


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else format(value, fmt)


def _oscillating(row: dict[str, Any]) -> float | None:
    return (row.get("oscillation") or {}).get("oscillating")


def worst_layers(row: dict[str, Any], n: int = 3) -> str:
    """The ``n`` layers with the largest oscillating fraction of a job summary, as text
    (``"conv2 12.5%, fc 3.1%"``); empty without oscillation figures."""
    layers = (row.get("oscillation") or {}).get("layers") or {}
    worst = sorted(layers.items(), key=lambda kv: -kv[1]["oscillating"])[:n]
    return ", ".join(f"{name} {100 * v['oscillating']:.1f}%" for name, v in worst)


def format_table(rows: list[dict[str, Any]], fp: dict[str, Any] | None = None) -> str:
    """A plain-text table: the FP model, then one row per job summary (recipe, method,
    accuracy, change vs FP, average weight/activation bits and the share of weight elements
    quantized, over every weight-bearing layer; size MB, GBOPs, wall time, the fraction of
    oscillating weights), then the worst oscillating layers of each job."""
    header = ["model", "method", "top-1", "vs FP", "W bits", "W quant", "A bits", "size MB",
              "GBOPs", "time s", "osc"]
    lines = []
    fp_acc = fp.get("acc") if fp else (rows[0].get("fp_acc") if rows else None)
    if fp_acc is not None or fp:
        fp_size = rows[0].get("fp_size_mb") if rows else None
        fp_gbops = None
        if rows and rows[0].get("layers"):
            fp_gbops = sum(r.get("macs", 0) for r in rows[0]["layers"]) * 32 * 32 / 1e9 or None
        lines.append(["full precision", "-", _pct(fp_acc), "", "32", "0%", "32",
                      _num(fp_size, ".3f"), _num(fp_gbops, ".4f"),
                      _num(fp.get("wall_time_s") if fp else None, ".1f"), ""])
    for r in rows:
        acc = r.get("quantized_acc")
        delta = None if acc is None or fp_acc is None else 100 * (acc - fp_acc)
        lines.append([r.get("recipe", "?"), r.get("method", "?"), _pct(acc),
                      "-" if delta is None else f"{delta:+.2f}",
                      _num(r.get("avg_weight_bits"), ".2f"), _pct(r.get("quantized_weight_share")),
                      _num(r.get("avg_act_bits"), ".2f"),
                      _num(r.get("size_mb"), ".3f"), _num(r.get("gbops"), ".4f"),
                      _num(r.get("wall_time_s"), ".1f"), _pct(_oscillating(r))])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)]
    def fmt(cells):
        return "  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths)))
    rule = "  ".join("-" * w for w in widths)
    worst = [f"oscillating weights (f > {r['oscillation']['threshold']:g}), worst layers of "
             f"{r.get('recipe', '?')}: {worst_layers(r)}" for r in rows if worst_layers(r)]
    return "\n".join([fmt(header), rule, *(fmt(line) for line in lines), *worst])


# ----------------------------------------------------------------------------- metrics.csv


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def merge_metrics(job_dir: str | os.PathLike) -> Path | None:
    """Join ``logs/csv/*/metrics.csv`` (attempt order) into ``job_dir/metrics.csv``: rows of an
    earlier attempt at or after the first epoch of a later attempt are dropped (that attempt
    re-ran them). Returns the path, or None when there are no logs."""
    job_dir = Path(job_dir)
    logs = job_dir / "logs" / "csv"
    attempts = sorted((p for p in logs.glob("*/metrics.csv")), key=lambda p: int(p.parent.name)
                      if p.parent.name.isdigit() else -1)
    if not attempts:
        return None
    rows: list[dict[str, str]] = []
    for path in attempts:
        new = read_csv(path)
        epochs = [int(float(r["epoch"])) for r in new if r.get("epoch") not in (None, "")]
        if epochs:
            first = min(epochs)
            rows = [r for r in rows if r.get("epoch") in (None, "") or int(float(r["epoch"])) < first]
        rows += new
    keys: list[str] = []
    for r in rows:
        for k in r:
            if k not in keys:
                keys.append(k)
    keys = sorted(keys, key=lambda k: (k not in ("epoch", "step"), k))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(job_dir / "metrics.csv", buf.getvalue())
    return job_dir / "metrics.csv"


def epoch_series(rows: list[dict[str, str]], key: str) -> tuple[list[int], list[float]]:
    """(epochs, values) of a per-epoch column (rows where it is set; last value per epoch)."""
    by_epoch: dict[int, float] = {}
    for r in rows:
        value, epoch = r.get(key), r.get("epoch")
        if value in (None, "") or epoch in (None, ""):
            continue
        by_epoch[int(float(epoch))] = float(value)
    epochs = sorted(by_epoch)
    return epochs, [by_epoch[e] for e in epochs]


# ----------------------------------------------------------------------------- plots


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotsUnavailable(PLOTS_HINT) from None
    return plt


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    return path


def make_plots(job_dir: str | os.PathLike) -> list[Path]:
    """Write the PNG plots of a job folder (see the module docstring); returns their paths.

    Raises:
        PlotsUnavailable: matplotlib is not installed.
    """
    plt = _pyplot()
    job_dir = Path(job_dir)
    out = job_dir / "plots"
    written = []
    rows = read_csv(job_dir / "metrics.csv") if (job_dir / "metrics.csv").is_file() else []
    pre_dir = _pretrain_dir(job_dir)
    pre = read_csv(pre_dir / "metrics.csv") if pre_dir and (pre_dir / "metrics.csv").is_file() \
        else []

    if rows or pre:
        fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
        offset = 0
        for label, data in (("FP", pre), ("QAT", rows)):
            if not data:
                continue
            for key, ax, style in (("train_loss_epoch", ax_loss, "-"), ("val_loss", ax_loss, "--"),
                                   ("train_acc", ax_acc, "-"), ("val_acc", ax_acc, "--")):
                epochs, values = epoch_series(data, key)
                if epochs:
                    ax.plot([e + 1 + offset for e in epochs], values, style,
                            label=f"{label} {key.replace('_epoch', '')}")
            epochs, _ = epoch_series(data, "train_loss_epoch")
            offset += (max(epochs) + 1) if epochs else 0
        ax_loss.set_xlabel("epoch")
        ax_loss.set_ylabel("cross-entropy")
        ax_acc.set_xlabel("epoch")
        ax_acc.set_ylabel("top-1 accuracy")
        for ax in (ax_loss, ax_acc):
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=8)
        fig.suptitle(f"training curves: {job_dir.name}")
        written.append(_save(fig, out / "curves.png"))
        plt.close(fig)

    summary = _summary(job_dir)
    layers = (summary or {}).get("layers") or []
    if layers:
        names = [r["name"] for r in layers]
        x = list(range(len(names)))
        fig, (ax_bits, ax_step) = plt.subplots(2, 1, figsize=(max(6, 0.5 * len(names) + 3), 7),
                                               sharex=True)
        w = [r["weight_bits"] or 32 for r in layers]
        a = [r["act_bits"] or 32 for r in layers]
        ax_bits.bar([i - 0.2 for i in x], w, 0.4, label="weight bits")
        ax_bits.bar([i + 0.2 for i in x], a, 0.4, label="input bits")
        ax_bits.set_ylabel("bits")
        ax_bits.legend(fontsize=8)
        ax_bits.grid(axis="y", alpha=0.3)
        ws = [r["weight_step"] or float("nan") for r in layers]
        as_ = [r["act_step"] or float("nan") for r in layers]
        ax_step.bar([i - 0.2 for i in x], ws, 0.4, label="weight step size")
        ax_step.bar([i + 0.2 for i in x], as_, 0.4, label="input step size")
        ax_step.set_yscale("log")
        ax_step.set_ylabel("step size")
        ax_step.legend(fontsize=8)
        ax_step.set_xticks(x)
        ax_step.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
        fig.suptitle(f"per-layer bits and step sizes: {summary.get('recipe', job_dir.name)}")
        written.append(_save(fig, out / "layers.png"))
        plt.close(fig)

    series = (("qat_step/", "step size", 1.0, True, "step sizes over training", "step_sizes.png"),
              ("qat_osc/", "oscillating weights (%)", 100.0, False,
               "weight oscillation per layer over training", "oscillation.png"))
    for prefix, ylabel, factor, log, title, name in series:
        keys = sorted({k for r in rows for k in r if k.startswith(prefix)})
        if not keys:
            continue
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for key in keys:
            epochs, values = epoch_series(rows, key)
            if epochs:
                ax.plot([e + 1 for e in epochs], [factor * v for v in values],
                        label=key.removeprefix(prefix))
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len(keys) <= 16:
            ax.legend(fontsize=6, ncol=2)
        fig.suptitle(title)
        written.append(_save(fig, out / name))
        plt.close(fig)
    return written


def _summary(job_dir: Path) -> dict | None:
    path = job_dir / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _pretrain_dir(job_dir: Path) -> Path | None:
    """The FP pretraining folder of a job (in the job folder or the run's, two levels up)."""
    for folder in (job_dir, *list(job_dir.parents)[:2]):
        if (folder / "pretrain").is_dir():
            return folder / "pretrain"
    return None


# ----------------------------------------------------------------------------- report


def report(run_dir: str | os.PathLike, plots: bool = True) -> tuple[str, list[Path], str | None]:
    """Re-read a run folder: the table (main job and ``compare/*`` jobs), plots rewritten for
    each job. Returns ``(table, plot paths, note)``; ``note`` explains missing plots.

    Raises:
        FileNotFoundError: ``run_dir`` has no ``summary.json``.
    """
    run_dir = Path(run_dir)
    main = _summary(run_dir)
    if main is None:
        raise FileNotFoundError(f"{run_dir} has no summary.json (not a finished run folder?)")
    jobs = [(run_dir, main)]
    for sub in sorted((run_dir / "compare").glob("*/summary.json")) if (run_dir / "compare").is_dir() else []:
        jobs.append((sub.parent, json.loads(sub.read_text())))
    rows = [{k: v for k, v in s.items() if k != "compare"} for _, s in jobs]
    fp_path = run_dir / "fp.json"
    fp = json.loads(fp_path.read_text()) if fp_path.is_file() else (main.get("fp") or None)
    table = format_table(rows, fp)
    written: list[Path] = []
    note = None
    if plots:
        try:
            for job_dir, _ in jobs:
                merge_metrics(job_dir)
                written += make_plots(job_dir)
        except PlotsUnavailable as e:
            note = str(e)
    return table, written, note


__all__ = ["PLOTS_HINT", "PlotsUnavailable", "epoch_series", "format_table", "make_plots",
           "merge_metrics", "read_csv", "report", "worst_layers"]
