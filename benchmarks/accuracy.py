"""Accuracy on real data (issue #5): CIFAR-10 ResNet-20, FP baseline, LSQ / NIPQ / tempering at
W4A4, W3A3, W2A2, NIPQ mixed precision at 3 and 4 average bits, and the textbook-LSQ control.

    python benchmarks/accuracy.py --out benchmarks/results/accuracy.json --device cuda
    python benchmarks/accuracy.py --out runs/accuracy/accuracy.json --device cuda \
        --budget-min 22 --time-limit 560 --export-dir $OUT       # in 10-minute calls
    python benchmarks/accuracy.py --out /tmp/acc.json --quick          # CPU smoke test, ~30 s
    python benchmarks/accuracy.py --out ... --rows lsq-w2a2,nipq-w2a2  # some rows only
    python benchmarks/accuracy.py --out ... --list                     # jobs and commands

Everything goes through the product: the FP model is the ``pretrain`` stage of
``recipes/cifar10_resnet20_lsq.yaml`` (:func:`qtrainer.run.pretrain`, which writes and later
reuses ``fp.ckpt``), and every QAT row is a ``qtrainer run`` of a shipped run file with dotted
overrides (:func:`qtrainer.run.load_run_file` + :func:`qtrainer.run.run`, in this
process so that Python, CUDA and the Triton kernels start once), from that same checkpoint. The
rows, their overrides and the epoch budget are in ``benchmarks/accuracy_rows.yaml``; each
row's JSON record holds the equivalent ``qtrainer run`` command.

Output. ``--out`` (JSON) is rewritten atomically after every row; rows already in it are
skipped (``--redo NAME,...`` runs them again), so an interrupted table continues where it
stopped, and a row interrupted mid-training continues from its ``last.ckpt`` (``--resume`` of
the run). The markdown table goes next to it (``accuracy.md``): validation and test top-1,
change vs FP, QAT epochs, wall time per epoch, average bits, device, and the commands; two-seed
rows show the mean and the range; the issue's targets are checked below the table. Run
folders go to ``<out folder>/runs/<row>/`` (git-ignored). Validation = 5,000 training images
held out (``data.val_size``), the same split for every row and seed; make choices on it, never
on the test split.

Budget (one H100, bf16-mixed, batch 256, device-resident data; estimated, not measured: no GPU
was at hand when this was written; the JSON records the measured s/epoch of every job):
- FP: 200 epochs x ~2 s (ResNet-20 at batch 256 is launch-bound) ........... ~ 7 min
- 2 calibration runs of 2 epochs (with --budget-min) ........................ ~ 1 min
- 15 QAT jobs (LSQ, tempering, NIPQ at W4A4, W3A3 and W2A2 x 2 seeds, NIPQ MP at 3 and 4
  bits, the textbook-LSQ control) x 15 epochs x ~3.5-5 s (quantizers, the distillation
  teacher, NIPQ's noise) + ~15 s each (data, evaluation, plots) ............. ~ 16 min
- JPEG decoding (once per machine), Triton compilation ...................... ~ 1 min
With ``--budget-min 22`` the QAT epochs are chosen from the calibration runs (equal for every
row, 8..30) so that all jobs take about 22 minutes; without it, ``qat_epochs`` of the rows file.

On a machine that runs one command for at most 10 minutes, call it repeatedly with
``--time-limit 570 --export-dir $OUT``: each call stops cleanly at an epoch boundary before
the limit (exit code 3 while jobs are left) and writes accuracy.json, accuracy.md and
state.tar.gz (the results, the FP model, an unfinished job's last checkpoint) to $OUT; extract
state.tar.gz into the --out folder and carry that folder into the next call, which continues
where this one stopped, on the same machine or a fresh one.

CPU preset (issue #12): ``python benchmarks/accuracy.py --preset cpu --out runs/cpu/cpu.json``
runs ``benchmarks/accuracy_cpu_rows.yaml`` on a 2-core CPU: ResNet-9 at width 16, 27,500
CIFAR-10 training images (2,500 held out), the FP model in this process (15 epochs, one
thread), then every QAT job (4 epochs) in its own single-thread worker process
(``accuracy.py --job KEY``), two at a time; each job's record adds its process CPU time, the
BatchNorm train/eval-mode gap on training batches and the final oscillating fraction. Its
targets (issues #12 and #15) are checked in its markdown.

Targets (issue #5, test top-1; checked in the markdown): FP >= 90.0%; every method W4A4 >=
FP-0.2; best W3A3 >= FP-0.8; best W2A2 >= FP-2.0; tempering W2A2 >= LSQ W2A2 + 0.3 (mean of
two seeds); NIPQ MP at 3.0 bits >= LSQ W3A3 with the final averages within 0.1 bit.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:  # this checkout's qtrainer, whatever else is installed
    sys.path.insert(0, str(ROOT))
if str(HERE) not in sys.path:  # the report module next to this script
    sys.path.insert(0, str(HERE))

from accuracy_report import pct, cpu_minutes, markdown, targets  # noqa: E402, F401 (targets: the tests')

DEFAULT_ROWS = HERE / "accuracy_rows.yaml"
PRESETS = {"gpu": DEFAULT_ROWS, "cpu": HERE / "accuracy_cpu_rows.yaml"}
"""``--preset``: the rows file (and so the benchmark) of each preset."""
SCHEMA_VERSION = 1


# ----------------------------------------------------------------------------- plan


def _yaml_value(value: Any) -> str:
    """A value as text the CLI's override parser reads back to the same value."""
    from qtrainer.recipes.yaml_codec import parse_yaml

    if isinstance(value, str):
        try:
            if parse_yaml(value) == value and value.strip() == value and value:
                return value
        except Exception:  # noqa: BLE001 - quote anything YAML would not read as itself
            pass
    return json.dumps(value)


def load_plan(path: Path, quick: bool) -> dict:
    """The rows file, with the ``quick`` section applied when asked."""
    from qtrainer.recipes.yaml_codec import parse_yaml

    plan = parse_yaml(path.read_text(), source=str(path))
    for key in ("common", "fp", "qat_epochs", "rows"):
        if key not in plan:
            raise SystemExit(f"{path}: missing key '{key}'")
    names = [r["name"] for r in plan["rows"]]
    if len(set(names)) != len(names) or "fp" in names:
        raise SystemExit(f"{path}: row names must be unique and not 'fp'")
    plan["mode"] = "quick" if quick else "full"
    plan.setdefault("benchmark", "cifar10-resnet20-accuracy")
    plan.setdefault("title", plan["benchmark"])
    plan.setdefault("processes", 1)
    plan["all_rows"] = list(plan["rows"])
    if quick:
        q = plan.get("quick") or {}
        plan["common"] = {**plan["common"], **(q.get("common") or {})}
        plan["fp"] = {**plan["fp"], "overrides": {**plan["fp"]["overrides"], **(q.get("fp") or {})}}
        for key in ("qat_epochs", "qat_epochs_min", "qat_epochs_max", "processes"):
            if key in q:
                plan[key] = q[key]
        wanted = q.get("rows") or names
        unknown = [n for n in wanted if n not in names]
        if unknown:
            raise SystemExit(f"{path}: quick.rows names unknown rows {unknown}")
        plan["rows"] = [{**r, "default": r["name"] in wanted} for r in plan["rows"]]
    return plan


def device_overrides(device: str) -> dict:
    """Where the run happens: ``trainer.accelerator`` and the DeviceLoader's ``data.device``.
    The precision is the rows file's (bf16 autocast is 1.6-1.9x faster than fp32 on a CPU with
    avx512_bf16; the GPU table's quick mode sets 32-true)."""
    if device == "cpu":
        return {"trainer.accelerator": "cpu", "data.device": "cpu"}
    return {"trainer.accelerator": "gpu", "data.device": "cuda"}


def device_name(device: str, threads: int | None = None) -> str:
    import torch

    if device == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    n = threads or torch.get_num_threads()
    return f"cpu ({n} thread{'s' if n != 1 else ''})"


def _rel(path: Path, start: Path) -> str:
    return os.path.relpath(os.path.abspath(path), os.path.abspath(start))


def command(run_file: str, overrides: dict, output_dir: Path) -> str:
    """The ``qtrainer run`` command line equivalent to a row (paths relative to the repo root,
    where it is to be run)."""
    items = [f"{k}={_yaml_value(v)}" for k, v in overrides.items() if k != "output_dir"]
    return " ".join(["qtrainer", "run", shlex.quote(run_file), *map(shlex.quote, items),
                     "-o", shlex.quote(_rel(output_dir, ROOT))])


def fingerprint(*parts: Any) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


class Job:
    """One unit of the table: the FP baseline, or one row at one seed."""

    def __init__(self, key: str, row: dict, seed: int, run_file: str, overrides: dict,
                 output_dir: Path):
        self.key, self.row, self.seed = key, row, seed
        self.run_file, self.overrides, self.output_dir = run_file, overrides, output_dir
        self.fresh = False  # start again even where the folder holds a (finished) run

    @property
    def is_fp(self) -> bool:
        return self.key == "fp"

    @property
    def command(self) -> str:
        return command(self.run_file, self.overrides, self.output_dir)

    def fingerprint(self) -> str:
        """What the job's result depends on: for the FP model what ``fp.ckpt`` depends on
        (model, data, seed, pretrain), for a row its run file's text and overrides."""
        if self.is_fp:
            cfg = self.load()
            return fingerprint(cfg.model, cfg.data, cfg.seed, cfg.pretrain.to_dict())
        return fingerprint(self.run_file, self.overrides, (ROOT / self.run_file).read_text())

    def load(self):
        from qtrainer.run import load_run_file

        return load_run_file(ROOT / self.run_file if not os.path.isabs(self.run_file)
                             else self.run_file,
                             {**self.overrides, "output_dir": str(self.output_dir)})


def make_jobs(plan: dict, out_dir: Path, device: str, qat_epochs: int | None,
              fp_epochs: int | None, selected: list[str] | None) -> list[Job]:
    """The FP job, then one job per (row, seed) of the selected rows, in the file's order."""
    runs = out_dir / "runs"
    common = {**plan["common"], **device_overrides(device)}
    fp_over = {**common, **plan["fp"]["overrides"]}
    if fp_epochs is not None:
        fp_over["pretrain.epochs"] = fp_epochs
    fp_over["seed"] = 0
    fp = Job("fp", {"name": "fp", "method": "full precision", "label": "FP"}, 0,
             plan["fp"]["run_file"], fp_over, runs / "fp")
    epochs = qat_epochs if qat_epochs is not None else plan["qat_epochs"]
    jobs = [fp]
    names = [r["name"] for r in plan["rows"]]
    if selected:
        unknown = [n for n in selected if n not in names and n != "fp"]
        if unknown:
            raise SystemExit(f"--rows: unknown rows {', '.join(unknown)}; known: "
                             f"{', '.join(names)}")
    for row in plan["rows"]:
        if selected is not None and row["name"] not in selected:
            continue
        if selected is None and row.get("default", True) is False:
            continue
        seeds = row.get("seeds") or [0]
        run_file = row["run_file"]
        fp_ckpt = _rel(fp.output_dir / "fp.ckpt", (ROOT / run_file).parent)
        for seed in seeds:
            key = row["name"] if len(seeds) == 1 else f"{row['name']}-seed{seed}"
            over = {**common, **row.get("overrides", {}),
                    "model.checkpoint": fp_ckpt, "pretrain": None,
                    "trainer.max_epochs": epochs, "seed": seed}
            jobs.append(Job(key, row, seed, run_file, over, runs / key))
    return jobs


# ----------------------------------------------------------------------------- results file


def read_results(path: Path, mode: str, benchmark: str = "cifar10-resnet20-accuracy") -> dict:
    if not path.is_file():
        return {"schema": SCHEMA_VERSION, "benchmark": benchmark, "mode": mode, "rows": {}}
    data = json.loads(path.read_text())
    if data.get("mode") != mode:
        raise SystemExit(f"{path} holds a {data.get('mode')!r} table; this is a {mode!r} run "
                         "(use another --out)")
    if data.get("benchmark", "cifar10-resnet20-accuracy") != benchmark:
        raise SystemExit(f"{path} holds the {data.get('benchmark')!r} table; this is "
                         f"{benchmark!r} (use another --out)")
    data.setdefault("rows", {})
    return data


def write_results(path: Path, data: dict) -> None:
    from qtrainer.atomic import write_text_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


# ----------------------------------------------------------------------------- clock


class Clock:
    """Epoch wall times of the job being run and this call's deadline.

    The times (training plus validation of each epoch, the GPU synchronized) are kept in
    ``<job dir>/epoch_times.json`` so that a job resumed in a later call keeps the epochs it
    ran before. ``deadline`` (``time.monotonic()`` value or None): at an epoch start, when the
    epoch would not end ``margin`` seconds before it, the job is interrupted the way Ctrl-C
    interrupts ``qtrainer run`` (its last.ckpt is intact and the next call resumes it).
    """

    def __init__(self, deadline: float | None = None, margin: float = 30.0):
        self.deadline, self.margin = deadline, margin
        self.path: Path | None = None
        self.times: dict[int, float] = {}
        self.expected: float | None = None  # seconds per epoch before one is measured
        self.stopped = False
        self._t0: float | None = None

    def start_job(self, job_dir: Path, expected: float | None) -> None:
        self.path = job_dir / "epoch_times.json"
        self.times = {}
        if self.path.is_file():
            self.times = {int(k): float(v) for k, v in json.loads(self.path.read_text()).items()}
        self.expected, self.stopped, self._t0 = expected, False, None

    def remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def epoch_estimate(self) -> float | None:
        if self.times:
            return self.times[max(self.times)]
        return self.expected

    def on_epoch_start(self, epoch: int) -> None:
        left = self.remaining()
        if left is not None and left < (self.epoch_estimate() or 0.0) + self.margin:
            self.stopped = True
            raise KeyboardInterrupt(f"time limit: stopping before epoch {epoch}")
        self._t0 = time.perf_counter()

    def on_epoch_end(self, epoch: int) -> None:
        if self._t0 is None:
            return
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        self.times[epoch] = time.perf_counter() - self._t0
        self._t0 = None
        if self.path is not None:
            from qtrainer.atomic import write_text_atomic

            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.path, json.dumps({str(k): v for k, v in
                                                     sorted(self.times.items())}) + "\n")

    def summary(self) -> dict:
        values = [self.times[k] for k in sorted(self.times)]
        if not values:
            return {"epoch_times_s": [], "time_per_epoch_s": None,
                    "time_per_epoch_median_s": None}
        ordered = sorted(values)
        return {"epoch_times_s": [round(v, 3) for v in values],
                "time_per_epoch_s": sum(values) / len(values),
                "time_per_epoch_median_s": ordered[len(ordered) // 2]}


CLOCK = Clock()


def _clock_callback():
    """A Lightning callback feeding :data:`CLOCK` (added to every training stage of qtrainer's
    runner through ``qtrainer.run.runner.EXTRA_CALLBACKS``)."""
    from lightning.pytorch.callbacks import Callback

    class EpochClock(Callback):
        def on_train_epoch_start(self, trainer, pl_module) -> None:
            CLOCK.on_epoch_start(trainer.current_epoch)

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            CLOCK.on_epoch_end(trainer.current_epoch)

    return EpochClock()


def export_state(out: Path, export_dir: Path, done: set[str]) -> None:
    """Write into ``export_dir`` the JSON, the markdown and ``state.tar.gz``: what a later call
    on another machine needs to continue, laid out as the ``--out`` folder (extract it there):
    the results, the FP model, each finished row's summary, metrics and epoch times, and the
    checkpoint, logs and epoch times of an unfinished job; no finished row's checkpoints, no
    plots, no TensorBoard logs. Three files, for transfer tools that take few."""
    import shutil
    import tarfile

    base = out.parent
    export_dir.mkdir(parents=True, exist_ok=True)
    members = [out, out.with_suffix(".md")]
    runs = base / "runs"
    if runs.is_dir():
        for path in sorted(runs.rglob("*")):
            if not path.is_file():
                continue
            parts = path.relative_to(runs).parts
            if "plots" in parts or "tensorboard" in parts or path.name == "best.ckpt" \
                    or path.name.endswith(".tmp"):
                continue
            if path.suffix == ".ckpt" and path.name != "fp.ckpt" and (
                    parts[0] in done or parts[0].startswith("calibration-")):
                continue  # finished, or a calibration run (always run again from the start)
            members.append(path)
    for path in members[:2]:
        if path.is_file():
            shutil.copy2(path, export_dir / path.name)
    tmp = export_dir / "state.tar.gz.tmp"
    with tarfile.open(tmp, "w:gz") as tar:
        for path in members:
            if path.is_file():
                tar.add(path, arcname=str(path.relative_to(base)))
    os.replace(tmp, export_dir / "state.tar.gz")


# ----------------------------------------------------------------------------- running


def _last_val_acc(job_dir: Path) -> float | None:
    from qtrainer.report import epoch_series, read_csv

    path = job_dir / "metrics.csv"
    if not path.is_file():
        return None
    _, values = epoch_series(read_csv(path), "val_acc")
    return values[-1] if values else None


def oscillation_history(job_dir: Path) -> dict:
    """Oscillation over a run, from its ``metrics.csv``: ``oscillating_mean`` (the oscillating
    fraction averaged over the epochs; the final one is ~0 once the learning rate has decayed)
    and ``oscillations`` (reversing code flips counted over all steps). Empty without
    tracking."""
    from qtrainer.report import epoch_series, read_csv

    path = job_dir / "metrics.csv"
    if not path.is_file():
        return {}
    rows = read_csv(path)
    _, fractions = epoch_series(rows, "qat/osc_fraction")
    _, counts = epoch_series(rows, "qat/osc_count")
    if not fractions:
        return {}
    return {"oscillating_mean": sum(fractions) / len(fractions), "oscillations": sum(counts)}


def _fp_record(job: Job, echo) -> dict:
    """Pretrain (or reuse) the FP model through :func:`qtrainer.run.pretrain`; its
    validation and test accuracy."""
    import lightning.pytorch as pl

    from qtrainer.lightning_setup import evaluate_module
    from qtrainer.run import prepare, pretrain, write_json
    from qtrainer.run.runner import fp_module

    cfg = job.load()
    out = cfg.output_dir
    if job.fresh:  # --redo fp: train it again
        import shutil

        shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.yaml").write_text(cfg.to_yaml())  # for qtrainer eval of fp.ckpt
    import torch

    threads = torch.get_num_threads()
    if cfg.num_threads is not None:  # as qtrainer.run.run does
        torch.set_num_threads(cfg.num_threads)
    try:
        pl.seed_everything(cfg.seed, workers=True, verbose=False)
        bundle, model = prepare(cfg)
        last = out / "pretrain" / "checkpoints" / "last.ckpt"
        resumed = last.is_file() and not (out / "fp.ckpt").is_file()
        rec = pretrain(model, bundle, cfg, out, resume=resumed, echo=echo)
        trainer_kwargs = {k: v for k, v in cfg.trainer.items() if k != "max_epochs"}
        module = fp_module(model, bundle, cfg)
        val = evaluate_module(module, bundle.val_loader(), trainer_kwargs) \
            if bundle.val is not None else None
    finally:
        torch.set_num_threads(threads)
    if val is not None and "val_acc" not in rec:
        rec["val_acc"] = val["acc"]
        write_json(out / "fp.json", rec)
    return {"test_acc": rec["acc"], "val_acc": None if val is None else val["acc"],
            "epochs": rec["epochs"], "wall_time_s": rec["wall_time_s"], "resumed": resumed,
            "bits": "32/32", "avg_weight_bits": 32.0, "avg_act_bits": 32.0,
            "precision": cfg.trainer.get("precision")}


MODE_GAP_BATCHES = 20


def mode_gap(cfg) -> dict:
    """BatchNorm's part of a train/eval gap: top-1 (%) of a run's last checkpoint on
    :data:`MODE_GAP_BATCHES` augmented training batches (a fixed epoch's) with BN batch
    statistics (``train_mode_acc``, what training sees) and with its running statistics
    (``eval_mode_acc``, what is evaluated), quantizers hard in both, fp32;
    ``mode_gap = train_mode_acc - eval_mode_acc`` in points. Batch statistics are read, never
    written: the running statistics are restored."""
    import torch

    from qtrainer.run import bundle_loaders, load_checkpoint_model
    from qtrainer.surgery import set_quantizers

    threads = torch.get_num_threads()
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    try:
        module, bundle, _ = load_checkpoint_model(cfg.output_dir / "checkpoints" / "last.ckpt",
                                                  cfg)
        model = module.model
        set_quantizers(model, hard=True)
        loader = bundle_loaders(bundle, cfg.seed)[0]
        for obj in (loader, getattr(loader, "sampler", None)):
            if callable(getattr(obj, "set_epoch", None)):
                obj.set_epoch(10_000)
        batches = [b for _, b in zip(range(MODE_GAP_BATCHES), loader)]
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        acc = {}
        with torch.no_grad():
            for name, training in (("train_mode_acc", True), ("eval_mode_acc", False)):
                model.train(training)
                right = total = 0
                for x, y in batches:
                    right += int((model(x).argmax(1) == y).sum())
                    total += len(y)
                acc[name] = 100.0 * right / total
                model.load_state_dict(saved)
    finally:
        torch.set_num_threads(threads)
    return {**acc, "mode_gap": acc["train_mode_acc"] - acc["eval_mode_acc"]}


def _qat_record(job: Job, echo) -> dict:
    """One ``qtrainer run`` of a row (resumed from its last.ckpt when it was interrupted)."""
    from qtrainer.recipes import RecipeError
    from qtrainer.run import run

    cfg = job.load()
    last = cfg.output_dir / "checkpoints" / "last.ckpt"
    resumed = last.is_file() and not job.fresh
    try:
        result = run(cfg, resume=resumed, overwrite=not resumed, echo=echo)
    except RecipeError as e:  # the folder holds a run of another configuration
        if not resumed:
            raise
        echo(f"{job.key}: cannot resume ({e.detail}); starting again")
        resumed = False
        result = run(cfg, resume=False, overwrite=True, echo=echo)
    s = result.jobs[0].summary
    resumed = resumed or result.jobs[0].skipped
    r = cfg.recipe
    osc = s.get("oscillation") or {}  # weight oscillation at the end (issue #15)
    return {**mode_gap(cfg), "test_acc": s["quantized_acc"],
            "val_acc": _last_val_acc(cfg.output_dir),
            "fp_test_acc": s.get("fp_acc"), "epochs": s["epochs"],
            "wall_time_s": s["wall_time_s"], "resumed": resumed,
            "recipe": r.name, "recipe_hash": r.content_hash(), "method": r.method.name,
            "bits": f"{r.bits.weight}/{r.bits.activation}",
            "avg_weight_bits": s.get("avg_weight_bits"), "avg_act_bits": s.get("avg_act_bits"),
            "size_mb": s.get("size_mb"), "gbops": s.get("gbops"),
            "oscillating": osc.get("oscillating"), "frozen": osc.get("frozen"),
            **oscillation_history(cfg.output_dir),
            "precision": cfg.trainer.get("precision")}


def run_job(job: Job, device: str, fp: dict | None, echo, expected: float | None) -> dict | None:
    """Run one job; its JSON record, or None when the time limit stopped it (resumable)."""
    CLOCK.start_job(job.output_dir, expected)
    start, cpu_start = time.perf_counter(), time.process_time()
    try:
        rec = _fp_record(job, echo) if job.is_fp else _qat_record(job, echo)
    except SystemExit:  # Lightning's answer to the KeyboardInterrupt of the time limit
        if CLOCK.stopped:
            return None
        raise
    wall = time.perf_counter() - start
    rec["cpu_time_s"] = time.process_time() - cpu_start  # this process's CPU, all threads
    epochs = rec["epochs"]
    rec.update(CLOCK.summary())
    rec.update(
        name=job.key, row=job.row["name"], seed=job.seed,
        label=job.row.get("label") or _bits_label(rec.get("bits")),
        method_label=job.row.get("method", rec.get("method")),
        fit_time_per_epoch_s=rec["wall_time_s"] / epochs if epochs else None,
        row_wall_time_s=wall, device=device_name(device, job.overrides.get("num_threads")),
        command=job.command,
        run_file=job.run_file, overrides=job.overrides, output_dir=str(job.output_dir),
        fingerprint=job.fingerprint(), finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    if rec.get("time_per_epoch_s") is None:
        rec["time_per_epoch_s"] = rec["fit_time_per_epoch_s"]
    if fp is not None:
        rec["fp_fingerprint"] = fp.get("fingerprint")
    _deltas(rec, fp)
    return rec


def _bits_label(bits: str | None) -> str:
    if not bits or "/" not in bits:
        return "?"
    w, a = bits.split("/")
    return f"W{w}A{a}"


def _deltas(rec: dict, fp: dict | None) -> None:
    """Percentage-point changes vs the FP model (test vs FP test, val vs FP val)."""
    for split in ("test", "val"):
        acc, base = rec.get(f"{split}_acc"), None if fp is None else fp.get(f"{split}_acc")
        rec[f"delta_{split}"] = None if acc is None or base is None else 100 * (acc - base)


def table_order(plan: dict) -> list[str]:
    return [r["name"] for r in plan["rows"]]


# ----------------------------------------------------------------------------- main


def _environment(device: str, plan: dict, jobs: list[Job]) -> dict:
    import lightning
    import torch

    over = jobs[0].overrides
    return {"device": device_name(device, over.get("num_threads")), "torch": torch.__version__,
            "lightning": lightning.__version__, "precision": over.get("trainer.precision"),
            "batch_size": over.get("data.batch_size"),
            "data": "npz-jpeg CIFAR-10 (default root), device-resident"
                    if over.get("data.device_resident") else "npz-jpeg CIFAR-10 (default root)",
            "python": sys.version.split()[0],
            "val_images": over.get("data.val_size"),
            "test_images": 10 * over["data.test_per_class"] if over.get("data.test_per_class")
            else "the 10,000"}


def _rates(data: dict) -> tuple[float | None, float | None]:
    """Measured seconds per epoch: FP, and the mean over the QAT rows so far."""
    rows = data["rows"]
    fp = rows.get("fp", {}).get("time_per_epoch_s")
    qat = [r["time_per_epoch_s"] for k, r in rows.items() if k != "fp" and r.get("time_per_epoch_s")]
    return fp, (sum(qat) / len(qat) if qat else None)


OVERHEAD_S = 15.0
"""Seconds a job spends outside its epochs (data, evaluation, summary, plots): a guess."""


def _projection(data: dict, jobs: list[Job], plan_epochs: dict[str, int]) -> float | None:
    """Seconds left for the jobs not in the results, from the rates measured so far."""
    fp_rate, qat_rate = _rates(data)
    left = 0.0
    for job in jobs:
        if job.key in data["rows"]:
            continue
        rate = fp_rate if job.is_fp else qat_rate
        if rate is None:
            return None
        left += rate * plan_epochs[job.key] + OVERHEAD_S
    return left


def choose_qat_epochs(budget_s: float, used_s: float, pending: list[str],
                      rates: dict[str, float], overhead_s: float, lo: int, hi: int) -> int:
    """The QAT epochs (equal for every row) that fit the rest of the budget: ``pending`` lists
    the method family of each QAT job still to run, ``rates`` the seconds per epoch of each
    family, ``overhead_s`` a job's time outside its epochs; clamped to ``[lo, hi]``."""
    per_epoch = sum(rates[m] for m in pending)
    if per_epoch <= 0:
        return hi
    epochs = int((budget_s - used_s - overhead_s * len(pending)) // per_epoch)
    return max(lo, min(hi, epochs))


def _family(job: Job) -> str:
    """``nipq`` or ``lsq`` (LSQ and tempering cost about the same per epoch)."""
    return "nipq" if job.load().recipe.method.name == "nipq" else "lsq"


def calibration_jobs(plan: dict, out_dir: Path, device: str) -> list[Job]:
    """Two-epoch runs that measure the seconds per QAT epoch on this device: the first
    tempering row (the costlier of the LSQ family) and the first NIPQ row of the plan."""
    runs = out_dir / "runs"
    common = {**plan["common"], **device_overrides(device)}
    fp_dir = runs / "fp"
    rows = plan.get("all_rows", plan["rows"])
    picked: dict[str, dict] = {}
    for family, words in (("lsq", ("tempering", "lsq")), ("nipq", ("nipq",))):
        for word in words:
            match = [r for r in rows if word in Path(r["run_file"]).name]
            if match:
                picked[family] = match[0]
                break
    jobs = []
    for family, row in sorted(picked.items()):
        key = f"calibration-{family}"
        over = {**common, **row.get("overrides", {}),
                "model.checkpoint": _rel(fp_dir / "fp.ckpt", (ROOT / row["run_file"]).parent),
                "pretrain": None, "trainer.max_epochs": 2, "seed": 0}
        jobs.append(Job(key, {**row, "name": key}, 0, row["run_file"], over, runs / key))
    return jobs


def _set_qat_epochs(jobs: list[Job], epochs: int) -> None:
    for job in jobs:
        if not job.is_fp:
            job.overrides["trainer.max_epochs"] = epochs


# ----------------------------------------------------------------------------- processes


RECORD = "record.json"
"""A worker's result, in its job's folder; the parent merges it into --out."""


def _worker(args, jobs: list[Job], device: str, out: Path, plan: dict) -> int:
    """``--job KEY``: run that one QAT job in this process and write its record to
    ``<job dir>/record.json`` (the parent, which alone writes --out, merges it). Exit code 0,
    or 3 when ``--time-limit`` stopped it (resumable)."""
    import qtrainer.run.runner as runner
    from qtrainer.lightning_setup import quiet_lightning

    by_key = {j.key: j for j in jobs}
    if args.job not in by_key or by_key[args.job].is_fp:
        raise SystemExit(f"--job: no QAT job {args.job!r}; jobs: {', '.join(by_key)}")
    job = by_key[args.job]
    job.fresh = args.fresh
    fp = read_results(out, plan["mode"], plan["benchmark"])["rows"].get("fp")
    if fp is None:
        raise SystemExit(f"--job {job.key}: {out} holds no FP row yet")
    quiet_lightning()
    CLOCK.deadline = None if args.time_limit is None else time.monotonic() + args.time_limit
    runner.EXTRA_CALLBACKS.append(_clock_callback)
    try:
        rec = run_job(job, device, fp, lambda text: print(f"[{job.key}] {text}", flush=True),
                      None)
    finally:
        runner.EXTRA_CALLBACKS.remove(_clock_callback)
    if rec is None:
        return 3
    write_results(job.output_dir / RECORD, rec)
    return 0


def run_parallel(pending: list[Job], processes: int, base_args: list[str], finish, echo
                 ) -> list[str]:
    """Run the QAT jobs ``pending`` (in their order: longest first) in at most ``processes``
    worker processes at a time (``accuracy.py --job KEY``, with ``OMP_NUM_THREADS`` set to the
    job's ``num_threads``); ``finish(job, record)`` receives each result. A worker's output
    goes to ``<job dir>/worker.log``. Returns the keys not done (failed or stopped)."""
    import subprocess

    left: list[str] = []
    queue = list(pending)
    running: dict[str, tuple[subprocess.Popen, Job, Any]] = {}
    deadline = CLOCK.deadline
    try:
        while queue or running:
            while queue and len(running) < processes:
                job = queue.pop(0)
                job.output_dir.mkdir(parents=True, exist_ok=True)
                (job.output_dir / RECORD).unlink(missing_ok=True)
                cmd = [sys.executable, str(Path(__file__).resolve()), *base_args, "--job", job.key]
                if job.fresh:
                    cmd.append("--fresh")
                if deadline is not None:
                    cmd += ["--time-limit", f"{max(deadline - time.monotonic(), 1.0):.0f}"]
                env = dict(os.environ)
                if job.overrides.get("num_threads"):
                    n = str(job.overrides["num_threads"])
                    env.update(OMP_NUM_THREADS=n, MKL_NUM_THREADS=n)
                log = open(job.output_dir / "worker.log", "a")  # noqa: SIM115 - closed below
                echo(f"[{job.key}] started in a worker process: {job.command}")
                running[job.key] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                                     env=env, cwd=ROOT), job, log)
            time.sleep(1.0)
            for key, (proc, job, log) in list(running.items()):
                code = proc.poll()
                if code is None:
                    continue
                del running[key]
                log.close()
                record = job.output_dir / RECORD
                if code == 0 and record.is_file():
                    finish(job, json.loads(record.read_text()))
                else:
                    left.append(key)
                    why = "stopped by --time-limit (resumes from its last.ckpt)" if code == 3 \
                        else f"failed (exit code {code})"
                    echo(f"[{key}] {why}; see {job.output_dir / 'worker.log'}")
    finally:
        for proc, job, log in running.values():  # interrupted: stop our own workers
            proc.terminate()
            proc.wait()
            log.close()
            left.append(job.key)
    return left + [j.key for j in queue]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="the results JSON (the table goes next to it "
                                                "as .md, the runs under runs/)")
    p.add_argument("--preset", choices=tuple(PRESETS), default="gpu",
                   help="gpu: the CIFAR-10 ResNet-20 table (issue #5, accuracy_rows.yaml); cpu: "
                        "the ResNet-9 table for a 2-core CPU in under an hour (issue #12, "
                        "accuracy_cpu_rows.yaml, --device cpu)")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument("--quick", action="store_true", help="the tiny CPU configuration (tests)")
    p.add_argument("--processes", type=int, help="QAT jobs run at a time, each in its own "
                   "process (default: the rows file's, 2 for the cpu preset)")
    p.add_argument("--job", help=argparse.SUPPRESS)  # worker: run this job, write its record
    p.add_argument("--fresh", action="store_true", help=argparse.SUPPRESS)  # worker: start over
    p.add_argument("--rows", help="comma-separated row names (default: the default rows)")
    p.add_argument("--redo", help="comma-separated row names to run again")
    p.add_argument("--qat-epochs", type=int, help="QAT epochs of every row (default: the rows "
                   "already in --out, else --budget-min's choice, else the file's qat_epochs)")
    p.add_argument("--fp-epochs", type=int, help="FP pretraining epochs (default: the file's)")
    p.add_argument("--budget-min", type=float, metavar="MINUTES",
                   help="choose the QAT epochs (equal for all rows, within the file's "
                        "qat_epochs_min..qat_epochs_max) so that the whole table's jobs take "
                        "about this long, from 2-epoch calibration runs after the FP model")
    p.add_argument("--rows-file", help="the rows YAML (default: the preset's)")
    p.add_argument("--time-limit", type=float, metavar="SECONDS",
                   help="stop this call cleanly before this many seconds (at an epoch boundary; "
                        "exit code 3, run the same command again to continue)")
    p.add_argument("--export-dir", metavar="DIR", help="after every job, write accuracy.json, "
                   "accuracy.md and state.tar.gz (what a later call on a fresh machine needs "
                   "to continue; extract it into the --out folder) into DIR")
    p.add_argument("--list", action="store_true", help="print the jobs and commands; run nothing")
    args = p.parse_args(argv)

    import torch

    device = args.device
    if device == "auto":
        device = "cpu" if args.preset == "cpu" or not torch.cuda.is_available() else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    out = Path(args.out)
    md_path = out.with_suffix(".md")
    args.rows_file = args.rows_file or str(PRESETS[args.preset])
    plan = load_plan(Path(args.rows_file), args.quick)
    processes = max(1, args.processes or int(plan["processes"]))
    selected = [s.strip() for s in args.rows.split(",") if s.strip()] if args.rows else None
    jobs = make_jobs(plan, out.parent, device, args.qat_epochs, args.fp_epochs, selected)
    if args.job:
        return _worker(args, jobs, device, out, plan)
    data = read_results(out, plan["mode"], plan["benchmark"]) if not args.list \
        else {"rows": {}, "plan": {}}

    # QAT epochs: given, or those of the rows already made (equal epochs for all rows), or the
    # budget's choice of an earlier call, or (later) the budget's choice now, or the file's.
    made = sorted({r["epochs"] for k, r in data["rows"].items() if k != "fp" and r.get("epochs")})
    qat_epochs = args.qat_epochs or (made[0] if made else None) \
        or data.get("plan", {}).get("qat_epochs_chosen")
    if qat_epochs is None and not args.budget_min:
        qat_epochs = plan["qat_epochs"]
    if len(made) > 1 or (made and args.qat_epochs and args.qat_epochs != made[0]):
        print(f"warning: {out} holds rows with QAT epochs {made}; the table compares rows of "
              "unequal training (--redo them)", flush=True)
    if qat_epochs is not None:
        _set_qat_epochs(jobs, qat_epochs)
    else:  # chosen after the calibration runs
        for job in jobs[1:]:
            job.overrides.pop("trainer.max_epochs", None)

    def epochs_of(job: Job) -> int | None:
        value = job.overrides.get("pretrain.epochs") if job.is_fp \
            else job.overrides.get("trainer.max_epochs")
        return None if value is None else int(value)

    if args.list:
        print(f"{plan['title']}: {len(jobs)} jobs, QAT jobs in {processes} process(es) at a time")
        for job in jobs:
            print(f"{job.key}  ({epochs_of(job) or 'budget'} epochs)\n    {job.command}")
        return 0

    import qtrainer.run.runner as qtrainer_trainer
    from qtrainer.atomic import write_text_atomic

    from qtrainer.lightning_setup import quiet_lightning
    quiet_lightning()
    start = time.monotonic()
    CLOCK.deadline = None if args.time_limit is None else start + args.time_limit
    for name in [s.strip() for s in (args.redo or "").split(",") if s.strip()]:
        dropped = [k for k, r in data["rows"].items() if k == name or r.get("row") == name]
        if not dropped:
            raise SystemExit(f"--redo: no row {name!r} in {out}")
        for k in dropped:
            del data["rows"][k]
        for job in jobs:
            job.fresh = job.fresh or job.key in dropped
    data["command"] = " ".join(["python", "benchmarks/accuracy.py",
                                *map(shlex.quote, argv if argv is not None else sys.argv[1:])])
    data["environment"] = _environment(device, plan, jobs)
    data["title"] = plan["title"]
    data.setdefault("plan", {}).update(processes=processes)
    data["plan"].update(
        rows_file=_rel(Path(args.rows_file), ROOT), fp_epochs=epochs_of(jobs[0]),
        qat_epochs=qat_epochs, budget_min=args.budget_min, jobs=[j.key for j in jobs])
    order = table_order(plan)

    def echo(text: str) -> None:
        print(text, flush=True)

    def save() -> None:
        write_results(out, data)
        write_text_atomic(md_path, markdown(data, order))
        if args.export_dir:
            export_state(out, Path(args.export_dir), set(data["rows"]))

    def used_s() -> float:
        return sum(r.get("row_wall_time_s", 0.0) for r in data["rows"].values()) + \
            sum(c.get("wall_s", 0.0) for c in data.get("calibration", {}).values())

    def calibrate() -> int | None:
        """Measure s/epoch per method family with 2-epoch runs; choose the QAT epochs."""
        cal = data.setdefault("calibration", {})
        for job in calibration_jobs(plan, out.parent, device):
            family = job.key.removeprefix("calibration-")
            if family in cal:
                continue
            remaining = CLOCK.remaining()
            if remaining is not None and remaining < 90:
                return None
            import shutil

            shutil.rmtree(job.output_dir, ignore_errors=True)
            echo(f"[{job.key}] measuring seconds per epoch: {job.command}")
            t0 = time.perf_counter()
            rec = run_job(job, device, data["rows"]["fp"], echo, None)
            if rec is None:
                return None
            times = rec["epoch_times_s"]
            cal[family] = {"rate_s": min(times[1:] or times), "epoch_times_s": times,
                           "overhead_s": max(time.perf_counter() - t0 - sum(times), 0.0),
                           "wall_s": time.perf_counter() - t0, "job": job.key}
            save()
        pending = [_family(j) for j in jobs if not j.is_fp and j.key not in data["rows"]]
        rates = {f: c["rate_s"] for f, c in cal.items()}
        for f in set(pending) - set(rates):  # a family without its calibration run
            rates[f] = max(rates.values())
        overhead = max(c["overhead_s"] for c in cal.values())
        chosen = choose_qat_epochs(60 * args.budget_min, used_s(), pending, rates, overhead,
                                   int(plan.get("qat_epochs_min", 5)),
                                   int(plan.get("qat_epochs_max", plan["qat_epochs"])))
        echo(f"QAT epochs {chosen}: {', '.join(f'{f} {r:.2f} s/epoch' for f, r in rates.items())}"
             f", {len(pending)} jobs, {used_s() / 60:.1f} of {args.budget_min} min used")
        return chosen

    def finish(job: Job, rec: dict) -> None:
        data["rows"][job.key] = rec
        data["total_wall_time_s"] = used_s()
        save()
        proj = _projection(data, jobs, {j.key: epochs_of(j) or 0 for j in jobs})
        echo(f"[{job.key}] val {pct(rec.get('val_acc'))}%, test {pct(rec.get('test_acc'))}%"
             + ("" if job.is_fp else f" ({rec['delta_test']:+.2f} vs FP)")
             + f", {rec['time_per_epoch_s']:.2f} s/epoch, job {rec['row_wall_time_s']:.0f} s"
             + ("" if proj is None or processes > 1
                else f"; projected remaining {proj / 60:.1f} min"))

    fp = data["rows"].get("fp")
    left: list[str] = []
    parallel: list[Job] = []
    call = {"started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "processes": processes}
    data.setdefault("calls", []).append(call)
    qtrainer_trainer.EXTRA_CALLBACKS.append(_clock_callback)
    try:
        for job in jobs:
            done = data["rows"].get(job.key)
            if done is not None:
                if not job.is_fp and done.get("fp_fingerprint") != (fp or {}).get("fingerprint"):
                    echo(f"[{job.key}] note: made from another FP model; --redo {job.row['name']}")
                elif done.get("fingerprint") != job.fingerprint():
                    echo(f"[{job.key}] note: made with another configuration; --redo "
                         f"{job.row['name']} to run it again")
                echo(f"[{job.key}] already in {out}: skipped")
                continue
            if not job.is_fp and fp is None:
                left.append(job.key)
                continue
            if not job.is_fp and qat_epochs is None:
                qat_epochs = calibrate()
                if qat_epochs is None:  # the time limit came first
                    left.append(job.key)
                    continue
                data["plan"].update(qat_epochs=qat_epochs, qat_epochs_chosen=qat_epochs)
                _set_qat_epochs(jobs, qat_epochs)
                save()
            if not job.is_fp and processes > 1:
                parallel.append(job)
                continue
            fp_rate, qat_rate = _rates(data)
            rate = fp_rate if job.is_fp else qat_rate
            remaining = CLOCK.remaining()
            if remaining is not None and rate is not None \
                    and remaining < OVERHEAD_S + 2 * rate + CLOCK.margin:
                left.append(job.key)
                continue
            echo(f"[{job.key}] {epochs_of(job)} epochs: {job.command}")
            rec = run_job(job, device, None if job.is_fp else fp, echo, rate)
            if rec is None:
                echo(f"[{job.key}] stopped by --time-limit after {len(CLOCK.times)} epochs "
                     "(resumes from its last.ckpt)")
                left.append(job.key)
                save()
                continue
            if job.is_fp:
                fp = rec
            finish(job, rec)
        if parallel:
            base = ["--out", str(out), "--rows-file", args.rows_file, "--device", device,
                    "--qat-epochs", str(qat_epochs)] + (["--quick"] if args.quick else []) \
                + (["--rows", args.rows] if args.rows else [])
            left += run_parallel(parallel, processes, base, finish, echo)
    finally:
        qtrainer_trainer.EXTRA_CALLBACKS.remove(_clock_callback)
        call["wall_s"] = time.monotonic() - start
    save()
    echo("")
    echo(markdown(data, order))
    echo(f"wrote {out} and {md_path} ({time.monotonic() - start:.0f} s this call, "
         f"{used_s() / 60:.1f} min of jobs in all, {cpu_minutes(data):.1f} process-CPU min)")
    if left:
        echo(f"NOT DONE: {len(left)} jobs left ({', '.join(left)}); run the same command again")
        return 3
    echo("ALL JOBS DONE")
    return 0


if __name__ == "__main__":
    sys.exit(main())
