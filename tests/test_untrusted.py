"""Untrusted files (issue #6): checkpoints are read with ``weights_only=True`` and checked
against the sha256 written with them; a malicious, truncated or tampered checkpoint gets a
one-line error naming the file (``qtrainer eval``/``export``/``run --resume``/
``model.checkpoint``), never a traceback and never code run from the file; a checkpoint whose
recipe differs from the run's is refused unless ``--allow-recipe-change``.

Damaged int exports (truncated, edited header, flipped payload byte: safetensors plus a sha256
over header and tensors) are tests/test_export.py's test_load_int_damaged_files; the callback's
own recipe-hash check is tests/test_callback.py's.
"""

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from run_helpers import invoke, write_run_file

from qtrainer.recipes import load_recipe

RECIPE = {"extends": "lsq-4bit", "name": "untrusted-lsq", "optimizer": {"lr": 0.01},
          "phases": {"epochs": 2}}
pytestmark = pytest.mark.filterwarnings("ignore:the run has neither")


def run_file(folder: Path, recipe=None, **extra) -> Path:
    raw = {"seed": 0, "num_threads": 1, "output_dir": str(folder / "out"),
           "recipe": recipe or RECIPE, "model": {"name": "small_cnn", "width": 8},
           "data": {"name": "digits", "batch_size": 64},
           "trainer": {"enable_progress_bar": False}, "export": ["int"], **extra}
    return write_run_file(folder, **raw)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 2-epoch LSQ run: (run file, output folder)."""
    folder = tmp_path_factory.mktemp("finished")
    path = run_file(folder)
    r = invoke("run", path)
    assert r.exit_code == 0, r.output
    return path, folder / "out"


def copy_run(out: Path, to: Path) -> Path:
    """The run folder ``out`` copied to ``to`` (its run.yaml pointing at the copy)."""
    shutil.copytree(out, to)
    text = (to / "run.yaml").read_text().replace(str(out), str(to))
    (to / "run.yaml").write_text(text)
    return to


def assert_clean_error(r, path: Path, codes=(1, 2)) -> None:
    """Exit code 1 or 2, no traceback, and a last line that is the error naming ``path``."""
    out = r.output
    assert r.exit_code in codes, out
    assert "Traceback" not in out, out
    last = out.strip().splitlines()[-1]
    assert last.startswith(("error: ", "failed: ")) and str(path) in last, out


class Evil:
    """Unpickled, this is a call to ``open(marker, "w")``: the file appears if it ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.slow
def test_a_malicious_checkpoint_is_refused_everywhere_without_running_it(finished, tmp_path):
    run_path, out = finished
    good = out / "checkpoints" / "last.ckpt"
    state = torch.load(good, weights_only=True)

    def evil(name: str) -> tuple[Path, Path]:
        path, marker = tmp_path / f"{name}.ckpt", tmp_path / f"{name}.ran"
        torch.save({**state, "payload": Evil(marker)}, path)
        return path, marker

    probe, probe_marker = evil("probe")  # the premise: loading it as a pickle runs its code
    torch.load(probe, weights_only=False)
    assert probe_marker.exists()

    for command in ("eval", "export"):
        path, marker = evil(command)
        r = invoke(command, path, "--run-file", out / "run.yaml")
        assert_clean_error(r, path)
        assert "could not read checkpoint" in r.output and "Unsupported global" in r.output
        assert not marker.exists(), command

    # resuming a run whose last.ckpt was replaced
    copy = copy_run(out, tmp_path / "resume")
    path, marker = evil("resume")
    shutil.copy(path, copy / "checkpoints" / "last.ckpt")
    (copy / "summary.json").unlink()
    r = invoke("run", run_path, "-o", copy, "--resume")
    assert_clean_error(r, copy / "checkpoints" / "last.ckpt", codes=(1,))
    assert not marker.exists()

    # a run starting from it as its FP weights
    path, marker = evil("weights")
    r = invoke("run", run_file(tmp_path / "fp", model={"name": "small_cnn", "width": 8,
                                                        "checkpoint": str(path)}))
    assert_clean_error(r, path, codes=(2,))
    assert "[key: model.checkpoint]" in r.output
    assert not marker.exists()


@pytest.mark.slow
def test_truncated_and_tampered_checkpoints_get_a_clear_error(finished, tmp_path):
    run_path, out = finished
    good = out / "checkpoints" / "last.ckpt"
    data = good.read_bytes()
    state = torch.load(good, weights_only=True)
    cases = {"empty": b"", "ten-bytes": data[:10], "half": data[: len(data) // 2],
             "all-but-one": data[:-1], "text": b"not a checkpoint\n"}
    edited = {**state, "state_dict": dict(state["state_dict"])}
    key = next(k for k in edited["state_dict"] if k.endswith("features.3.weight"))
    edited["state_dict"][key] = edited["state_dict"][key] * 1.01  # re-saved by someone
    paths = {name: tmp_path / f"{name}.ckpt" for name in cases}
    for name, blob in cases.items():
        paths[name].write_bytes(blob)
    paths["edited"] = tmp_path / "edited.ckpt"
    torch.save(edited, paths["edited"])
    rng = random.Random(6)  # single flipped bits anywhere in the file
    for i in range(8):
        pos = rng.randrange(len(data))
        blob = bytearray(data)
        blob[pos] ^= 1 << rng.randrange(8)
        paths[f"flip{i}@{pos}"] = tmp_path / f"flip{i}.ckpt"
        paths[f"flip{i}@{pos}"].write_bytes(bytes(blob))

    harmless = []
    for name, path in paths.items():
        r = invoke("eval", path, "--run-file", out / "run.yaml")
        if r.exit_code == 0:  # only a flip in zip padding may load: then nothing changed
            assert name.startswith("flip"), (name, r.output)
            loaded = torch.load(path, weights_only=True)["state_dict"]
            assert all(torch.equal(loaded[k], v) for k, v in state["state_dict"].items()), name
            harmless.append(name)
            continue
        assert_clean_error(r, path)
        assert ("could not read checkpoint" in r.output
                or "does not match the checksum" in r.output), (name, r.output)
    assert "edited" not in harmless and len(harmless) <= 2, harmless
    print(f"\n{len(paths)} damaged checkpoints, {len(paths) - len(harmless)} refused by name, "
          f"{len(harmless)} flips in zip padding loaded unchanged")

    # the same checksum guards --resume
    copy = copy_run(out, tmp_path / "resume")
    shutil.copy(paths["edited"], copy / "checkpoints" / "last.ckpt")
    (copy / "summary.json").unlink()
    r = invoke("run", run_path, "-o", copy, "--resume")
    assert_clean_error(r, copy / "checkpoints" / "last.ckpt", codes=(1,))
    assert "does not match the checksum" in r.output


@pytest.mark.slow
def test_a_changed_recipe_resumes_only_with_allow_recipe_change(finished, tmp_path):
    run_path, out = finished
    assert "--allow-recipe-change" in invoke("run", "--help").output

    # the run file changed since the checkpoint was written (run.yaml tells)
    copy = copy_run(out, tmp_path / "changed")
    r = invoke("run", run_path, "-o", copy, "recipe.optimizer.lr=0.001", "--resume")
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert "different configuration (changed: recipe)" in r.output
    assert "--allow-recipe-change" in r.output
    r = invoke("run", run_path, "-o", copy, "recipe.optimizer.lr=0.001", "--resume",
               "--allow-recipe-change")
    assert r.exit_code == 0, r.output
    new_hash = load_recipe(RECIPE, {"optimizer.lr": 0.001}).content_hash()
    assert json.loads((copy / "summary.json").read_text())["recipe_hash"] == new_hash

    # no run.yaml to compare: the checkpoint's recipe hash is checked against the run's
    fresh = tmp_path / "fresh"
    (fresh / "out" / "checkpoints").mkdir(parents=True)
    shutil.copy(out / "checkpoints" / "last.ckpt", fresh / "out" / "checkpoints" / "last.ckpt")
    other = {**RECIPE, "bits": {"weight": 3}}
    path = run_file(fresh, recipe=other)
    r = invoke("run", path, "--resume")
    assert_clean_error(r, fresh / "out" / "checkpoints" / "last.ckpt", codes=(2,))
    assert "the checkpoint was trained with recipe 'untrusted-lsq'" in r.output
    assert "--allow-recipe-change" in r.output and "[key: recipe]" in r.output
    r = invoke("run", path, "--resume", "--allow-recipe-change")
    assert r.exit_code == 0, r.output
    summary = json.loads((fresh / "out" / "summary.json").read_text())
    assert summary["recipe_hash"] == load_recipe(other).content_hash()
    assert [layer["weight_bits"] for layer in summary["layers"]] == [8, 3, 3, 8]


def test_checkpoint_io_checksum_round_trip(tmp_path):
    """AtomicCheckpointIO alone: any Lightning checkpoint it writes (with or without the
    callback's ``qtrainer`` entry) loads back; an edited copy is refused by name."""
    from qtrainer.checkpoint_io import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    for i, extra in enumerate([{}, {"qtrainer": {"recipe_hash": "x"}},
                               {"qtrainer": {"sha256": "stale"}}]):
        path = tmp_path / f"c{i}.ckpt"
        ckpt = {"epoch": 3, "state_dict": {"w": torch.arange(6.0).reshape(2, 3)},
                "optimizer_states": [{"state": {0: {"momentum_buffer": torch.ones(2)}}}], **extra}
        io.save_checkpoint(ckpt, path)
        loaded = io.load_checkpoint(path)
        assert loaded["epoch"] == 3 and torch.equal(loaded["state_dict"]["w"], ckpt["state_dict"]["w"])
        loaded["optimizer_states"][0]["state"][0]["momentum_buffer"][1] = 2.0  # not only weights
        torch.save(loaded, tmp_path / "edited.ckpt")
        with pytest.raises(ValueError, match=r"edited\.ckpt.*does not match the checksum"):
            io.load_checkpoint(tmp_path / "edited.ckpt")
    torch.save({"epoch": 1, "state_dict": {}}, tmp_path / "foreign.ckpt")  # no checksum: loads
    assert io.load_checkpoint(tmp_path / "foreign.ckpt")["epoch"] == 1
