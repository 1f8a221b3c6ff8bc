"""``qtrainer run`` with 2-process DDP on CPU (gloo) end to end (issue #6): both ranks end with
identical quantizer state, equal to the checkpoint's; rank 0 alone writes the run's files, once
(one summary.json, one metrics.csv, one log version, each checkpoint written once per epoch);
its summary's accuracy is that of the whole test set (a single-process ``qtrainer eval`` of the
checkpoint agrees).

The CLI runs under tests/cli_probe.py, which adds probes (each rank's quantizer state, every
file written and by which process) and then is the ``qtrainer`` command; Lightning starts rank 1
by running the same script again. Rank consistency of the callback alone, without the CLI, is
tests/test_ddp.py's.
"""

import json
import os
import signal
import procs
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from qtrainer.cli import app

HERE = Path(__file__).resolve().parent
EPOCHS = 2


@pytest.mark.slow
def test_two_process_ddp_run_through_the_cli(tmp_path):
    out, probe = tmp_path / "out", tmp_path / "probe"
    probe.mkdir()
    raw = {"seed": 0, "num_threads": 1, "output_dir": str(out),
           "recipe": {"extends": "lsq-4bit", "name": "ddp-lsq", "optimizer": {"lr": 0.01},
                      "phases": {"epochs": EPOCHS}},
           "model": {"name": "small_cnn", "width": 8},
           "data": {"name": "digits", "batch_size": 32},
           "trainer": {"enable_progress_bar": False}, "export": ["int"]}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "QTRAINER_PROBE_DIR": str(probe), "PYTHONWARNINGS": "ignore"}
    proc = procs.run(
        [sys.executable, str(HERE / "cli_probe.py"), "run", str(path), "trainer.strategy=ddp",
         "trainer.devices=2", "trainer.accelerator=cpu"],
        cwd=tmp_path, env=env, timeout=600)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]
    assert proc.stdout.count("full precision") == 1, proc.stdout  # one table, from rank 0

    # rank-consistent quantizer state, equal to what the checkpoint holds
    ranks = [torch.load(probe / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [r["rank"] for r in ranks] == [0, 1] and {r["world_size"] for r in ranks} == {2}
    assert ranks[0]["pid"] != ranks[1]["pid"]
    q0, q1 = ranks[0]["quantizers"], ranks[1]["quantizers"]
    assert q0.keys() == q1.keys() and any(k.endswith(".step") for k in q0)
    for k in q0:
        assert torch.equal(q0[k], q1[k]), k
    saved = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["epoch"] == EPOCHS - 1
    for k in q0:
        assert torch.equal(saved["state_dict"][k], q0[k]), k

    # one set of outputs, written by rank 0 only
    writers = {p.name.removeprefix("writes-").removesuffix(".txt"): p.read_text().split()
               for p in probe.glob("writes-*.txt")}
    assert list(writers) == [str(ranks[0]["pid"])], writers
    writes = Counter(Path(p).relative_to(out).as_posix() for p in writers[str(ranks[0]["pid"])])
    assert writes["checkpoints/last.ckpt"] == EPOCHS
    assert 1 <= writes["checkpoints/best.ckpt"] <= EPOCHS
    assert writes["export/model.safetensors"] == 1 and writes["metrics.csv"] == 1
    assert writes["run.yaml"] == 1 and writes["summary.json"] >= 1
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert [f for f in files if f.endswith("summary.json")] == ["summary.json"]
    assert [f for f in files if f.endswith("metrics.csv")] == ["logs/csv/0/metrics.csv",
                                                              "metrics.csv"]
    assert sorted(os.listdir(out / "checkpoints")) == ["best.ckpt", "last.ckpt"]
    assert os.listdir(out / "logs" / "csv") == ["0"]
    assert not [f for f in files if Path(f).name.startswith(".")], files  # no temporary files

    # rank 0 evaluated the whole test set: a single-process eval of the checkpoint agrees
    summary = json.loads((out / "summary.json").read_text())
    assert summary["completed"] and summary["recipe"] == "ddp-lsq"
    threads, handler = torch.get_num_threads(), signal.getsignal(signal.SIGINT)
    try:
        r = CliRunner().invoke(app, ["eval", str(out / "checkpoints" / "last.ckpt"), "--json"],
                               catch_exceptions=False)
    finally:
        torch.set_num_threads(threads)
        signal.signal(signal.SIGINT, handler)
    assert r.exit_code == 0, r.output
    single = json.loads(r.output[r.output.index("{"):])
    assert single["acc"] == pytest.approx(summary["quantized_acc"], abs=1e-6)
    assert single["loss"] == pytest.approx(summary["quantized"]["loss"], abs=1e-5)
    print(f"\nDDP x2 through the CLI: test acc {summary['quantized_acc']:.4f}, "
          f"{sum(writes.values())} file writes, all by rank 0")
