"""Run files: every shipped file in recipes/ validates with the values its comments promise;
the schema's errors name the key path (with a close match for misspellings); overrides reach
every section; epochs rescale recipes consistently; run.yaml round-trips."""

from pathlib import Path

import pytest

from qtrainer.recipes import RecipeError, load_recipe, scale_epochs
from qtrainer.run import (RunFileError, apply_run_overrides, is_run_file, load_run_file,
                          read_run_file, validate_run)

ROOT = Path(__file__).resolve().parents[1]
RUN_FILES = sorted((ROOT / "recipes").glob("*.yaml"))
EXPECTED = {"lsq_resnet18.yaml", "nipq_resnet18.yaml", "tempering_resnet18.yaml",
            "cifar10_resnet20_lsq.yaml", "cifar10_resnet20_nipq.yaml",
            "cifar10_resnet20_tempering.yaml", "quickstart.yaml"}

MINIMAL = {"recipe": "lsq-4bit", "model": {"name": "small_cnn", "width": 8},
           "data": {"name": "digits"}}


def test_the_shipped_run_files_are_all_there():
    assert EXPECTED <= {p.name for p in RUN_FILES}


@pytest.mark.parametrize("path", RUN_FILES, ids=lambda p: p.name)
def test_every_run_file_validates(path):
    raw = read_run_file(path)
    assert is_run_file(raw)
    cfg = load_run_file(path)
    assert cfg.output_dir == Path("runs") / path.stem
    assert cfg.export, "every shipped run file exports"
    # the resolved form (run.yaml) validates again to the same thing
    again = validate_run(cfg.to_dict())
    assert again.to_dict() == cfg.to_dict()
    assert again.recipe.content_hash() == cfg.recipe.content_hash()


def test_lsq_resnet18_is_the_papers_imagenet_recipe():
    cfg = load_run_file(ROOT / "recipes" / "lsq_resnet18.yaml")
    r = cfg.recipe
    assert cfg.model["name"] == "resnet18" and cfg.data["name"] == "imagenet"
    assert (r.method.name, r.bits.weight, r.bits.activation, r.first_last.bits) == ("lsq", 4, 4, 8)
    assert r.phases.epochs == 90 and r.lr_schedule.name == "cosine" and r.lr_schedule.floor == 0
    assert (r.optimizer.name, r.optimizer.lr, r.optimizer.momentum) == ("sgd", 0.01, 0.9)
    assert r.weight_decay.base == 1e-4
    assert r.weight_decay.factors == {2: 0.25, 3: 0.5, 4: 1.0, 8: 1.0}
    # other precisions keep the paper's weight decay by precision
    two = load_run_file(ROOT / "recipes" / "lsq_resnet18.yaml", {"recipe": "lsq-2bit"}).recipe
    assert two.weight_decay.effective_weight_decay(2) == pytest.approx(0.25e-4)
    assert cfg.pretrain is not None and cfg.pretrain.epochs == 90


def test_nipq_and_tempering_resnet18():
    nipq = load_run_file(ROOT / "recipes" / "nipq_resnet18.yaml").recipe
    assert (nipq.method.name, nipq.phases.epochs, nipq.phases.hard_epochs) == ("nipq", 43, 3)
    assert nipq.optimizer.nesterov and nipq.optimizer.lr == 0.04
    temp = load_run_file(ROOT / "recipes" / "tempering_resnet18.yaml").recipe
    assert (temp.method.name, temp.method.lambda_0, temp.method.k) == ("tempering", 1.0, 5.0)
    assert temp.phases.epochs == 90 and temp.optimizer.lr == 0.01


@pytest.mark.parametrize("method", ["lsq", "nipq", "tempering"])
def test_cifar10_resnet20_files(method):
    path = ROOT / "recipes" / f"cifar10_resnet20_{method}.yaml"
    cfg = load_run_file(path)
    assert cfg.recipe.method.name == method
    assert cfg.model["name"] == "resnet20"
    assert cfg.data["name"] == "npz-jpeg" and "root" not in cfg.data  # the default root
    assert cfg.pretrain is not None and cfg.pretrain.epochs == 200
    if method != "nipq":
        assert cfg.recipe.weight_decay.base == 5e-4  # CIFAR's base, scaled by precision
    moved = load_run_file(path, {"data.root": "/elsewhere/cifar"})
    assert moved.data["root"] == "/elsewhere/cifar"


def test_quickstart_schema():
    cfg = load_run_file(ROOT / "recipes" / "quickstart.yaml")
    assert cfg.data["name"] == "digits"
    assert [r.method.name for r in cfg.recipes] == ["lsq", "nipq"]
    assert cfg.recipe.bits.weight == 4
    assert cfg.compare[0].mixed_precision.target == "avg_bits"
    assert cfg.compare[0].mixed_precision.value == 4.0
    assert cfg.export == ["int", "onnx"]
    dirs = cfg.job_dirs()
    assert dirs[0] == Path("runs/quickstart")
    assert dirs[1] == Path("runs/quickstart/compare/quickstart-nipq-mp-4bit")


# ----------------------------------------------------------------------------- errors


def _error(raw, **kw) -> RunFileError:
    with pytest.raises(RunFileError) as info:
        validate_run(raw, **kw)
    assert isinstance(info.value, RecipeError)
    return info.value


@pytest.mark.parametrize("raw, key, words", [
    ({**MINIMAL, "traner": {}}, "traner", ["did you mean 'trainer'"]),
    ({**MINIMAL, "trainer": {"max_epoch": 2}}, "trainer.max_epoch", ["did you mean 'max_epochs'"]),
    ({**MINIMAL, "data": {"name": "digits", "batch_sise": 8}}, "data.batch_sise",
     ["did you mean 'batch_size'"]),
    ({**MINIMAL, "data": {"name": "digits", "subset_per_class": 5}}, "data.subset_per_class",
     ["for data.name 'digits'"]),
    ({**MINIMAL, "model": {"name": "small_cnn", "widht": 8}}, "model.widht",
     ["did you mean 'width'"]),
    ({**MINIMAL, "pretrain": {"epochs": 2, "learning_rate": 0.1}}, "pretrain.learning_rate", []),
    ({**MINIMAL, "recipe": {"extends": "lsq-4bit", "bits": {"wieght": 2}}}, "recipe.bits.wieght",
     ["did you mean 'weight'"]),
])
def test_unknown_keys_are_named_with_a_close_match(raw, key, words):
    err = _error(raw)
    assert err.key_path == key
    assert f"'{key}'" in str(err)
    for w in words:
        assert w in str(err)


@pytest.mark.parametrize("raw, key, words", [
    ({**MINIMAL, "trainer": {"max_epochs": 0}}, "trainer.max_epochs", ["out of range"]),
    ({**MINIMAL, "trainer": {"max_epochs": "3"}}, "trainer.max_epochs", ["expected an integer"]),
    ({**MINIMAL, "trainer": {"precision": "17-mixed"}}, "trainer.precision", ["16-mixed"]),
    ({**MINIMAL, "trainer": {"callbacks": []}}, "trainer.callbacks", ["cannot be set"]),
    ({**MINIMAL, "data": {"name": "digits", "batch_size": 0}}, "data.batch_size", ["out of range"]),
    ({**MINIMAL, "data": {"name": "digitz"}}, "data.name", ["did you mean 'digits'"]),
    ({**MINIMAL, "model": {"name": "resnet21"}}, "model.name", ["resnet"]),
    ({**MINIMAL, "model": {"width": 3}}, "model.name", ["missing required key"]),
    ({**MINIMAL, "recipe": "lsq-5bit"}, "recipe", ["did you mean 'lsq-"]),
    ({**MINIMAL, "recipe": {"extends": "lsq-4bit", "bits": {"weight": 1}}}, "recipe.bits.weight",
     ["out of range"]),
    ({**MINIMAL, "compare": ["lsq-4bit", {"extends": "nipq-4bit", "phases": {"epochs": 0}}]},
     "compare[1].phases.epochs", ["out of range"]),
    ({**MINIMAL, "pretrain": {"lr": 0.1}}, "pretrain.epochs", ["missing required key"]),
    ({**MINIMAL, "pretrain": {"epochs": 2, "warmup_epochs": 3}}, "pretrain.warmup_epochs", []),
    ({**MINIMAL, "export": ["int", "zip"]}, "export[1]", ["'onnx'"]),
    ({**MINIMAL, "seed": -1}, "seed", ["out of range"]),
    ({**MINIMAL, "eval_precision": "bf16-mixed"}, "eval_precision", ["'32-true'"]),
    ({k: v for k, v in MINIMAL.items() if k != "data"}, "data", ["missing required key 'data'"]),
    ({**MINIMAL, "model": "small_cnn"}, "model", ["expected a mapping"]),
])
def test_bad_values_are_named(raw, key, words):
    err = _error(raw)
    assert err.key_path == key, str(err)
    for w in words:
        assert w in str(err), str(err)


def test_errors_carry_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("recipe: lsq-4bit\nmodel: {name: small_cnn}\ndata: {name: digits}\n"
                    "trainer: {max_epochs: -2}\n")
    with pytest.raises(RunFileError) as info:
        load_run_file(path)
    assert info.value.source == str(path) and info.value.key_path == "trainer.max_epochs"
    path.write_text("recipe: lsq-4bit\nmodel: {name: small_cnn\n")
    with pytest.raises(RunFileError) as info:
        load_run_file(path)
    assert "line" in str(info.value)


# ----------------------------------------------------------------------------- overrides


def test_overrides_reach_every_section(tmp_path):
    raw = {**MINIMAL, "compare": ["nipq-4bit"]}
    out = apply_run_overrides(raw, {"trainer.max_epochs": 2, "recipe.bits.weight": 2,
                                    "data.batch_size": 16, "model.width": 4,
                                    "compare.0.bits.activation": 3, "output_dir": "x"})
    assert raw["recipe"] == "lsq-4bit"  # the input is not modified
    assert out["recipe"] == {"extends": "lsq-4bit", "bits": {"weight": 2}}
    cfg = validate_run(out)
    assert cfg.recipe.bits.weight == 2 and cfg.recipe.name == "lsq-4bit"
    assert cfg.recipe.phases.epochs == 2 and cfg.compare[0].phases.epochs == 2
    assert cfg.compare[0].bits.activation == 3
    assert cfg.data["batch_size"] == 16 and cfg.model["width"] == 4
    assert cfg.output_dir == Path("x")
    with pytest.raises(RunFileError) as info:
        apply_run_overrides(raw, {"compare.3.bits.weight": 2})
    assert info.value.key_path == "compare[3]"
    with pytest.raises(RunFileError):
        apply_run_overrides(raw, {"recipe.extends": "lsq-2bit"})


def test_recipe_paths_resolve_against_the_run_file(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "mine.yaml").write_text("name: mine\nextends: lsq-4bit\nbits: {weight: 3}\n")
    run = tmp_path / "run.yaml"
    run.write_text("recipe: sub/mine.yaml\nmodel: {name: mlp}\ndata: {name: digits}\n"
                   "compare: [{extends: sub/mine.yaml, name: mine2}]\n")
    cfg = load_run_file(run)
    assert (cfg.recipe.name, cfg.recipe.bits.weight) == ("mine", 3)
    assert (cfg.compare[0].name, cfg.compare[0].bits.weight) == ("mine2", 3)
    cfg = load_run_file(run, {"recipe.bits.activation": 2})  # a path becomes extends: <abs path>
    assert (cfg.recipe.name, cfg.recipe.bits.weight, cfg.recipe.bits.activation) == ("mine", 3, 2)


def test_data_seed_is_the_split_and_independent_of_seed():
    assert validate_run({**MINIMAL, "seed": 7}).data["seed"] == 0  # the split stays put
    assert validate_run({**MINIMAL, "seed": 7, "data": {"name": "digits", "seed": 1}}).data["seed"] == 1


def test_scale_epochs_keeps_the_recipe_consistent():
    nipq = load_recipe("nipq-4bit")  # 43 epochs, 3 hard, 3 warm-up
    short = scale_epochs(nipq, 3)
    assert (short.phases.epochs, short.phases.hard_epochs, short.lr_schedule.warmup_epochs) == (3, 1, 0)
    one = scale_epochs(nipq, 1)
    assert (one.phases.epochs, one.phases.hard_epochs, one.lr_schedule.warmup_epochs) == (1, 0, 0)
    long = scale_epochs(nipq, 86)
    assert (long.phases.hard_epochs, long.lr_schedule.warmup_epochs) == (6, 6)
    lsq = load_recipe("lsq-4bit")
    assert scale_epochs(lsq, 90) is lsq
    assert scale_epochs(lsq, 2).phases.epochs == 2 and scale_epochs(lsq, 2).name == "lsq-4bit"
