"""The qtrainer CLI end to end (typer's CliRunner) on digits: the quickstart with asserted
accuracy, overrides, an interrupted run resumed to the same numbers as an uninterrupted one,
eval/export/report on a run folder, validation errors (exit 2, key named), recipes/show/copy,
--help everywhere, and a recipe package installed with pip found by name through its entry
point."""

import json
import signal
import warnings
import sys
from pathlib import Path

import pytest
import torch
import yaml
import procs
from run_helpers import invoke, train_digits_cnn, write_run_file

from qtrainer.loaders import Interrupt
from qtrainer.run import runner as runner_mod
from qtrainer.recipes import load_recipe

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"


@pytest.fixture(autouse=True)
def restore_threads_and_sigint():
    threads, handler = torch.get_num_threads(), signal.getsignal(signal.SIGINT)
    yield
    torch.set_num_threads(threads)
    signal.signal(signal.SIGINT, handler)  # Lightning ignores SIGINT after a Ctrl-C


@pytest.fixture(scope="module")
def fp_checkpoint(tmp_path_factory):
    """A SmallCNN(width=8) trained on digits' training split, as a plain state dict."""
    path = tmp_path_factory.mktemp("fp") / "fp.pt"
    torch.save(train_digits_cnn(width=8, epochs=6).state_dict(), path)
    return path


def tiny_run_file(folder: Path, fp_checkpoint: Path, recipe="nipq-4bit", **extra) -> Path:
    raw = {"seed": 0, "num_threads": 1, "recipe": recipe,
           "model": {"name": "small_cnn", "width": 8, "checkpoint": str(fp_checkpoint)},
           "data": {"name": "digits", "batch_size": 64},
           "trainer": {"max_epochs": 3, "enable_progress_bar": False}, "export": [],
           "output_dir": str(folder / "out"), **extra}
    return write_run_file(folder, **raw)


# ----------------------------------------------------------------------------- quickstart


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    """``qtrainer run quickstart`` as shipped (the packaged run file that recipes/quickstart.yaml
    links to, run by name; only the output folder moved)."""
    out = tmp_path_factory.mktemp("quickstart") / "run"
    threads, handler = torch.get_num_threads(), signal.getsignal(signal.SIGINT)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = invoke("run", "quickstart", "--output-dir", out)
    result.caught = [str(w.message) for w in caught]
    torch.set_num_threads(threads)
    signal.signal(signal.SIGINT, handler)
    return result, out


@pytest.mark.slow
def test_quickstart_runs_offline_with_good_quantized_accuracy(quickstart):
    result, out = quickstart
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    fp = json.loads((out / "fp.json").read_text())
    nipq = summary["compare"][0]
    print(f"\nquickstart: FP {fp['acc']:.4f}, LSQ W4A4 {summary['quantized_acc']:.4f}, NIPQ MP "
          f"{nipq['quantized_acc']:.4f} ({nipq['avg_weight_bits']:.2f}/{nipq['avg_act_bits']:.2f}"
          f" bits), wall time {summary['run_wall_time_s']:.1f} s")
    assert fp["acc"] >= 0.95
    assert summary["fp_acc"] == pytest.approx(fp["acc"])
    # LSQ 4-bit and NIPQ mixed precision stay within 3 points of full precision
    assert summary["recipe"] == "quickstart-lsq-4bit"
    assert summary["quantized_acc"] >= fp["acc"] - 0.03
    assert nipq["recipe"] == "quickstart-nipq-mp-4bit"
    assert nipq["quantized_acc"] >= fp["acc"] - 0.03
    # NIPQ learned bits near the 4-average-bit target, from 8
    assert abs(nipq["avg_act_bits"] - 4.0) <= 1.0 and nipq["avg_weight_bits"] <= 5.0
    assert len({r["weight_bits"] for r in nipq["layers"]}) > 1  # mixed
    assert [r["weight_bits"] for r in summary["layers"]] == [8, 4, 4, 8]
    assert summary["run_wall_time_s"] < 300
    # the table, the exports, the plots, the logs
    for words in ("full precision", "quickstart-lsq-4bit", "quickstart-nipq-mp-4bit", "vs FP"):
        assert words in result.output
    for job in (out, out / "compare" / "quickstart-nipq-mp-4bit"):
        s = json.loads((job / "summary.json").read_text())
        assert s["completed"]
        assert set(s["exports"]) == {"int", "onnx"}
        for e in s["exports"].values():
            assert Path(e["path"]).is_file(), e
        assert (job / "checkpoints" / "last.ckpt").is_file()
        assert (job / "checkpoints" / "best.ckpt").is_file()
        assert (job / "run.yaml").is_file() and (job / "metrics.csv").is_file()
        if s.get("plots") is not None:
            assert {Path(p).name for p in s["plots"]} >= {"curves.png", "layers.png"}
    assert (out / "fp.ckpt").is_file() and (out / "run.yaml").is_file()
    assert summary["versions"]["torch"] and len(summary["recipe_hash"]) == 16


@pytest.mark.slow
def test_quickstart_delivers_everything_it_promises(quickstart):
    """A default install: every export and plot written, no line saying something failed or
    was skipped; outside a terminal one line per epoch with the QAT figures; no Lightning
    warning about a validation step without data."""
    result, out = quickstart
    assert result.exit_code == 0, result.output
    said = result.output.lower()
    assert not [line for line in said.splitlines() if "failed" in line or "skipped" in line
                or "no plots" in line], result.output
    for job in (out, out / "compare" / "quickstart-nipq-mp-4bit"):
        s = json.loads((job / "summary.json").read_text())
        assert {Path(p).name for p in s["plots"]} >= {"curves.png", "layers.png"}
        assert all(Path(p).stat().st_size > 1000 for p in s["plots"])
        assert s["exports"]["onnx"]["file_bytes"] == Path(s["exports"]["onnx"]["path"]).stat().st_size
    epochs = [line for line in result.output.splitlines() if line.startswith("epoch ")]
    assert len(epochs) == 15 + 5 + 8, epochs  # FP, LSQ, NIPQ: one line each
    assert epochs[0].startswith("epoch 1/15  loss ") and "phase fp" in epochs[0]
    assert "val_acc" in epochs[14] and "bits" not in epochs[14]
    lsq, nipq = epochs[15:20], epochs[20:]
    assert all("bits W " in e and " A " in e and "phase qat" in e for e in lsq)
    assert [e.split("phase ")[1].split()[0] for e in nipq] == ["noise"] * 6 + ["hard"] * 2
    assert not [w for w in result.caught if "val_dataloader" in w], result.caught


@pytest.mark.slow
def test_eval_export_report_on_the_quickstart_folder(quickstart, tmp_path, monkeypatch):
    from qtrainer import report

    result, out = quickstart
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())

    r = invoke("eval", out / "checkpoints" / "last.ckpt", "--json")
    assert r.exit_code == 0, r.output
    got = json.loads(r.output[r.output.index("{"):])
    assert got["quantized"] and got["acc"] == pytest.approx(summary["quantized_acc"], abs=1e-6)
    assert got["avg_weight_bits"] == pytest.approx(summary["avg_weight_bits"])
    r = invoke("eval", out / "fp.ckpt")
    assert r.exit_code == 0, r.output
    assert f"{100 * summary['fp_acc']:.2f}%" in r.output and "full precision" in r.output

    target = tmp_path / "m.safetensors"
    r = invoke("export", out / "checkpoints" / "last.ckpt", "--format", "int", "-o", target)
    assert r.exit_code == 0, r.output
    from qtrainer.export import load_int
    from qtrainer.models import SmallCNN

    load_int(target, SmallCNN(in_channels=1, num_classes=10, width=16))
    r = invoke("export", out / "fp.ckpt", "--format", "int", "-o", tmp_path / "x.safetensors")
    assert r.exit_code == 2 and "full-precision" in r.output

    r = invoke("report", out)
    assert r.exit_code == 0, r.output
    assert "quickstart-lsq-4bit" in r.output and "quickstart-nipq-mp-4bit" in r.output
    monkeypatch.setattr(report, "_pyplot", lambda: (_ for _ in ()).throw(
        report.PlotsUnavailable(report.PLOTS_HINT)))
    r = invoke("report", out)
    assert r.exit_code == 0 and "pip install matplotlib" in r.output
    with monkeypatch.context() as m:  # an install without onnx: bad input with the hint
        m.setitem(sys.modules, "onnx", None)
        r = invoke("export", out / "checkpoints" / "last.ckpt", "--format", "onnx", "-o",
                   tmp_path / "m.onnx")
    assert r.exit_code == 2 and "pip install onnx" in r.output, r.output

    # the folder holds a run: starting again needs --resume (or --overwrite)
    r = invoke("run", QUICKSTART, "--output-dir", out)
    assert r.exit_code == 2 and "--resume" in r.output
    r = invoke("run", QUICKSTART, "--output-dir", out, "--resume")  # everything is finished
    assert r.exit_code == 0, r.output
    assert "already finished" in r.output


# ----------------------------------------------------------------------------- resume


def _state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path, fp_checkpoint,
                                                              monkeypatch):
    # NIPQ, 3 epochs: 2 with noise (random), then 1 hard with BatchNorm re-estimation
    overrides = ["recipe.bits.weight=3", "recipe.phases.bn_reestimation_batches=4",
                 "recipe.optimizer.lr=0.01"]
    straight = tiny_run_file(tmp_path / "a", fp_checkpoint)
    r = invoke("run", straight, *overrides)
    assert r.exit_code == 0, r.output

    broken = tiny_run_file(tmp_path / "b", fp_checkpoint)
    monkeypatch.setattr(runner_mod, "EXTRA_CALLBACKS", [lambda: Interrupt(2)])
    r = invoke("run", broken, *overrides)
    assert r.exit_code == 1
    assert "--resume" in r.output and "Traceback" not in r.output
    out_b = tmp_path / "b" / "out"
    interrupted = torch.load(out_b / "checkpoints" / "last.ckpt", weights_only=False)
    assert interrupted["epoch"] == 1
    assert not (out_b / "summary.json").exists()
    first_attempt_s = interrupted["callbacks"]["WallClock"]["seconds"]

    monkeypatch.setattr(runner_mod, "EXTRA_CALLBACKS", [])
    r = invoke("run", broken, *overrides)  # without --resume: refused
    assert r.exit_code == 2 and "--resume" in r.output
    r = invoke("run", broken, *overrides, "--resume")
    assert r.exit_code == 0, r.output
    assert "resuming from" in r.output
    # the wall time counts the first attempt's epochs too, not only the resumed one
    resumed_s = json.loads((out_b / "summary.json").read_text())["wall_time_s"]
    assert first_attempt_s > 0 and resumed_s > first_attempt_s

    a = json.loads((tmp_path / "a" / "out" / "summary.json").read_text())
    b = json.loads((out_b / "summary.json").read_text())
    print(f"\nresume: straight {a['quantized']}, resumed {b['quantized']}")
    assert b["quantized"] == a["quantized"]  # same accuracy and loss, to the last bit
    assert [r["weight_bits"] for r in a["layers"]] == [3, 3, 3, 3]  # the override applied
    assert b["layers"] == a["layers"]
    sa, sb = _state(tmp_path / "a" / "out" / "checkpoints" / "last.ckpt"), _state(
        out_b / "checkpoints" / "last.ckpt")
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    for out in (tmp_path / "a" / "out", out_b):  # last.ckpt is the final epoch's
        assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)["epoch"] == 2
    # metrics.csv joins both attempts: every epoch once, with the straight run's values
    from qtrainer.report import epoch_series, read_csv

    ea, va = epoch_series(read_csv(tmp_path / "a" / "out" / "metrics.csv"), "val_acc")
    eb, vb = epoch_series(read_csv(out_b / "metrics.csv"), "val_acc")
    assert ea == eb == [0, 1, 2] and va == vb
    # a changed configuration cannot resume this run
    r = invoke("run", broken, "recipe.bits.weight=2", "--resume")
    assert r.exit_code == 2 and "different configuration" in r.output


def test_own_datamodule_without_validation_runs_without_lightning_warnings(tmp_path,
                                                                          fp_checkpoint):
    """data.class_path names a LightningDataModule (LightningCLI's form); a run without
    validation data trains without Lightning's 'validation_step but no val_dataloader'."""
    run = write_run_file(
        tmp_path, seed=0, num_threads=1, recipe="lsq-4bit", output_dir=str(tmp_path / "out"),
        model={"name": "small_cnn", "width": 8, "checkpoint": str(fp_checkpoint)},
        data={"class_path": "lit_helpers.DigitsDataModule", "init_args": {"batch_size": 128}},
        trainer={"max_epochs": 1, "limit_train_batches": 3}, export=[])
    assert invoke("validate", run).exit_code == 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = invoke("run", run)
    assert r.exit_code == 0, r.output
    assert not [w for w in caught if "val_dataloader" in str(w.message)], [str(w.message) for w in caught]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["quantized_acc"] > 0.5 and summary["fp_acc"] > 0.8, summary
    assert [line for line in r.output.splitlines() if line.startswith("epoch 1/1")]


# ----------------------------------------------------------------------------- validation


def test_validate_names_the_key_of_a_misspelt_key_and_a_bad_value(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("recipe: lsq-4bit\nmodel: {name: small_cnn}\ndata: {name: digits}\n"
                    "trainer: {max_epoch: 3}\n")
    r = invoke("validate", path)
    assert r.exit_code == 2
    assert "trainer.max_epoch" in r.output and "did you mean 'max_epochs'" in r.output
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1

    path.write_text("recipe: {extends: lsq-4bit, bits: {weight: 1}}\nmodel: {name: small_cnn}\n"
                    "data: {name: digits, batch_size: -4}\n")
    r = invoke("validate", path)
    assert r.exit_code == 2 and "recipe.bits.weight" in r.output and "out of range" in r.output
    r = invoke("validate", QUICKSTART, "data.batch_size=-4")
    assert r.exit_code == 2 and "data.batch_size" in r.output
    r = invoke("run", QUICKSTART, "trainer.max_epochs=zero")
    assert r.exit_code == 2 and "trainer.max_epochs" in r.output
    r = invoke("run", QUICKSTART, "nonsense")
    assert r.exit_code == 2 and "key.path=value" in r.output
    r = invoke("--debug", "validate", path)
    assert r.exit_code == 2 and "Traceback" in r.output
    r = invoke("validate", tmp_path / "missing.yaml")
    assert r.exit_code == 2 and "does not exist" in r.output


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_validate_every_shipped_run_file(path):
    r = invoke("validate", path)
    assert r.exit_code == 0, r.output
    assert r.output.startswith("ok: run file")


def test_validate_a_recipe_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\nextends: nipq-4bit\nbits: {weight: 3}\n")
    r = invoke("validate", path)
    assert r.exit_code == 0 and "ok: recipe mine (nipq" in r.output
    path.write_text("name: mine\nextends: nipq-4bit\nmethod: {nois: uniform}\n")
    r = invoke("validate", path)
    assert r.exit_code == 2 and "method.nois" in r.output and "did you mean 'noise'" in r.output


# ----------------------------------------------------------------------------- recipes


def test_recipes_table_show_and_copy(tmp_path):
    r = invoke("recipes")
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0].split()[:4] == ["name", "method", "bits", "W/A"]
    row = next(line for line in lines if line.startswith("nipq-mp-4bit "))
    assert row.split()[1:6] == ["nipq", "learned,", "avg", "4", "bits"]  # not its initial 8/8
    row = next(line for line in lines if line.startswith("lsq-3bit "))
    assert row.split()[1:4] == ["lsq", "3/3", "builtin"]

    r = invoke("show", "lsq-4bit")
    assert r.exit_code == 0
    shown = load_recipe(yaml.safe_load(r.output))
    assert shown.content_hash() == load_recipe("lsq-4bit").content_hash()
    r = invoke("show", "nipq-mp-4bit", "mixed_precision.value=3")
    assert yaml.safe_load(r.output)["mixed_precision"]["value"] == 3.0
    r = invoke("show", QUICKSTART, "trainer.max_epochs=2")  # (recipes/ links to the shipped file)
    shown = yaml.safe_load(r.output)
    assert shown["recipe"]["phases"]["epochs"] == 2 and shown["recipe"]["name"] == "quickstart-lsq-4bit"
    r = invoke("show", "lsq-5bit")
    assert r.exit_code == 2 and "did you mean" in r.output

    target = tmp_path / "my-lsq.yaml"
    r = invoke("recipes", "copy", "lsq-4bit", target)
    assert r.exit_code == 0 and target.is_file()
    copy, original = load_recipe(target).to_dict(), load_recipe("lsq-4bit").to_dict()
    assert copy.pop("name") == "my-lsq" and original.pop("name") == "lsq-4bit"
    assert copy == original  # renamed after the file, otherwise the same recipe
    assert invoke("recipes", "copy", "lsq-4bit", target).exit_code == 2
    assert invoke("recipes", "copy", "lsq-4bit", target, "--force").exit_code == 0
    r = invoke("recipes", "copy", "lsq-4bit", tmp_path / "x.yaml", "--name", "lsq-4bit")
    assert r.exit_code == 2 and "exists already" in r.output
    assert invoke("recipes", "copy", "lsq-4bit", tmp_path / "lsq-4bit.yaml").exit_code == 2


def test_a_copy_in_the_recipe_path_lists_without_a_clash(tmp_path, monkeypatch):
    folder = tmp_path / "recipes"
    assert invoke("recipes", "copy", "lsq-4bit", folder / "my-lsq.yaml").exit_code == 0
    monkeypatch.setenv("QTRAINER_RECIPE_PATH", str(folder))
    r = invoke("recipes")
    assert r.exit_code == 0 and f"path:{folder}" in r.output, r.output
    # a file that does clash is named in the error, whichever recipe was being loaded
    text = (folder / "my-lsq.yaml").read_text().replace("name: my-lsq", "name: lsq-4bit")
    (folder / "clash.yaml").write_text(text)
    r = invoke("recipes")
    assert r.exit_code == 2 and r.output.startswith(f"error: {folder / 'clash.yaml'}: "), r.output


def test_errors_name_the_source_of_the_bad_value(tmp_path):
    bad_recipe = tmp_path / "bad-recipe.yaml"
    bad_recipe.write_text("name: bad\nextends: lsq-4bit\nbits: {weight: 99}\n")
    run = write_run_file(tmp_path, recipe="lsq-4bit", model={"name": "small_cnn"},
                         data={"name": "digits"})
    r = invoke("validate", run, "recipe.bits.weight=99")
    assert r.exit_code == 2
    assert r.output.startswith("error: command line argument 'recipe.bits.weight=99': "), r.output
    r = invoke("show", "lsq-4bit", "bits.weight=99")  # not the built-in's file
    assert r.output.startswith("error: command line argument 'bits.weight=99': "), r.output
    r = invoke("validate", run, f"recipe={bad_recipe}")
    assert r.exit_code == 2 and str(bad_recipe) in r.output and "command line" not in r.output
    bad_run = write_run_file(tmp_path / "b", recipe="lsq-4bit", model={"name": "small_cnn"},
                             data={"name": "digits", "batch_size": 0})
    r = invoke("validate", bad_run, "recipe.bits.weight=3")
    assert r.output.startswith(f"error: {bad_run}: data.batch_size: 0"), r.output


def test_validate_checks_layer_patterns_and_class_paths(tmp_path):
    run = write_run_file(tmp_path, recipe="lsq-4bit", model={"name": "small_cnn"},
                         data={"name": "digits"})
    r = invoke("validate", run)
    assert r.exit_code == 0 and "layer patterns checked against the model (4" in r.output
    r = invoke("validate", run, 'recipe.overrides={"model.features.9": {skip: true}}')
    assert r.exit_code == 2 and "[key: recipe.overrides.model.features.9]" in r.output
    assert "close layer names: model.features." in r.output
    r = invoke("validate", run, "recipe.exclude=[fc]")  # the prefix rule, spelled out
    assert r.exit_code == 2 and "write 'model.fc'" in r.output, r.output
    assert invoke("validate", run, "recipe.exclude=[model.fc]").exit_code == 0
    r = invoke("validate", run, "model.class_path=qtrainer.models.SmallCNN")  # replaces name
    assert r.exit_code == 0, r.output
    r = invoke("validate", run, "model.class_path=qtrainer.models.NoSuchNet")
    assert r.exit_code == 2 and "has no attribute 'NoSuchNet'" in r.output
    r = invoke("validate", run, "data.class_path=no_such_pkg.DataModule")
    assert r.exit_code == 2 and "cannot import module 'no_such_pkg'" in r.output
    r = invoke("validate", "quickstart")  # a shipped run file, by name
    assert r.exit_code == 0 and "runfiles/quickstart.yaml" in r.output
    r = invoke("show", "quickstart", "trainer.max_epochs=2")
    assert r.exit_code == 0 and yaml.safe_load(r.output)["recipe"]["phases"]["epochs"] == 2


def test_help_and_version_import_neither_torch_nor_lightning():
    probe = ("import sys\nfrom qtrainer.cli import app\n"
             "for args in (['--help'], ['--version'], ['run', '--help']):\n"
             "    try:\n        app(args, prog_name='qtrainer')\n    except SystemExit:\n        pass\n"
             "heavy = ('torch', 'lightning', 'torchvision', 'numpy', 'matplotlib', 'onnx')\n"
             "print('IMPORTED', [m for m in heavy if m in sys.modules])\n")
    proc = procs.run([sys.executable, "-c", probe], timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "IMPORTED []" in proc.stdout, proc.stdout[-2000:]
    assert "Usage: qtrainer" in proc.stdout
    assert "qtrainer 0.1.0 (torch " in proc.stdout


def test_help_on_every_command_has_examples():
    for args in ([], ["run"], ["recipes"], ["recipes", "copy"], ["show"], ["validate"],
                 ["eval"], ["report"], ["export"]):
        r = invoke(*args, "--help")
        assert r.exit_code == 0, (args, r.output)
        assert "Examples" in r.output, args
        assert "qtrainer" in r.output


# ----------------------------------------------------------------------------- packages


PYPROJECT = """\
[build-system]
requires = ["setuptools>=64"]
build-backend = "setuptools.build_meta"

[project]
name = "{dist}"
version = "1.0"

[project.entry-points."qtrainer.recipes"]
acme = "{module}:RECIPES"

[tool.setuptools]
packages = ["{module}"]

[tool.setuptools.package-data]
{module} = ["recipes/*.yaml"]
"""


def build_recipe_package(root: Path, dist: str, module: str, recipe_name: str) -> Path:
    pkg = root / dist
    (pkg / module / "recipes").mkdir(parents=True)
    (pkg / "pyproject.toml").write_text(PYPROJECT.format(dist=dist, module=module))
    (pkg / module / "__init__.py").write_text(
        "from pathlib import Path\nRECIPES = Path(__file__).parent / 'recipes'\n")
    (pkg / module / "recipes" / f"{recipe_name}.yaml").write_text(
        f"name: {recipe_name}\nextends: lsq-4bit\ndescription: ACME's 3-bit LSQ.\n"
        "bits: {weight: 3, activation: 3}\n")
    return pkg


def pip_install(pkg: Path, target: Path) -> None:
    """``pip install --target`` of the package (offline: the installed setuptools builds it);
    without setuptools, the same files pip would write (module and dist-info) by hand."""
    try:
        import setuptools  # noqa: F401

        proc = procs.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                          "--no-build-isolation", "--no-index", "--target", str(target), str(pkg)],
                         timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return
    except ImportError:
        pass
    import shutil
    import tomllib

    meta = tomllib.loads((pkg / "pyproject.toml").read_text())
    project, module = meta["project"], meta["tool"]["setuptools"]["packages"][0]
    shutil.copytree(pkg / module, target / module)
    info = target / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\n"
                                   f"Version: {project['version']}\n")
    eps = project["entry-points"]["qtrainer.recipes"]
    (info / "entry_points.txt").write_text(
        "[qtrainer.recipes]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()))


@pytest.mark.slow
def test_a_published_recipe_package_runs_by_name(tmp_path, fp_checkpoint, monkeypatch):
    site = tmp_path / "site"
    pip_install(build_recipe_package(tmp_path / "src", "acme-qrecipes", "acme_qrecipes",
                                     "acme-lsq-3bit"), site)
    assert list(site.glob("acme_qrecipes-1.0.dist-info"))
    monkeypatch.syspath_prepend(str(site))

    r = invoke("recipes")
    assert r.exit_code == 0, r.output
    row = next(line for line in r.output.splitlines() if line.startswith("acme-lsq-3bit "))
    assert row.split()[1:4] == ["lsq", "3/3", "entry-point:acme-qrecipes"]

    path = tiny_run_file(tmp_path / "run", fp_checkpoint, recipe="acme-lsq-3bit")
    r = invoke("run", path, "trainer.max_epochs=1", "recipe.weight_decay.base=5e-4")
    assert r.exit_code == 0, r.output
    s = json.loads((tmp_path / "run" / "out" / "summary.json").read_text())
    assert s["recipe"] == "acme-lsq-3bit"
    assert [l["weight_bits"] for l in s["layers"]] == [8, 3, 3, 8]
    assert s["quantized_acc"] >= s["fp_acc"] - 0.05

    # a second package defining the same name: the clash is reported, naming both
    pip_install(build_recipe_package(tmp_path / "src2", "other-qrecipes", "other_qrecipes",
                                     "acme-lsq-3bit"), tmp_path / "site2")
    monkeypatch.syspath_prepend(str(tmp_path / "site2"))
    r = invoke("recipes")
    assert r.exit_code == 2
    assert "acme-qrecipes" in r.output and "other-qrecipes" in r.output
    r = invoke("validate", path)
    assert r.exit_code == 2 and "more than one source" in r.output


def test_recipe_path_env_folder_is_found_by_name(tmp_path, monkeypatch):
    (tmp_path / "mine.yaml").write_text("name: team-nipq\nextends: nipq-4bit\n"
                                        "bits: {weight: 3, activation: 3}\n")
    monkeypatch.setenv("QTRAINER_RECIPE_PATH", str(tmp_path))
    r = invoke("recipes")
    row = next(line for line in r.output.splitlines() if line.startswith("team-nipq "))
    assert row.split()[3] == f"path:{tmp_path}"
    r = invoke("show", "team-nipq")
    assert yaml.safe_load(r.output)["bits"] == {"weight": 3, "activation": 3, "attention_matmul": None}
