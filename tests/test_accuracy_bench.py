"""benchmarks/accuracy.py (issue #5) in its quick CPU configuration: the JSON holds the FP row
and every (row, seed) with accuracy, deltas, epochs, time per epoch, device and the `qtrainer
run` command; a second invocation skips the finished rows; the markdown table is written; the
rows file's full plan resolves to valid run files whose commands parse back to the overrides."""

from __future__ import annotations

import importlib.util
import json
import shlex
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "accuracy.py"


def _bench():
    spec = importlib.util.spec_from_file_location("accuracy_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["accuracy_bench"] = module
    spec.loader.exec_module(module)
    return module


def _have_cifar() -> bool:
    from qtrainer.data import default_cifar10_jpeg_root

    try:
        default_cifar10_jpeg_root()
        return True
    except FileNotFoundError:
        return False


def test_full_plan_resolves_to_valid_runs(tmp_path):
    """Every job of the GPU table validates as a run file, with the planned settings."""
    from qtrainer.recipes.io import parse_overrides

    bench = _bench()
    plan = bench.load_plan(bench.DEFAULT_ROWS, quick=False)
    jobs = bench.make_jobs(plan, tmp_path, "cuda", None, None, None)
    keys = [j.key for j in jobs]
    assert keys[0] == "fp"
    expected = {"lsq-w4a4", "tempering-w4a4", "nipq-w4a4", "lsq-w3a3", "tempering-w3a3",
                "nipq-w3a3", "nipq-mp-3bit", "nipq-mp-4bit", "lsq-textbook-w4a4"}
    expected |= {f"{m}-w2a2-seed{s}" for m in ("lsq", "tempering", "nipq") for s in (0, 1)}
    assert set(keys[1:]) == expected
    fp = jobs[0].load()
    assert fp.pretrain.epochs <= 200 and fp.data["val_size"] == 5000
    assert fp.data["device_resident"] and fp.trainer["precision"] == "bf16-mixed"
    epochs = set()
    for job in jobs[1:]:
        cfg = job.load()
        assert cfg.pretrain is None and cfg.model["checkpoint"].endswith("fp.ckpt")
        assert cfg.data["seed"] == 0 and cfg.data["val_size"] == 5000  # one split for all
        assert cfg.seed == job.seed and cfg.export == []
        epochs.add(cfg.recipe.phases.epochs)
        # the recorded command says the same as the overrides actually used
        argv = shlex.split(job.command)
        assert argv[:3] == ["qtrainer", "run", job.run_file] and argv[-2] == "-o"
        assert parse_overrides(argv[3:-2]) == {k: v for k, v in job.overrides.items()}
    assert epochs == {plan["qat_epochs"]}  # equal QAT epochs for every row
    by_key = {j.key: j.load().recipe for j in jobs[1:]}
    mp3 = by_key["nipq-mp-3bit"]
    assert (mp3.method.learn_bits, mp3.mixed_precision.target, mp3.mixed_precision.value) == \
        (True, "avg_bits", 3.0)
    assert by_key["nipq-w2a2-seed1"].bits.weight == 2 and by_key["lsq-w3a3"].bits.activation == 3
    textbook = by_key["lsq-textbook-w4a4"]
    assert (textbook.method.init, textbook.distillation.enabled, textbook.weight_decay.base,
            textbook.phases.bn_reestimation_batches) == ("lsq", False, 2.5e-4, 0)
    assert by_key["lsq-w4a4"].method.init == "mse" and by_key["lsq-w4a4"].distillation.enabled
    optional = bench.make_jobs(plan, tmp_path, "cuda", 7, 100, ["lsq-textbook-w2a2"])
    assert [j.key for j in optional] == ["fp", "lsq-textbook-w2a2-seed0", "lsq-textbook-w2a2-seed1"]
    assert optional[0].load().pretrain.epochs == 100 and optional[1].load().recipe.phases.epochs == 7


def test_targets_and_table_from_records():
    bench = _bench()

    def rec(row, seed, test, val=None, **kw):
        return {"row": row, "seed": seed, "test_acc": test, "val_acc": val or test,
                "method_label": row, "label": "x", "epochs": 15, "time_per_epoch_s": 3.0,
                "device": "H100", "command": f"qtrainer run {row}", "name": f"{row}-{seed}", **kw}

    rows = {"fp": rec("fp", 0, 0.905)}
    for m, acc4, acc3, acc2 in (("lsq", 0.904, 0.899, 0.885), ("tempering", 0.905, 0.898, 0.889),
                                ("nipq", 0.902, 0.897, 0.880)):
        rows[f"{m}-w4a4"] = rec(f"{m}-w4a4", 0, acc4)
        rows[f"{m}-w3a3"] = rec(f"{m}-w3a3", 0, acc3)
        for seed, d in ((0, -0.001), (1, 0.001)):
            rows[f"{m}-w2a2-seed{seed}"] = rec(f"{m}-w2a2", seed, acc2 + d)
    rows["nipq-mp-3bit"] = rec("nipq-mp-3bit", 0, 0.900, avg_weight_bits=3.05, avg_act_bits=2.97)
    rows["nipq-mp-4bit"] = rec("nipq-mp-4bit", 0, 0.904, avg_weight_bits=4.2, avg_act_bits=4.0)
    data = {"mode": "full", "rows": rows, "environment": {"device": "H100"}}
    for r in rows.values():
        bench._deltas(r, rows["fp"] if r is not rows["fp"] else None)
    result = {text: met for text, met, _ in bench.targets(data)}
    assert result["FP >= 90.0%"] is True
    assert result["nipq W4A4 >= FP - 0.2"] is False  # 90.2 < 90.3
    assert result["lsq W4A4 >= FP - 0.2"] is True
    assert result["best W2A2 >= FP - 2.0"] is True  # tempering 88.9 >= 88.5
    assert result["tempering W2A2 >= LSQ W2A2 + 0.3 (means of two seeds)"] is True
    assert result["NIPQ MP 3.0 bits >= LSQ W3A3"] is True
    assert result["NIPQ MP 3.0: final average W and A bits within 0.1 of 3.0"] is True
    assert result["NIPQ MP 4.0: final average W and A bits within 0.1 of 4.0"] is False
    table = bench.markdown(data, ["lsq-w4a4", "lsq-w2a2", "nipq-mp-3bit"])
    assert "| lsq-w2a2 |" in table and "88.50 (88.40..88.60)" in table
    assert "| fp |" in table and "-2.00 (-2.10..-1.90)" in table


def test_clock_stops_before_an_epoch_that_would_miss_the_deadline(tmp_path):
    bench = _bench()
    clock = bench.Clock(deadline=time.monotonic() + 100, margin=10)
    clock.start_job(tmp_path / "job", expected=None)
    clock.on_epoch_start(0)
    clock.on_epoch_end(0)
    saved = json.loads((tmp_path / "job" / "epoch_times.json").read_text())
    assert list(saved) == ["0"] and saved["0"] >= 0
    clock.times[0] = 95.0  # as if epoch 0 had taken 95 s: epoch 1 would end past the deadline
    with pytest.raises(KeyboardInterrupt):
        clock.on_epoch_start(1)
    assert clock.stopped
    again = bench.Clock()  # the next call resumes the job with the epochs it has measured
    again.start_job(tmp_path / "job", expected=None)
    assert list(again.times) == [0] and again.deadline is None
    again.on_epoch_start(1)  # no deadline: never stops
    again.on_epoch_end(1)
    assert again.summary()["epoch_times_s"][0] == pytest.approx(saved["0"], abs=1e-3)
    assert len(again.summary()["epoch_times_s"]) == 2


def _no_plots(monkeypatch):
    import qtrainer.report

    def no_plots(job_dir):  # matplotlib takes seconds per run here; the runner goes on without
        raise qtrainer.report.PlotsUnavailable("not in this test")

    monkeypatch.setattr(qtrainer.report, "make_plots", no_plots)


@pytest.mark.skipif(not _have_cifar(), reason="CIFAR-10 JPEG data not found")
def test_quick_run_writes_rows_then_skips_them(tmp_path, capsys, monkeypatch):
    _no_plots(monkeypatch)
    bench = _bench()
    out = tmp_path / "results" / "accuracy.json"
    assert bench.main(["--out", str(out), "--quick", "--device", "cpu"]) == 0
    data = json.loads(out.read_text())
    assert data["mode"] == "quick"
    rows = data["rows"]
    assert set(rows) == {"fp", "lsq-w2a2-seed0", "lsq-w2a2-seed1", "nipq-mp-3bit"}
    for key, r in rows.items():
        for field in ("val_acc", "test_acc", "delta_test", "delta_val", "epochs",
                      "time_per_epoch_s", "device", "command", "wall_time_s"):
            assert field in r, (key, field)
        assert 0.0 <= r["test_acc"] <= 1.0 and 0.0 <= r["val_acc"] <= 1.0
        assert r["epochs"] == 1 and r["time_per_epoch_s"] > 0
        assert r["device"].startswith("cpu")
        assert r["command"].startswith("qtrainer run recipes/cifar10_resnet20_")
        if key != "fp":
            assert r["delta_test"] == pytest.approx(100 * (r["test_acc"] - rows["fp"]["test_acc"]))
            assert r["fp_test_acc"] == pytest.approx(rows["fp"]["test_acc"])
            assert (out.parent / "runs" / key / "summary.json").is_file()
    assert rows["lsq-w2a2-seed1"]["seed"] == 1 and rows["lsq-w2a2-seed1"]["bits"] == "2/2"
    assert rows["nipq-mp-3bit"]["method"] == "nipq"
    assert (out.parent / "runs" / "fp" / "fp.ckpt").is_file()
    table = out.with_suffix(".md").read_text()
    assert "| lsq-w2a2 | LSQ | W2A2 | 2 |" in table and "| nipq-mp-3bit |" in table
    assert "Targets" in table and "`qtrainer run " in table
    capsys.readouterr()

    # again: nothing runs, every row is reported as skipped, the file is unchanged
    before = {k: r["finished_at"] for k, r in rows.items()}
    assert bench.main(["--out", str(out), "--quick", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert text.count("skipped") == 4
    again = json.loads(out.read_text())["rows"]
    assert {k: r["finished_at"] for k, r in again.items()} == before

    # what a later call on a fresh machine needs: results, the FP model, no finished checkpoints
    export = tmp_path / "export"
    bench.export_state(out, export, set(again))
    assert sorted(p.name for p in export.iterdir()) == ["accuracy.json", "accuracy.md",
                                                        "state.tar.gz"]
    assert (export / "accuracy.json").read_text() == out.read_text()
    with tarfile.open(export / "state.tar.gz") as tar:
        names = set(tar.getnames())
        restored = tmp_path / "restored"
        tar.extractall(restored, filter="data")
    assert {"accuracy.json", "accuracy.md", "runs/fp/fp.ckpt", "runs/fp/fp.json",
            "runs/nipq-mp-3bit/summary.json", "runs/lsq-w2a2-seed1/epoch_times.json"} <= names
    assert not [n for n in names if n.endswith(("last.ckpt", "best.ckpt", ".png"))]
    # a call on a fresh machine with the restored folder skips everything
    assert bench.main(["--out", str(restored / "accuracy.json"), "--quick", "--device",
                       "cpu"]) == 0
    assert capsys.readouterr().out.count("skipped") == 4

    # a time limit too short for another job: nothing starts, exit code 3, the row stays out
    code = bench.main(["--out", str(out), "--quick", "--device", "cpu", "--redo",
                       "nipq-mp-3bit", "--time-limit", "1"])
    assert code == 3 and "nipq-mp-3bit" not in json.loads(out.read_text())["rows"]
    assert "NOT DONE: 1 jobs left (nipq-mp-3bit)" in capsys.readouterr().out

    # a full-mode call refuses to mix with the quick table
    with pytest.raises(SystemExit, match="quick"):
        bench.main(["--out", str(out), "--device", "cpu", "--rows", "lsq-w4a4"])


@pytest.mark.skipif(not _have_cifar(), reason="CIFAR-10 JPEG data not found")
def test_time_limit_stops_at_an_epoch_and_the_next_call_resumes(tmp_path, capsys, monkeypatch):
    """The time limit interrupts a job the way Ctrl-C interrupts qtrainer run; the next call
    resumes it from its last.ckpt, keeping the epoch times of the earlier call."""
    import signal

    _no_plots(monkeypatch)
    bench = _bench()
    out = tmp_path / "accuracy.json"
    argv = ["--out", str(out), "--quick", "--device", "cpu", "--rows", "nipq-mp-3bit",
            "--fp-epochs", "2", "--qat-epochs", "2"]
    original = bench.Clock.on_epoch_start
    stopped: list[str] = []

    def deadline_at_epoch_1(self, epoch):  # as if the limit came at the start of epoch 1
        if epoch == 1 and str(self.path) not in stopped:
            stopped.append(str(self.path))
            self.deadline = time.monotonic()
        try:
            return original(self, epoch)
        finally:
            self.deadline = None

    handler = signal.getsignal(signal.SIGINT)  # Lightning ignores SIGINT after an interrupt
    monkeypatch.setattr(bench.Clock, "on_epoch_start", deadline_at_epoch_1)
    try:
        assert bench.main(argv) == 3  # the FP model stops after epoch 0
        assert "fp" not in json.loads(out.read_text())["rows"]
        assert (tmp_path / "runs/fp/pretrain/checkpoints/last.ckpt").is_file()
        assert bench.main(argv) == 3  # FP resumed and finished; the row stops after epoch 0
        rows = json.loads(out.read_text())["rows"]
        assert rows["fp"]["resumed"] and len(rows["fp"]["epoch_times_s"]) == 2
        assert "nipq-mp-3bit" not in rows
        monkeypatch.setattr(bench.Clock, "on_epoch_start", original)
        assert bench.main(argv) == 0  # the row resumed from its last.ckpt
    finally:
        signal.signal(signal.SIGINT, handler)
    row = json.loads(out.read_text())["rows"]["nipq-mp-3bit"]
    assert row["resumed"] and row["epochs"] == 2 and len(row["epoch_times_s"]) == 2
    assert len(stopped) == 2
    text = capsys.readouterr().out
    assert text.count("stopped by --time-limit after 1 epochs") == 2


def test_budget_chooses_equal_qat_epochs(tmp_path):
    bench = _bench()
    rates = {"lsq": 4.0, "nipq": 6.0}
    pending = ["lsq"] * 9 + ["nipq"] * 6  # the 15 QAT jobs of the table
    # 22 min, 8 used by FP and calibration: (840 - 15*15) / (9*4 + 6*6) = 8.5 -> 8
    assert bench.choose_qat_epochs(22 * 60, 8 * 60, pending, rates, 15.0, 5, 30) == 8
    assert bench.choose_qat_epochs(60 * 60, 8 * 60, pending, rates, 15.0, 5, 30) == 30  # capped
    assert bench.choose_qat_epochs(10 * 60, 9 * 60, pending, rates, 15.0, 5, 30) == 5  # floor
    plan = bench.load_plan(bench.DEFAULT_ROWS, quick=False)
    cal = bench.calibration_jobs(plan, tmp_path, "cuda")
    assert [j.key for j in cal] == ["calibration-lsq", "calibration-nipq"]
    assert [j.load().recipe.method.name for j in cal] == ["tempering", "nipq"]
    assert all(j.load().recipe.phases.epochs == 2 for j in cal)
    assert 8 <= plan["qat_epochs_min"] <= plan["qat_epochs"] <= plan["qat_epochs_max"]


def test_cpu_preset_plan(tmp_path):
    """The CPU preset (issue #12): FP + 11 QAT jobs of ResNet-9 (width 16) on 27,500 training
    images, bf16 training with fp32 evaluation, single-thread jobs two at a time, equal QAT
    epochs, two seeds for every 2-bit row that change the batch order and noise but not the
    split, longest jobs (NIPQ) first."""
    from qtrainer.recipes.io import parse_overrides

    bench = _bench()
    plan = bench.load_plan(bench.PRESETS["cpu"], quick=False)
    assert plan["processes"] == 2 and plan["benchmark"] == "cifar10-resnet9-cpu-accuracy"
    jobs = bench.make_jobs(plan, tmp_path, "cpu", None, None, None)
    keys = [j.key for j in jobs]
    two = [f"{r}-seed{s}" for r in ("nipq-official-init-w2a2", "lsq-damp-w2a2",
                                    "lsq-freeze-w2a2", "lsq-damp-w3a3", "lsq-freeze-w3a3",
                                    "tempering-w3a3", "nipq-w3a3") for s in (0, 1)]
    expected = ["fp", "nipq-mp-3bit", "nipq-w2a2-seed0", "nipq-w2a2-seed1", "nipq-w4a4",
                "tempering-w2a2-seed0", "tempering-w2a2-seed1", "tempering-w4a4",
                "lsq-w2a2-seed0", "lsq-w2a2-seed1", "lsq-w3a3-seed0", "lsq-w3a3-seed1",
                "lsq-w4a4", *two]
    assert keys == expected
    fp = jobs[0].load()
    assert fp.model == {"name": "resnet9", "width": 16} and fp.pretrain.epochs == 15
    assert fp.data["subset_per_class"] == 3000 and fp.data["val_size"] == 2500
    assert (fp.num_threads, fp.trainer["precision"], fp.eval_precision) == \
        (1, "bf16-mixed", "32-true")
    recipes = {}
    for job in jobs[1:]:
        cfg = job.load()
        recipes[job.key] = cfg.recipe
        assert cfg.model["name"] == "resnet9" and cfg.model["checkpoint"].endswith("fp.ckpt")
        assert cfg.data["seed"] == 0 and cfg.seed == job.seed  # one split; seed: order, noise
        assert (cfg.num_threads, cfg.trainer["precision"], cfg.eval_precision) == \
            (1, "bf16-mixed", "32-true")
        assert cfg.recipe.phases.epochs == plan["qat_epochs"] == 4
        assert cfg.recipe.phases.bn_reestimation_batches == 20
        argv = shlex.split(job.command)
        assert parse_overrides(argv[3:-2]) == job.overrides
    assert {j.seed for j in jobs if j.row["name"].endswith("w2a2")} == {0, 1}
    nipq = recipes["nipq-w2a2-seed0"]
    assert (nipq.method.name, nipq.bits.weight, nipq.phases.hard_epochs) == ("nipq", 2, 1)
    assert nipq.optimizer.lr == 0.04 and recipes["lsq-w2a2-seed1"].optimizer.lr == 0.02
    assert nipq.method.alpha_init == "mse"
    assert recipes["nipq-official-init-w2a2-seed1"].method.alpha_init == "official"
    osc = {k: r.oscillation for k, r in recipes.items()}
    assert all(o.track for o in osc.values())
    assert osc["lsq-damp-w2a2-seed0"].dampening.enabled and not osc["lsq-w2a2-seed0"].dampening.enabled
    assert osc["lsq-freeze-w3a3-seed1"].freezing.enabled
    assert recipes["lsq-freeze-w3a3-seed1"].bits.weight == 3
    mp = recipes["nipq-mp-3bit"].mixed_precision
    assert (mp.target, mp.value, mp.loss, mp.freeze, mp.w_scale, mp.a_scale) == \
        ("avg_bits", 3.0, "relative", "target", 1.0, 1.0)
    # the layout the script runs: FP in this process, then workers with --job, one thread each
    assert bench.main(["--out", str(tmp_path / "plan.json"), "--preset", "cpu", "--list"]) == 0


@pytest.mark.skipif(not _have_cifar(), reason="CIFAR-10 JPEG data not found")
def test_quick_run_in_two_worker_processes(tmp_path, capsys, monkeypatch):
    """--processes 2: the FP model in this process, then each QAT job in its own worker process
    (accuracy.py --job KEY), two at a time; their records are merged into --out by this process
    alone, with each job's CPU time and BN gap, and the wall time of the call."""
    _no_plots(monkeypatch)
    bench = _bench()
    out = tmp_path / "accuracy.json"
    argv = ["--out", str(out), "--quick", "--device", "cpu", "--processes", "2",
            "--rows", "lsq-w2a2"]
    assert bench.main(argv) == 0
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert set(rows) == {"fp", "lsq-w2a2-seed0", "lsq-w2a2-seed1"}
    for key in ("lsq-w2a2-seed0", "lsq-w2a2-seed1"):
        r = rows[key]
        assert r["cpu_time_s"] > 0 and r["epochs"] == 1
        assert 0 <= r["train_mode_acc"] <= 100 and 0 <= r["eval_mode_acc"] <= 100
        assert r["mode_gap"] == pytest.approx(r["train_mode_acc"] - r["eval_mode_acc"])
        assert 0 <= r["oscillating"] <= 1 and r["oscillations"] >= 0
        assert 0 <= r["oscillating_mean"] <= 1
        log = (tmp_path / "runs" / key / "worker.log").read_text()
        assert f"[{key}]" in log  # the worker's own output
    assert rows["lsq-w2a2-seed0"]["seed"] == 0 and rows["lsq-w2a2-seed1"]["seed"] == 1
    assert data["plan"]["processes"] == 2 and data["calls"][-1]["wall_s"] > 0
    text = capsys.readouterr().out
    assert text.count("started in a worker process") == 2
    assert "process CPU time of all jobs" in out.with_suffix(".md").read_text()
    # a second call finds everything done
    assert bench.main(argv) == 0
    assert capsys.readouterr().out.count("skipped") == 3
