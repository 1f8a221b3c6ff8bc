"""Kill writers of checkpoints and exports at random moments; run by tests/test_interrupt.py.

    python tests/kill_writer.py MODE FOLDER TRIALS SEED

MODE ``ckpt`` writes Lightning checkpoints (a 16 MB tensor filled with the version number) with
qtrainer's ``AtomicCheckpointIO``; MODE ``int`` writes integer exports of a quantized SmallCNN
whose weights depend on the version, with ``qtrainer.export.export``. Each trial forks a child
that writes versions 1000 * trial + 1, + 2, ... to the same file, one after the other, telling
the parent over a pipe when a write starts and when it has finished; the parent sends it SIGKILL
after a random delay (even trials) or while it stands stopped just before or after the rename of
a chosen write (odd trials: it stops itself there), then reads the file as an untrusted one would (``torch.load(...,
weights_only=True)``, ``load_int``) and checks that it is one complete version: the last one
finished, or the one in flight if the kill came after its rename. One JSON line per trial on
stdout: the delay, the versions finished, whether the kill landed inside a write, the version
found, and the files left in the folder.

(torch is imported once here and each trial's writer is a fork of this process, so a trial
costs the kill delay, not an interpreter start.)
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import sys
import time
from pathlib import Path

import torch


def ckpt_writer(path: Path, version: int, report) -> None:
    from qtrainer.checkpoint_io import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    state = {"epoch": version, "global_step": version,
             "state_dict": {"w": torch.full((4 << 20,), float(version))}}
    report(f"start {version}")
    io.save_checkpoint(state, path)
    report(f"done {version} {hashlib.sha256(path.read_bytes()).hexdigest()}")


def ckpt_check(path: Path) -> int:
    from qtrainer.checkpoint_io import AtomicCheckpointIO

    state = AtomicCheckpointIO().load_checkpoint(path)  # weights_only=True
    v = state["epoch"]
    w = state["state_dict"]["w"]
    assert w.numel() == 4 << 20 and bool((w == float(v)).all()), f"version {v} is not whole"
    return v


def _model():
    from qtrainer.models import SmallCNN
    from qtrainer.surgery import initialize_quantizers, quantize_model

    torch.manual_seed(0)
    model = SmallCNN(in_channels=1, num_classes=10, width=64)
    x = torch.randn(8, 1, 8, 8)
    quantize_model(model, method="lsq", weight_bits=4, act_bits=4, example_input=x)
    initialize_quantizers(model, x)
    return model.eval()


def int_writer(path: Path, version: int, report, model=[]) -> None:  # noqa: B006 - a cache
    import qtrainer.export.int_format as int_format
    from qtrainer.export import export

    if not model:
        model.append(_model())
    m = model[0]
    with torch.no_grad():
        m.fc.bias.fill_(float(version))
    real = int_format.write_bytes_atomic

    def announced(p, data):
        report(f"start {version}")
        real(p, data)

    int_format.write_bytes_atomic = announced
    try:
        export(m, path, format="int", metadata={"version": version})
    finally:
        int_format.write_bytes_atomic = real
    report(f"done {version} {hashlib.sha256(path.read_bytes()).hexdigest()}")


def int_check(path: Path) -> int:
    from qtrainer.export import load_int, read_header
    from qtrainer.models import SmallCNN

    header = read_header(path)  # checks the checksum of header and tensors
    v = header["metadata"]["version"]
    model = load_int(path, SmallCNN(in_channels=1, num_classes=10, width=64))
    assert bool((model.fc.bias == float(v)).all()), f"version {v} is not whole"
    return v


def stop_at_rename(nth: int, when: str) -> None:
    """Make this (forked writer) process stop itself with SIGSTOP at its ``nth`` atomic rename
    (``os.replace``), ``before`` or ``after`` it."""
    real, calls = os.replace, [0]

    def replace(src, dst, **kwargs):
        calls[0] += 1
        if calls[0] == nth and when == "before":
            os.kill(os.getpid(), signal.SIGSTOP)
        real(src, dst, **kwargs)
        if calls[0] == nth and when == "after":
            os.kill(os.getpid(), signal.SIGSTOP)

    os.replace = replace


def main(mode: str, folder: Path, trials: int, seed: int) -> None:
    torch.set_num_threads(1)  # no thread pool for the forked writers to inherit
    writer, check = {"ckpt": (ckpt_writer, ckpt_check), "int": (int_writer, int_check)}[mode]
    target = folder / ("last.ckpt" if mode == "ckpt" else "model.safetensors")
    rng = random.Random(seed)
    writer(target, 0, lambda _msg: None)  # version 0: the file exists before the first kill
    if mode == "int":
        _model()  # warm up in the parent too, so that forks inherit imported modules
    current = (0, hashlib.sha256(target.read_bytes()).hexdigest())
    for trial in range(trials):
        # half of the kills at a random time; the other half inside a chosen write (the
        # 1st to 4th of the trial), just before or just after its rename: the writer stops
        # itself there (SIGSTOP) and is killed while stopped, so those kills land inside a
        # write on any machine, however fast it writes
        aimed = trial % 2 == 1
        delay = rng.uniform(0.05, 1.5)
        stop_at = (rng.randrange(1, 5), rng.choice(("before", "after"))) if aimed else None
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the writer: never returns
            os.close(read_fd)
            out = os.fdopen(write_fd, "w", buffering=1)
            if stop_at is not None:
                stop_at_rename(*stop_at)
            version = 1000 * (trial + 1)
            while True:
                version += 1
                writer(target, version, lambda msg: out.write(msg + "\n"))
        os.close(write_fd)
        start = time.perf_counter()
        if aimed:
            _, status = os.waitpid(pid, os.WUNTRACED)
            assert os.WIFSTOPPED(status), f"the writer ended instead of stopping ({status})"
        else:
            time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        with os.fdopen(read_fd, "rb") as f:
            events = f.read().decode().split("\n")
        events = [e.split() for e in events if e]
        done = [(int(e[1]), e[2]) for e in events if e[0] == "done"]
        starts = [int(e[1]) for e in events if e[0] == "start"]
        in_write = bool(starts) and (not done or starts[-1] > done[-1][0])
        if done:
            current = done[-1]  # (version, digest) the file held when the writer said so
        in_flight = starts[-1] if in_write else None
        record = {"mode": mode, "trial": trial, "aimed": aimed,
                  "delay_s": None if aimed else round(delay, 3), "stop_at": stop_at,
                  "writes_finished": len(done), "killed_inside_write": in_write,
                  "last_finished": current[0], "in_flight": in_flight}
        try:
            found = check(target)
            digest = hashlib.sha256(target.read_bytes()).hexdigest()
            record["found"] = found
            # the last version finished, or the one in flight if the kill came between its
            # rename and its report
            record["ok"] = (found, digest) == current or found == in_flight
            current = (found, digest)
        except Exception as e:  # noqa: BLE001 - a broken file is what the test looks for
            record.update(found=None, ok=False, error=f"{type(e).__name__}: {e}")
        record["files"] = sorted(p.name for p in folder.iterdir())
        record["elapsed_s"] = round(time.perf_counter() - start, 3)
        print(json.dumps(record), flush=True)
    writer(target, 10 ** 9, lambda _msg: None)  # a writer that lives: it removes the leftovers
    print(json.dumps({"mode": mode, "final": check(target),
                      "files": sorted(p.name for p in folder.iterdir())}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
