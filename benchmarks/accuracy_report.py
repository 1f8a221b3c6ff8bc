"""The accuracy tables' report (``benchmarks/accuracy.py``): records grouped by row (mean and
range over seeds), the markdown table, and the issues' targets checked on test top-1
(issue #5 for the GPU table; issues #12 and #15 for the CPU preset)."""

from __future__ import annotations

from typing import Any


def cpu_minutes(data: dict) -> float:
    """Process-CPU minutes of every job in the results (FP and QAT)."""
    return sum(r.get("cpu_time_s") or 0.0 for r in data["rows"].values()) / 60


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def _groups(data: dict, order: list[str]) -> list[dict]:
    """One entry per table row: seeds of a row aggregated (mean, min, max)."""
    rows = data["rows"]
    out = []
    for name in order:
        recs = [r for r in rows.values() if r.get("row") == name]
        if not recs:
            continue
        recs.sort(key=lambda r: r["seed"])
        agg: dict[str, Any] = {"row": name, "n": len(recs), "records": recs,
                               "method": recs[0].get("method_label"),
                               "label": recs[0].get("label")}
        for key in ("val_acc", "test_acc", "delta_val", "delta_test", "time_per_epoch_s",
                    "avg_weight_bits", "avg_act_bits", "epochs", "mode_gap", "cpu_time_s",
                    "oscillating", "oscillating_mean", "oscillations"):
            values = [r.get(key) for r in recs if r.get(key) is not None]
            agg[key] = sum(values) / len(values) if values else None
            agg[f"{key}_range"] = (min(values), max(values)) if len(values) > 1 else None
        agg["device"] = ", ".join(sorted({r.get("device", "?") for r in recs}))
        agg["resumed"] = any(r.get("resumed") for r in recs)
        out.append(agg)
    return out


def _cell(g: dict, key: str, scale: float = 100.0, fmt: str = ".2f", sign: bool = False) -> str:
    value = g.get(key)
    if value is None:
        return "-"
    f = ("+" if sign else "") + fmt
    text = format(value * scale, f)
    rng = g.get(f"{key}_range")
    if rng is not None:
        text += f" ({format(rng[0] * scale, fmt)}..{format(rng[1] * scale, fmt)})"
    return text


def _checks(data: dict):
    """``(mean, values, check, out)``: the mean over a row's seeds of a record field (test
    top-1 in %), the per-seed values, and a recorder of (text, met, figures) into ``out``."""
    rows = data["rows"]

    def values(name: str, key: str = "test_acc", scale: float = 100.0) -> list[float]:
        return [scale * r[key] for r in sorted(rows.values(), key=lambda r: r.get("seed", 0))
                if r.get("row") == name and r.get(key) is not None]

    def mean(name: str, key: str = "test_acc", scale: float = 100.0) -> float | None:
        v = values(name, key, scale)
        return sum(v) / len(v) if v else None

    out: list[tuple[str, bool | None, str]] = []

    def check(text: str, figures: list[float | None], ok) -> None:
        if any(v is None for v in figures):
            out.append((text, None, "rows missing"))
            return
        out.append((text, bool(ok(*figures)), ", ".join(f"{v:.2f}" for v in figures)))

    return mean, values, check, out


def targets_cpu(data: dict) -> list[tuple[str, bool | None, str]]:
    """Issue #12's targets on the CPU preset (test top-1, means of two seeds)."""
    mean, values, check, out = _checks(data)
    fp = mean("fp")
    check("FP >= 80.0%", [fp], lambda f: f >= 80.0)
    check("NIPQ W2A2 >= LSQ W2A2 - 0.3 (means of two seeds)",
          [mean("nipq-w2a2"), mean("lsq-w2a2")], lambda n, s: n >= s - 0.3)
    seeds = values("nipq-w2a2")
    check("NIPQ W2A2: its two seeds within 1.0 point",
          [max(seeds) - min(seeds) if len(seeds) == 2 else None], lambda d: d <= 1.0)
    gaps = values("nipq-w2a2", "mode_gap", 1.0)
    check("NIPQ W2A2: train/eval (BN mode) gap <= 1 point, each seed",
          [max(gaps, key=abs) if len(gaps) == 2 else None], lambda g: abs(g) <= 1.0)
    check("NIPQ MP 3.0 bits >= LSQ W3A3", [mean("nipq-mp-3bit"), mean("lsq-w3a3")],
          lambda n, s: n >= s)
    check("NIPQ MP 3.0: final average W and A bits within 0.1 of 3.0",
          [mean("nipq-mp-3bit", "avg_weight_bits", 1.0), mean("nipq-mp-3bit", "avg_act_bits", 1.0)],
          lambda w, a: abs(w - 3.0) <= 0.1 and abs(a - 3.0) <= 0.1)
    for m in ("lsq", "tempering", "nipq"):
        check(f"{m} W4A4 >= FP - 0.5", [mean(f"{m}-w4a4"), fp], lambda a, f: a >= f - 0.5)
    check("tempering W2A2 >= LSQ W2A2 (means of two seeds)",
          [mean("tempering-w2a2"), mean("lsq-w2a2")], lambda t, s: t >= s)
    # issue #15: the better of dampening and freezing, with a lower oscillating fraction
    best = max(("lsq-damp-w2a2", "lsq-freeze-w2a2"), key=lambda r: mean(r) or -1.0)
    check(f"#15: best of LSQ+damp/freeze W2A2 ({best}) >= LSQ W2A2 + 0.3 (means of two seeds)",
          [mean(best), mean("lsq-w2a2")], lambda b, s: b >= s + 0.3)
    check(f"#15: {best} oscillating fraction (%, at the end) < LSQ W2A2's",
          [mean(best, "oscillating"), mean("lsq-w2a2", "oscillating")], lambda b, s: b < s)
    check(f"#15: {best} oscillating fraction (%, mean over the epochs) < LSQ W2A2's",
          [mean(best, "oscillating_mean"), mean("lsq-w2a2", "oscillating_mean")],
          lambda b, s: b < s)
    return out


def targets(data: dict) -> list[tuple[str, bool | None, str]]:
    """The issue's targets on test top-1: (description, met (None: rows missing), figures)."""
    if data.get("benchmark") == "cifar10-resnet9-cpu-accuracy":
        return targets_cpu(data)
    rows = data["rows"]
    mean, _, check, out = _checks(data)
    fp = mean("fp")
    check("FP >= 90.0%", [fp], lambda f: f >= 90.0)
    for m in ("lsq", "tempering", "nipq"):
        check(f"{m} W4A4 >= FP - 0.2", [mean(f"{m}-w4a4"), fp], lambda a, f: a >= f - 0.2)
    for bits, margin in (("w3a3", 0.8), ("w2a2", 2.0)):
        values = [mean(f"{m}-{bits}") for m in ("lsq", "tempering", "nipq")]
        present = [v for v in values if v is not None]
        check(f"best {bits.upper()} >= FP - {margin}", [max(present) if present else None, fp],
              lambda b, f, margin=margin: b >= f - margin)
    check("tempering W2A2 >= LSQ W2A2 + 0.3 (means of two seeds)",
          [mean("tempering-w2a2"), mean("lsq-w2a2")], lambda t, s: t >= s + 0.3)
    check("NIPQ MP 3.0 bits >= LSQ W3A3", [mean("nipq-mp-3bit"), mean("lsq-w3a3")],
          lambda n, s: n >= s)
    for label, target in (("3.0", "nipq-mp-3bit"), ("4.0", "nipq-mp-4bit")):
        wb = [r.get("avg_weight_bits") for r in rows.values() if r.get("row") == target]
        ab = [r.get("avg_act_bits") for r in rows.values() if r.get("row") == target]
        check(f"NIPQ MP {label}: final average W and A bits within 0.1 of {label}",
              [wb[0] if wb else None, ab[0] if ab else None],
              lambda w, a, t=float(label): abs(w - t) <= 0.1 and abs(a - t) <= 0.1)
    return out


def markdown(data: dict, order: list[str]) -> str:
    groups = _groups(data, ["fp", *order])
    env = data.get("environment", {})
    lines = [
        f"### {data.get('title', 'CIFAR-10 ResNet-20: accuracy by method and bit-width (issue #5)')}",
        "",
        f"Device: {env.get('device', '?')}; {env.get('precision', '?')}; batch "
        f"{env.get('batch_size', '?')}; data {env.get('data', '?')}; torch "
        f"{env.get('torch', '?')}, lightning {env.get('lightning', '?')}; mode "
        f"{data.get('mode')}. Top-1 in %, validation = {env.get('val_images', '?')} held-out "
        f"training images (choices are made on it), test = {env.get('test_images', '?')} test "
        "images. Two-seed rows: mean (min..max). Deltas in points vs the FP model on the same "
        "split. s/epoch = wall time of a training epoch with its validation (mean over the "
        "epochs, the first one's compilation and autotuning included); CPU min = the job's "
        "process CPU time (all its threads; on a shared machine, the work done independently "
        "of the others' load). BN gap = top-1 on 20 augmented training batches with BatchNorm "
        "batch statistics minus with its running statistics (quantizers hard in both; the "
        "train/eval gap a noise->hard switch or oscillation would open). osc % = the fraction of "
        "weights whose oscillation frequency is above the tracker's threshold (issue #15; "
        "oscillation.threshold, 0.05 by default) at the end / averaged over the epochs "
        "('-' where a row does not track).",
        "",
        "| row | method | bits | seeds | val top-1 | test top-1 | vs FP (test) | vs FP (val) "
        "| epochs | s/epoch | CPU min | avg W/A bits | BN gap | osc % | device |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for g in groups:
        bits = "-" if g["avg_weight_bits"] is None else \
            f"{g['avg_weight_bits']:.2f}/{g['avg_act_bits']:.2f}"
        epochs = "-" if g["epochs"] is None else f"{g['epochs']:.0f}"
        tpe = _cell(g, "time_per_epoch_s", 1.0, ".1f")
        cpu = _cell(g, "cpu_time_s", 1 / 60, ".1f")
        is_fp = g["row"] == "fp"
        lines.append(" | ".join([
            f"| {g['row']}", str(g["method"]), str(g["label"]), str(g["n"]),
            _cell(g, "val_acc"), _cell(g, "test_acc"),
            "-" if is_fp else _cell(g, "delta_test", 1.0, sign=True),
            "-" if is_fp else _cell(g, "delta_val", 1.0, sign=True),
            epochs, tpe, cpu, bits, _cell(g, "mode_gap", 1.0, sign=True),
            f'{_cell(g, "oscillating", 100.0, ".3f")} / {_cell(g, "oscillating_mean", 100.0, ".3f")}',
            g["device"]]) + " |")
    lines += ["", "Targets (test top-1):", "", "| target | met | figures |", "|---|---|---|"]
    for text, met, figures in targets(data):
        mark = "n/a" if met is None else ("yes" if met else "**no**")
        lines.append(f"| {text} | {mark} | {figures} |")
    lines += ["", "Commands (each row is one `qtrainer run`; the FP row is the pretrain stage "
                  "of its command):", ""]
    for g in groups:
        for r in g["records"]:
            lines.append(f"- `{r['name']}`: `{r['command']}`")
    calls = [c for c in data.get("calls", []) if c.get("wall_s") is not None]
    if calls:
        wall = sum(c["wall_s"] for c in calls) / 60
        lines += ["", f"Wall time: {wall:.1f} min in {len(calls)} call(s) of the script "
                      f"({', '.join(str(c.get('processes', 1)) for c in calls)} process(es) at "
                      f"a time); process CPU time of all jobs: {cpu_minutes(data):.1f} min."]
    lines += ["", f"Whole table: `{data.get('command', '?')}`", ""]
    return "\n".join(lines)
