"""Interruptions lose at most the interrupted epoch (issue #6).

- ``qtrainer run`` as a real subprocess, killed with SIGKILL (nothing runs after it) or stopped
  with SIGINT (Ctrl-C: Lightning shuts down, the CLI says how to resume) while its second epoch
  trains, resumes with ``--resume`` from the first epoch's checkpoint and ends with the final
  metrics, layers, weights and metrics.csv of an uninterrupted run. The recipe is noise
  tempering, whose noise is drawn from the RNG at every step, so this also checks that the RNG
  state travels in the checkpoint.
- Checkpoint and export writes are atomic: writer processes killed at random moments
  (tests/kill_writer.py) always leave a complete previous (or the complete new) version that
  loads with ``weights_only=True`` / ``load_int``, never a half file.

The in-process Ctrl-C at an epoch boundary is tests/test_cli.py's
test_interrupted_run_resumes_to_the_uninterrupted_result; this file adds real signals in the
middle of an epoch.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch
import yaml
from procs import run as procs_run
from procs import started

from qtrainer.report import epoch_series, read_csv

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
EPOCHS = 3
COLUMNS = ("val_acc", "val_loss", "train_loss_epoch", "qat/lambda", "qat/avg_act_bits")


def run_file(folder: Path) -> Path:
    """Tempering W4A4 of a small CNN on digits: 3 epochs of 81 batches of 16 images."""
    raw = {"seed": 0, "num_threads": 1, "output_dir": str(folder / "out"),
           "recipe": {"extends": "tempering-4bit", "name": "interrupt-tempering",
                      "optimizer": {"lr": 0.01}, "weight_decay": {"base": 5e-4},
                      "phases": {"epochs": EPOCHS}},
           "model": {"name": "small_cnn", "width": 8},
           "data": {"name": "digits", "batch_size": 16},
           "trainer": {"enable_progress_bar": False, "log_every_n_steps": 20},
           "export": ["int"]}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def command(path: Path, *args: str, pause_at: str | None = None) -> tuple[list[str], dict]:
    """The command line and environment of ``qtrainer run PATH ARGS``; with ``pause_at``
    (``EPOCH:BATCH``) the run pauses there until a signal ends it (tests/interrupt_probe.py)
    and writes ``PATH.parent/paused`` when it does."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore"}
    if pause_at is None:
        return [sys.executable, "-m", "qtrainer.cli", "run", str(path), *args], env
    env.update(QTRAINER_PAUSE_AT=pause_at, QTRAINER_PAUSE_MARKER=str(path.parent / "paused"))
    return [sys.executable, str(HERE / "interrupt_probe.py"), "run", str(path), *args], env


def ckpt_epoch(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True)["epoch"]


def wait_for(path: Path, proc: subprocess.Popen, log: Path, timeout: float = 900.0) -> None:
    """Wait until ``path`` exists (the paused run wrote it) while ``proc`` runs."""
    begin = time.monotonic()
    while not path.exists():
        assert proc.poll() is None, f"the run ended before pausing:\n{log.read_text()[-3000:]}"
        assert time.monotonic() - begin < timeout, "the run did not reach its pause"
        time.sleep(0.05)


def final(out: Path) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    rows = read_csv(out / "metrics.csv")
    series = {c: epoch_series(rows, c) for c in COLUMNS}
    state = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    return {"summary": summary, "series": series, "state": state["state_dict"],
            "epoch": state["epoch"], "global_step": state["global_step"]}


def assert_same(a: dict, b: dict, label: str) -> None:
    for key in ("acc", "acc_top5", "loss"):
        assert b["summary"]["quantized"][key] == pytest.approx(a["summary"]["quantized"][key],
                                                               abs=1e-6), (label, key)
    assert b["summary"]["layers"] == a["summary"]["layers"], label
    assert (b["epoch"], b["global_step"]) == (a["epoch"], a["global_step"]), label
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        assert torch.equal(a["state"][k], b["state"][k]), (label, k)
    for column in COLUMNS:
        (ea, va), (eb, vb) = a["series"][column], b["series"][column]
        assert ea == eb == list(range(EPOCHS)), (label, column, ea, eb)
        assert vb == pytest.approx(va, abs=1e-6), (label, column)


@pytest.mark.slow
def test_sigkill_and_sigint_mid_epoch_resume_to_the_uninterrupted_run(tmp_path):
    paths = {name: run_file(tmp_path / name) for name in ("straight", "sigkill", "sigint")}
    signals = {"sigkill": signal.SIGKILL, "sigint": signal.SIGINT}
    pause = "1:40"  # (epoch, batch): the middle of epoch 1 (81 batches), after epoch 0's checkpoint
    logs = {name: path.parent / "log.txt" for name, path in paths.items()}
    with ExitStack() as stack:
        procs = {}
        for name, path in paths.items():
            cmd, env = command(path, pause_at=None if name == "straight" else pause)
            log = stack.enter_context(open(logs[name], "w"))
            procs[name] = stack.enter_context(started(
                cmd, cwd=path.parent, env=env, stdout=log, stderr=subprocess.STDOUT))
        for name, sig in signals.items():
            wait_for(paths[name].parent / "paused", procs[name], logs[name])
            procs[name].send_signal(sig)
        for proc in procs.values():
            proc.wait(timeout=900)
    outputs = {name: log.read_text() for name, log in logs.items()}

    assert procs["straight"].returncode == 0, outputs["straight"][-3000:]
    assert procs["sigkill"].returncode == -signal.SIGKILL
    assert procs["sigint"].returncode == 1, outputs["sigint"][-3000:]
    said = outputs["sigint"]
    assert "interrupted; continue with: qtrainer run" in said and "--resume" in said, said[-2000:]
    assert "Traceback" not in said, said[-3000:]
    for name in signals:
        out = tmp_path / name / "out"
        # the signal came after epoch 0's checkpoint, while epoch 1 was running
        assert ckpt_epoch(out / "checkpoints" / "last.ckpt") == 0, name
        assert not (out / "summary.json").exists()
    print(f"\nsignals sent at batch {pause} (epoch:batch), each run paused there")

    for name in signals:
        cmd, env = command(paths[name], "--resume")
        proc = procs_run(cmd, cwd=paths[name].parent, env=env, stderr=subprocess.STDOUT)
        text = proc.stdout
        assert proc.returncode == 0, text[-3000:]
        assert "resuming from" in text, text[-2000:]
        assert "Traceback" not in text

    reference = final(tmp_path / "straight" / "out")
    for name in ("sigkill", "sigint"):
        out = tmp_path / name / "out"
        assert_same(reference, final(out), name)
        # the second attempt started at epoch 1: only the interrupted epoch was trained again
        attempts = sorted((out / "logs" / "csv").iterdir(), key=lambda p: int(p.name))
        assert [p.name for p in attempts] == ["0", "1"]
        redone = {int(float(r["epoch"])) for r in read_csv(attempts[1] / "metrics.csv")
                  if r.get("epoch")}
        assert min(redone) == 1, redone
        from qtrainer.export.int_format import read_int

        ta, ha = read_int(tmp_path / "straight" / "out" / "export" / "model.safetensors")
        tb, hb = read_int(out / "export" / "model.safetensors")
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
        assert ha["layers"] == hb["layers"]
    q = reference["summary"]["quantized"]
    print(f"resumed after SIGKILL and SIGINT: test acc {q['acc']:.4f}, loss {q['loss']:.6f}, "
          "equal to the uninterrupted run (metrics.csv, weights, export)")


def kill_trials(mode: str, folder: Path, trials: int, seed: int) -> list[str]:
    folder.mkdir(parents=True)
    return [sys.executable, str(HERE / "kill_writer.py"), mode, str(folder), str(trials), str(seed)]


@pytest.mark.slow
def test_writers_killed_at_random_moments_leave_a_whole_file(tmp_path):
    trials = {"ckpt": 16, "int": 16}
    for mode, n in trials.items():
        proc = procs_run(kill_trials(mode, tmp_path / mode, n, seed=6), timeout=900)
        out, err = proc.stdout, proc.stderr
        assert proc.returncode == 0, err[-3000:]
        lines = [json.loads(line) for line in out.splitlines()]
        records, end = lines[:-1], lines[-1]
        assert len(records) == trials[mode]
        for r in records:
            assert r["ok"], r  # a complete version: the last finished or the one in flight
            leftovers = [f for f in r["files"] if f.startswith(".")]
            assert len(leftovers) <= 2 and all(".tmp" in f for f in leftovers), r
        inside = sum(r["killed_inside_write"] for r in records)
        assert inside >= trials[mode] // 4, records  # many kills did land inside a write
        assert end["files"] == ["last.ckpt" if mode == "ckpt" else "model.safetensors"], end
        print(f"\n{mode}: {len(records)} writers killed, {inside} inside a write; every file "
              f"whole ({sum(r['found'] == r['in_flight'] for r in records)} already the new "
              "version)")
