"""Bad input, fuzzed with a known answer (issue #6).

Every case is a file made by mutating one of the shipped recipe files
(``qtrainer/recipes/builtin/*.yaml``) or run files (``recipes/*.yaml``), and every mutation
knows what validation must answer:

- a bad mutation (wrong type, missing or unknown key, out-of-range bits, negative epochs, a
  phase longer than the run, an unknown recipe name, broken YAML, an empty file, a huge number,
  unicode look-alikes...) must be rejected with a ``RecipeError`` whose ``key_path`` is the
  mutated key (or ``<root>`` for a file that is not a YAML mapping) and whose message names it;
- a valid mutation (another allowed bit-width, a shorter run, another batch size...) must be
  accepted, with the new value in the validated result.

Never a traceback, never a silently accepted bad value. Most cases go through the Python API
(``load_recipe`` / ``load_run_file``); a sample goes through ``qtrainer validate FILE``
(exit code 2 and ``[key: ...]`` for bad files, 0 for valid ones). Hypothesis runs derandomized
without an example database, so every CI run tries the same cases; the counts per kind are
printed (``pytest tests/test_fuzz.py -s``) and recorded in RELIABILITY.md.

The existing fuzz tests of tests/test_recipes.py check that arbitrary junk never crashes; these
check that the answer is the right one.
"""

from __future__ import annotations

import collections
import copy
import functools
import math
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from qtrainer.cli import app
from qtrainer.recipes import Recipe, RecipeError, load_recipe, registry
from qtrainer.recipes.io import read_recipe_file
from qtrainer.recipes.yaml_codec import dump_yaml_text
from qtrainer.run import RUN_FILE_MARKERS, RunConfig, TOP_KEYS, load_run_file

ROOT = Path(__file__).resolve().parents[1]
RECIPE_FILES = sorted(registry.BUILTIN_DIR.glob("*.yaml"))
RUN_FILES = sorted((ROOT / "recipes").glob("*.yaml"))
ROOT_KEY = "<root>"

API_EXAMPLES = {"recipe": 800, "run": 800}  # cases through the Python API, per file kind
CLI_EXAMPLES = 50  # cases through `qtrainer validate FILE`
FUZZ = dict(deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])

COUNTS: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)


# ----------------------------------------------------------------------------- cases


@dataclass
class Case:
    """One generated file and what validation must answer."""

    kind: str  # what the mutation did, for the counts and failure messages
    run: bool  # a run file (else a recipe file)
    data: bytes  # the file's content
    expect: str | None  # the key path of the rejection; None: the file must be accepted
    check: Callable[[Any], None] | None = None  # for accepted files: the value arrived
    note: str = ""  # the mutation, for failure messages
    words: tuple[str, ...] = field(default=())  # further words the message must contain

    def describe(self) -> str:
        text = self.data.decode("utf-8", "replace")
        return (f"{self.kind} ({self.note}) in a {'run' if self.run else 'recipe'} file, expected "
                f"{'acceptance' if self.expect is None else repr(self.expect)}:\n{text[:1500]}")


def dump(raw: dict) -> bytes:
    """YAML text in the recipe files' dialect (its dumper quotes strings like '1e-8' that the
    dialect would read as numbers)."""
    return dump_yaml_text(raw).encode("utf-8")


def key_matches(actual: str, expected: str) -> bool:
    """``actual`` is ``expected`` or a key below it (``optimizer.betas[1]`` under
    ``optimizer.betas``)."""
    return actual == expected or actual.startswith((expected + ".", expected + "["))


def get_path(d: dict, path: str) -> Any:
    node: Any = d
    for part in path.split("."):
        node = node[part]
    return node


def set_path(d: dict, path: str, value: Any) -> None:
    """Set a dotted key in nested mappings, creating missing sections."""
    *parents, last = path.split(".")
    node = d
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[last] = value


# ----------------------------------------------------------------------------- the shipped files


@dataclass(frozen=True)
class Shipped:
    path: Path
    text: str
    raw: dict
    resolved: Any  # Recipe or RunConfig


@functools.lru_cache(maxsize=None)
def shipped_recipes() -> tuple[Shipped, ...]:
    return tuple(Shipped(p, p.read_text(encoding="utf-8"), read_recipe_file(p), load_recipe(p))
                 for p in RECIPE_FILES)


@functools.lru_cache(maxsize=None)
def shipped_runs() -> tuple[Shipped, ...]:
    return tuple(Shipped(p, p.read_text(encoding="utf-8"), read_recipe_file(p), load_run_file(p))
                 for p in RUN_FILES)


@functools.lru_cache(maxsize=None)
def known_recipe_names() -> frozenset[str]:
    return frozenset(i.name for i in registry.list_recipes())


# ----------------------------------------------------------------------------- value tables

HUGE = [10 ** 30, -(10 ** 30), 2 ** 64, 10 ** 300, 1e308, -1e308]
NOT_FINITE = [math.nan, math.inf, -math.inf]
INT_WRONG_TYPE = ["4", "four", "\uff14", 4.0, 2.5, True, False, None, [4], {"v": 4}]
FLOAT_WRONG_TYPE = ["0.01", "1e-3", "\u0661", True, None, [0.1], {"lr": 0.1}]
BOOL_WRONG = [1, 0, "true", "yes", "on", None, 1.0, [True], "\u0442rue"]
CHOICE_WRONG = [3, None, True, "", [], ["x"], {"a": 1}]

# bits: an integer in [2, 16] everywhere in a recipe
BITS_BAD = [-4, 0, 1, 17, 32, 64, *HUGE[:4], *INT_WRONG_TYPE]

# (key path, bad values) valid for every method
COMMON_BAD: list[tuple[str, list]] = [
    ("bits.weight", BITS_BAD),
    ("bits.activation", [v for v in BITS_BAD if v is not None]),  # null/none: weight-only
    ("first_last.bits", [-8, 0, 1, 17, 99, 10 ** 30, "FP", "same ", "f\u0440", 8.0, True, None, [8]]),
    ("version", [0, -1, 10 ** 7, 1.0, "1", None]),
    ("name", ["my recipe", "", "-lead", "r\u00e9cipe", "\u30ec\u30b7\u30d4", "x" * 101, "a/b", 3, None,
              ["x"]]),
    ("description", [3, None, ["a"], {"a": 1}, "d" * 10_001]),
    ("include", [[], "*", [3], [""], None, {"*": 1}]),
    ("exclude", ["fc", [None], [""], 3]),
    ("overrides", ["fc", 3, [1], {"fc": {}}, {"fc": 3}, {"fc": {"weight_bits": 1}},
                   {"fc": {"wieght_bits": 4}}, {"fc": {"skip": "yes"}},
                   {"fc": {"skip": True, "weight_bits": 8}}]),
    ("optimizer.policy", ["kept", "Replace", "Auto", *CHOICE_WRONG]),
    ("optimizer.quantizer_lr", [0, -1e-3, 10.5, *NOT_FINITE, *FLOAT_WRONG_TYPE[:3]]),
    ("optimizer.quantizer_lr_factor", [0, -0.5, 101, "Auto", "automatic", *NOT_FINITE, True, None,
                                       [0.1]]),
    ("optimizer.name", ["adam", "SGD", "s\u0261d", *CHOICE_WRONG]),
    ("optimizer.lr", [0, 0.0, -0.01, 10.5, 11, *HUGE, *NOT_FINITE, *FLOAT_WRONG_TYPE]),
    ("optimizer.momentum", [1.0, 1, 1.5, -0.1, *NOT_FINITE, *FLOAT_WRONG_TYPE]),
    ("optimizer.nesterov", BOOL_WRONG),
    ("optimizer.betas", [[0.9], [0.9, 1.0], [-0.1, 0.9], [0.9, "a"], [0.9, 0.99, 0.999], "0.9",
                         [math.nan, 0.9], 0.9]),
    ("optimizer.eps", [0, -1e-8, 2.0, math.inf, "1e-8"]),
    ("weight_decay.base", [-1e-4, 1.5, 2, *NOT_FINITE, *FLOAT_WRONG_TYPE, 10 ** 30]),
    ("weight_decay.factors", [[0.5], "x", 3, {1: 0.5}, {17: 1.0}, {4: -1.0}, {4: "x"}, {"x": 1.0},
                              {4: math.nan}, {4: 101.0}]),
    ("weight_decay.quantizer_params", [-0.1, 1.5, math.nan, "0"]),
    ("weight_decay.one_d_params", BOOL_WRONG),
    ("lr_schedule.name", ["step", "Cosine", *CHOICE_WRONG]),
    ("lr_schedule.warmup_epochs", [-1, -5, 10 ** 6, 1.0, "1", None, *HUGE[:3]]),
    ("lr_schedule.warmup_start_factor", [0, -0.1, 1.5, math.nan, "0.1"]),
    ("lr_schedule.floor", [-0.1, 1.5, math.inf]),
    ("phases.epochs", [0, -1, -90, 100_001, 10 ** 9, *HUGE[:4], 90.0, "90", None, True]),
    ("phases.fit", ["exact", "Auto", *CHOICE_WRONG]),
    ("phases.hard_epochs", [-1, -3, 10 ** 12, 1.5, "3", None]),
    ("phases.bn_reestimation_batches", [-1, 10 ** 7, 2.5, "100"]),
    ("mixed_precision.target", ["avg", "bops", *CHOICE_WRONG]),
    ("mixed_precision.w_scale", [-1.0, 1e7, math.nan, "1"]),
    ("mixed_precision.a_scale", [-0.5, math.inf]),
    ("mixed_precision.bops_scale", [-3.0, 1e9]),
    ("distillation.enabled", BOOL_WRONG),
    ("distillation.temperature", [0, -1.0, 101, math.inf, "1"]),
    ("distillation.weight", [-1, 1001, math.nan]),
    ("faults.on_nonfinite", ["ignore", "Stop", *CHOICE_WRONG]),
    ("extends", [3, None, [], {"a": 1}, True, ""]),
]

METHOD_BAD: dict[str, list[tuple[str, list]]] = {
    "lsq": [
        ("method.grad_scale", ["numl", "NUMEL", "num\u0435l", *CHOICE_WRONG]),
        ("method.per_channel", BOOL_WRONG),
        ("method.init", ["median", "LSQ", *CHOICE_WRONG]),
    ],
    "tempering": [
        ("method.grad_scale", ["per-sample", *CHOICE_WRONG]),
        ("method.noise", ["gauss", *CHOICE_WRONG]),
        ("method.noise_dist", ["normal", *CHOICE_WRONG]),
        ("method.lambda_0", [-0.5, 100.5, math.nan, math.inf, "1"]),
        ("method.k", [-1, 1000, math.nan, None]),
    ],
    "nipq": [
        ("method.noise", ["gaussian", *CHOICE_WRONG]),
        ("method.learn_bits", BOOL_WRONG),
        ("method.b_min", [0, 1, 17, -2, 2.0, "2", None]),
        ("method.b_max", [1, 17, 100, 14.0, "14"]),
        ("method.weight_init", ["maxabs", *CHOICE_WRONG]),
    ],
}
METHOD_NAME_BAD = ["lsqq", "LSQ", "nipq2", "temper", "\u0455sq", "", 3, None, True]

SECTIONS = ("method", "bits", "first_last", "optimizer", "weight_decay", "lr_schedule", "phases",
            "mixed_precision", "distillation", "faults")
RECIPE_TOP = ("name", "version", "description", "method", "bits", "first_last", "include",
              "exclude", "overrides", "optimizer", "weight_decay", "lr_schedule", "phases",
              "mixed_precision", "distillation", "faults", "extends")
REQUIRED_IN_ROOT = ("name", "method", "bits", "optimizer", "weight_decay", "phases", "method.name",
                    "bits.weight", "bits.activation", "optimizer.lr", "weight_decay.base",
                    "phases.epochs")

LETTERS = st.characters(categories=("Lu", "Ll", "Nd"), max_codepoint=0x30FF) | st.sampled_from("_-")


def section_keys(recipe: Recipe, section: str) -> set:
    d = recipe.to_dict()
    return set(d[section]) if section else set(RECIPE_TOP)


@st.composite
def unknown_key(draw, allowed: set, reserved: frozenset = frozenset()):
    """A key close to an allowed one (typo, case, unicode look-alike) or any other word; never
    an allowed or reserved key."""
    base = draw(st.sampled_from(sorted(str(k) for k in allowed)))
    how = draw(st.sampled_from(["drop", "double", "swap", "plural", "upper", "dash", "homoglyph",
                                "text", "int"]))
    if how == "int":
        key: Any = draw(st.integers(-5, 99))
    elif how == "text":
        key = draw(st.text(LETTERS, min_size=1, max_size=12))
    else:
        i = draw(st.integers(0, max(len(base) - 1, 0)))
        key = {
            "drop": base[:i] + base[i + 1:],
            "double": base[:i] + base[i:i + 1] * 2 + base[i + 1:],
            "swap": base[:i] + base[i + 1:i + 2] + base[i:i + 1] + base[i + 2:],
            "plural": base + "s",
            "upper": base.upper(),
            "dash": base.replace("_", "-") if "_" in base else "-" + base,
            "homoglyph": base.replace("a", "\u0430").replace("e", "\u0435").replace("o", "\u043e")
            if any(c in base for c in "aeo") else base + "\u00e9",
        }[how]
    assume(key not in allowed and str(key) not in allowed and key not in reserved and key != "")
    return key


# ----------------------------------------------------------------------------- recipe mutations
#
# Each mutator takes (draw, raw mapping of the file, resolved recipe, whether the file extends
# another) and returns (kind, key path or None, note, check). They work on a mapping so that the
# same mutators apply to a recipe file and to the `recipe:`/`compare:` entries of a run file.


def bad_value_kind(value) -> str:
    """The mutation kind of a bad value: ``huge_number`` (beyond 1e12 or not finite),
    ``unicode`` (a string with non-ASCII characters), ``out_of_range`` (another number) or
    ``wrong_type``."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if number and (abs(value) > 1e12 or (isinstance(value, float) and not math.isfinite(value))):
        return "huge_number"
    if isinstance(value, str) and any(ord(c) > 127 for c in value):
        return "unicode"
    return "out_of_range" if number else "wrong_type"


def m_bad_value(draw, raw, recipe, extends):
    table = COMMON_BAD + METHOD_BAD[recipe.method.name]
    path, values = draw(st.sampled_from(table))
    value = copy.deepcopy(draw(st.sampled_from(values)))
    if path == "extends":
        raw["extends"] = value
    else:
        set_path(raw, path, value)
    expect = path
    if path == "weight_decay.factors" and isinstance(value, dict):
        k = next(iter(value))
        expect = f"weight_decay.factors.{k}"
    elif path == "overrides" and isinstance(value, dict):
        expect = f"overrides.{next(iter(value))}"
    return bad_value_kind(value), expect, f"{path} = {value!r:.60}", None


def m_method_name(draw, raw, recipe, extends):
    value = draw(st.sampled_from(METHOD_NAME_BAD))
    method = raw.get("method") if isinstance(raw.get("method"), dict) else {}
    raw["method"] = {**method, "name": value}
    return "unknown_method", "method.name", f"method.name = {value!r}", None


def m_unknown_key(draw, raw, recipe, extends):
    section = draw(st.sampled_from(("",) + SECTIONS))
    allowed = section_keys(recipe, section)
    reserved = frozenset(RUN_FILE_MARKERS) | {"extends"} if not section else frozenset()
    key = draw(unknown_key(allowed, reserved))
    value = draw(st.sampled_from([1, "x", True, None, [1], {"a": 1}, 0.5]))
    if section:
        node = raw.get(section)
        if not isinstance(node, dict):
            node = raw[section] = {}
        node[key] = value
        expect = f"{section}.{key}"
    else:
        raw[key] = value
        expect = str(key)
    return "unknown_key", expect, f"added {expect!r}", None


def m_missing_key(draw, raw, recipe, extends):
    if extends:  # a file that extends another inherits what it leaves out
        if "value" in raw.get("mixed_precision", {}) and isinstance(raw.get("extends"), str) \
                and load_recipe(raw["extends"]).mixed_precision.value is None:
            del raw["mixed_precision"]["value"]
            return "missing_key", "mixed_precision.value", "deleted mixed_precision.value", None
        return m_bad_value(draw, raw, recipe, extends)
    path = draw(st.sampled_from(REQUIRED_IN_ROOT))
    *parents, last = path.split(".")
    node = raw
    for part in parents:
        node = node[part]
    del node[last]
    return "missing_key", path, f"deleted {path}", None


def m_phases(draw, raw, recipe, extends):
    p, epochs = recipe.phases, recipe.phases.epochs
    what = draw(st.sampled_from(["hard", "warmup", "shorter"]))
    extra = draw(st.integers(1, 500))
    if what == "hard":
        set_path(raw, "phases.hard_epochs", epochs + extra)
        return "phase_longer_than_run", "phases.hard_epochs", f"hard_epochs {epochs + extra} > {epochs}", None
    if what == "warmup":
        set_path(raw, "lr_schedule.warmup_epochs", epochs + extra)
        return ("phase_longer_than_run", "lr_schedule.warmup_epochs",
                f"warmup_epochs {epochs + extra} > {epochs}", None)
    if p.hard_epochs >= 2:  # a run shorter than its hard phase
        short = draw(st.integers(1, p.hard_epochs - 1))
        set_path(raw, "phases.epochs", short)
        return "phase_longer_than_run", "phases.hard_epochs", f"epochs {short} < hard {p.hard_epochs}", None
    set_path(raw, "phases.epochs", -extra)
    return "negative_epochs", "phases.epochs", f"epochs {-extra}", None


def unknown_name(draw) -> str:
    name = draw(st.from_regex(r"[a-z][a-z0-9-]{0,20}", fullmatch=True)
                | st.sampled_from(["lsq-5bit", "nipq-4bits", "LSQ-4bit", "tempering", "lsq_4bit",
                                   "n\u0456pq-4bit"]))
    assume(name not in known_recipe_names())
    return name


def m_unknown_extends(draw, raw, recipe, extends):
    name = unknown_name(draw)
    raw["extends"] = name
    return "unknown_recipe_name", "extends", f"extends: {name}", None


def allowed_bits(recipe: Recipe) -> list[int]:
    m = recipe.method
    if m.name != "nipq":
        return list(range(2, 17))
    return list(range(m.b_min + 1, m.b_max)) if m.learn_bits else list(range(m.b_min, m.b_max + 1))


def m_valid(draw, raw, recipe, extends):
    """A mutation that keeps the recipe valid: it must be accepted with the new value."""
    choices = ["bits", "first_last", "lr", "epochs", "distillation", "faults", "description",
               "name", "decay", "method"]
    what = draw(st.sampled_from(choices))
    if what == "bits":
        key = draw(st.sampled_from(["weight", "activation"]))
        v: Any = draw(st.sampled_from(allowed_bits(recipe)))
        set_path(raw, f"bits.{key}", v)
        return "valid", None, f"bits.{key} = {v}", lambda r: r.bits.__dict__[key] == v
    if what == "first_last":
        v = draw(st.sampled_from(["same", "fp", *allowed_bits(recipe)]))
        set_path(raw, "first_last.bits", v)
        return "valid", None, f"first_last.bits = {v!r}", lambda r: r.first_last.bits == v
    if what == "lr":
        v = draw(st.floats(1e-6, 10.0) | st.sampled_from([1, 10, 0.1]))
        set_path(raw, "optimizer.lr", v)
        return "valid", None, f"optimizer.lr = {v!r}", lambda r: r.optimizer.lr == float(v)
    if what == "epochs":
        lo = max(1, recipe.phases.hard_epochs, recipe.lr_schedule.warmup_epochs)
        v = draw(st.integers(lo, 100_000))
        set_path(raw, "phases.epochs", v)
        return "valid", None, f"phases.epochs = {v}", lambda r: r.phases.epochs == v
    if what == "distillation":
        t, w = draw(st.floats(0.01, 100.0)), draw(st.floats(0.0, 1000.0))
        set_path(raw, "distillation.enabled", True)
        set_path(raw, "distillation.temperature", t)
        set_path(raw, "distillation.weight", w)
        return ("valid", None, f"distillation {t}, {w}",
                lambda r: (r.distillation.enabled, r.distillation.temperature, r.distillation.weight)
                == (True, t, w))
    if what == "faults":
        v = draw(st.sampled_from(["stop", "skip"]))
        set_path(raw, "faults.on_nonfinite", v)
        return "valid", None, f"faults.on_nonfinite = {v}", lambda r: r.faults.on_nonfinite == v
    if what == "description":
        v = draw(st.text(st.characters(exclude_categories=("Cc", "Cs", "Co", "Cn", "Zl", "Zp")),
                         max_size=60))
        raw["description"] = v
        return "valid_unicode", None, f"description = {v!r}", lambda r: r.description == v
    if what == "name":
        v = draw(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,30}", fullmatch=True))
        raw["name"] = v
        return "valid", None, f"name = {v}", lambda r: r.name == v
    if what == "decay":
        v = draw(st.floats(0.0, 1.0))
        set_path(raw, "weight_decay.base", v)
        return "valid", None, f"weight_decay.base = {v}", lambda r: r.weight_decay.base == v
    m = recipe.method.name
    key, options = {"lsq": ("grad_scale", ["numel", "per_sample", "none"]),
                    "tempering": ("noise_dist", ["uniform", "gaussian"]),
                    "nipq": ("noise", ["histogram", "uniform"])}[m]
    v = draw(st.sampled_from(options))
    set_path(raw, f"method.{key}", v)
    return "valid", None, f"method.{key} = {v}", lambda r: getattr(r.method, key) == v


RECIPE_MUTATORS = [m_bad_value] * 6 + [m_method_name, m_unknown_key, m_unknown_key, m_missing_key,
                                       m_phases, m_unknown_extends] + [m_valid] * 3


# ----------------------------------------------------------------------------- whole-file mutations

BREAKERS = ["\tbits: 4\n", "bits: [4,\n", "  - - : x\n", "key: 'unterminated\n", "]\n", "{\n",
            "a: b: c\n", "*undefined_alias\n", "? [\n", "%YAML 9.9\n---\n", "@at: x\n", "`tick: x\n"]
EMPTY = [b"", b"\n\n", b"# nothing here\n", b"---\n", b"~\n", b"null\n", b"   \n"]
NOT_MAPPING = [b"- a\n- b\n", b"42\n", b"just text\n", b"[1, 2]\n", b"'quoted'\n", b"true\n"]


def broken_text(draw, text: str, first_key: str) -> tuple[str, bytes, str]:
    how = draw(st.sampled_from(["insert", "insert", "duplicate", "tag", "encoding"]))
    if how == "duplicate":  # the file's first top-level key once more
        return "broken_yaml", (text + f"\n{first_key}: again\n").encode(), "duplicate key"
    if how == "tag":
        return "broken_yaml", (text + "\nevil: !!python/object/apply:os.system ['true']\n").encode(), ""
    if how == "encoding":
        return "broken_yaml", b"\xff\xfe" + text.encode("utf-16-le")[:200], "cannot read"
    lines = text.splitlines(keepends=True)
    at = draw(st.integers(0, len(lines)))
    breaker = draw(st.sampled_from(BREAKERS))
    out = "".join(lines[:at]) + breaker + "".join(lines[at:])
    try:  # the reference parser must call it broken too (else the insertion landed harmlessly)
        yaml.safe_load(out)
        assume(False)
    except yaml.YAMLError:
        pass
    return "broken_yaml", out.encode(), "broken YAML"


def file_level(draw, shipped: Shipped) -> tuple[str, bytes, str]:
    which = draw(st.sampled_from(["broken", "broken", "empty", "not_mapping"]))
    if which == "broken":
        return broken_text(draw, shipped.text, next(iter(shipped.raw)))
    if which == "empty":
        return "empty_file", draw(st.sampled_from(EMPTY)), "empty"
    return "not_a_mapping", draw(st.sampled_from(NOT_MAPPING)), "mapping"


# ----------------------------------------------------------------------------- strategies


@st.composite
def recipe_cases(draw) -> Case:
    shipped = draw(st.sampled_from(shipped_recipes()))
    if draw(st.integers(0, 9)) == 0:
        kind, data, word = file_level(draw, shipped)
        return Case(kind, False, data, ROOT_KEY, note=shipped.path.name, words=(word,))
    mutate = draw(st.sampled_from(RECIPE_MUTATORS))
    if mutate is m_missing_key:  # files that extends another inherit what they leave out
        shipped = draw(st.sampled_from([s for s in shipped_recipes() if "extends" not in s.raw
                                        or "value" in s.raw.get("mixed_precision", {})]))
    raw = copy.deepcopy(shipped.raw)
    kind, expect, note, check = mutate(draw, raw, shipped.resolved, "extends" in shipped.raw)
    return Case(kind, False, dump(raw), expect, check, f"{shipped.path.name}: {note}")


def recipe_entry(raw_run: dict, cfg: RunConfig, draw) -> tuple[str, Any, Recipe, list]:
    """(key path prefix, the raw entry as a mapping, its resolved recipe, where it lives)."""
    slots = [("recipe", cfg.recipe, None)]
    if isinstance(raw_run.get("compare"), list):
        slots += [(f"compare[{i}]", r, i) for i, r in enumerate(cfg.compare)]
    prefix, recipe, index = draw(st.sampled_from(slots))
    entry = raw_run["recipe"] if index is None else raw_run["compare"][index]
    if isinstance(entry, str):
        entry = {"extends": entry}
    if index is None:
        raw_run["recipe"] = entry
    else:
        raw_run["compare"][index] = entry
    return prefix, entry, recipe


def digits_like(cfg: RunConfig) -> str:
    return cfg.data["name"]


RUN_BAD: list[tuple[str, list]] = [
    ("seed", [-1, 2 ** 32, 10 ** 30, 1.5, "0", True, None, [0]]),
    ("num_threads", [0, -2, 1025, "1", 1.0, True]),
    ("output_dir", [3, [], {"a": 1}, True, 1.5]),
    ("trainer", [3, "x", [1], False, 0, ""]),
    ("trainer.max_epochs", [0, -3, 100_001, "3", 3.0, True, None, 10 ** 30, math.inf]),
    ("trainer.accelerator", ["gpux", "CPU", 3, None, "", "\u0441pu"]),
    ("trainer.devices", [0, -1, "two", 1.5, [], [-1], True, [True], None]),
    ("trainer.precision", ["33", 8, "fp32", None, 16.0, "\uff11\uff16"]),
    ("trainer.num_nodes", [0, -1, "1"]),
    ("trainer.accumulate_grad_batches", [0, -2, 1.5]),
    ("trainer.gradient_clip_val", [-1.0, "x", math.nan]),
    ("trainer.gradient_clip_algorithm", ["norms", 1]),
    ("trainer.log_every_n_steps", [0, -10, "10"]),
    ("trainer.limit_train_batches", [0, -1, 1.5, "all"]),
    ("trainer.limit_val_batches", [-1, 2.5, "x"]),
    ("trainer.enable_progress_bar", ["no", 0, None]),
    ("trainer.strategy", [42, "ddpp", "", None, True, ["ddp"]]),
    ("trainer.deterministic", ["yes", 2, 1.0]),
    ("trainer.val_check_interval", [0, -1, 1.5, "soon", True]),
    ("trainer.overfit_batches", [-1, 1.5, "x", None]),
    ("trainer.profiler", ["fancy", 3, True]),
    ("trainer.barebones", ["no", 1]),
    ("trainer.use_distributed_sampler", ["no", 1]),
    ("trainer.reload_dataloaders_every_n_epochs", [-1, 1.5, None]),
    ("trainer.limit_predict_batches", [0, "x"]),
    ("trainer.plugins", ["bf16", ["x"], 3]),
    ("trainer.callbacks", [[], None]),
    ("trainer.logger", [True, False]),
    ("trainer.max_steps", [10]),
    ("data", [3, "digits", None, []]),
    ("data.name", ["digitz", "", 3, None, "\uff44igits", "cifar-10"]),
    ("data.batch_size", [0, -4, "64", 6.4, 2 ** 21, True, None, 10 ** 30]),
    ("data.num_workers", [-1, "2", 1.5, 2000]),
    ("data.seed", [-1, "0", 2 ** 33]),
    ("data.val_size", [-1, "x", 0.5]),
    ("data.drop_last", ["yes", 1]),
    ("model", [3, "small_cnn", [], None]),
    ("model.name", ["resnet_20", "", 3, None, "r\u0435snet18"]),
    ("model.checkpoint", [3, [], {"a": 1}, True]),
    ("pretrain", [3, "yes", [1]]),
    ("pretrain.epochs", [0, -5, "10", 1.5, None, 10 ** 30]),
    ("pretrain.lr", [0, -0.1, 11, "0.1", math.nan]),
    ("pretrain.optimizer", ["adam", 3]),
    ("pretrain.momentum", [1.0, -0.1]),
    ("pretrain.weight_decay", [-1e-4, 2]),
    ("pretrain.schedule", ["step", None]),
    ("pretrain.warmup_epochs", [-1, 1.5]),
    ("pretrain.label_smoothing", [1.0, -0.1]),
    ("export", [3, {"int": 1}, True, ["int", "tflite"], ["INT"], [None]]),
    ("recipe", [3, None, [], True, ""]),
    ("compare", [3, "lsq-4bit", {"a": 1}, [3], ["lsq-4bit", None], True]),
]
MODEL_INT_KWARGS = {"small_cnn": ("width",), "resnet9": ("width",), "resnet20": (), "resnet56": (),
                    "mlp": ("hidden",)}


def r_bad_value(draw, raw, cfg):
    path, values = draw(st.sampled_from(RUN_BAD))
    value = copy.deepcopy(draw(st.sampled_from(values)))
    if path.startswith("data.") and path != "data.name":
        from qtrainer.data import DATA_KEYS

        assume(path.split(".")[1] in DATA_KEYS[cfg.data["name"]])
    if path.startswith("pretrain.") and not isinstance(raw.get("pretrain"), dict):
        raw["pretrain"] = {"epochs": 3}
    if "." in path:
        set_path(raw, path, value)
    else:
        raw[path] = value
    expect = path
    if path == "export" and isinstance(value, list):
        bad = next(i for i, v in enumerate(value) if v not in ("int", "onnx", "torchscript",
                                                               "exported_program"))
        expect = f"export[{bad}]"
    if path == "compare" and isinstance(value, list):
        bad = next(i for i, v in enumerate(value) if not isinstance(v, str) or not v)
        expect = f"compare[{bad}]"
    return bad_value_kind(value), expect, f"{path} = {value!r:.60}", None


def r_model_kwarg(draw, raw, cfg):
    name = cfg.model.get("name")
    keys = MODEL_INT_KWARGS.get(name, ())
    if not keys:
        return r_bad_value(draw, raw, cfg)
    key = draw(st.sampled_from(keys))
    value = draw(st.sampled_from([0, -8, "16", 2.5, True, None, [], 10 ** 30]))
    raw["model"][key] = value
    return "wrong_type", f"model.{key}", f"model.{key} = {value!r}", None


def r_unknown_key(draw, raw, cfg):
    from qtrainer.data import DATA_KEYS
    from qtrainer.models import BUILTIN_MODELS
    from qtrainer.run import Pretrain
    from qtrainer.run.trainer_keys import _trainer_keys

    section = draw(st.sampled_from(["", "trainer", "data", "model", "pretrain"]))
    if section == "":
        allowed = set(TOP_KEYS) | set(RECIPE_TOP)  # recipe words at the top of a run file too
    elif section == "trainer":
        allowed = set(_trainer_keys())
    elif section == "data":
        allowed = set(DATA_KEYS) | set().union(*DATA_KEYS.values())
    elif section == "model":
        import inspect

        allowed = {"name", "checkpoint", "class_path", "init_args", "weights"}
        for f in BUILTIN_MODELS.values():
            allowed |= set(inspect.signature(f).parameters)
        if cfg.model.get("name") not in BUILTIN_MODELS:  # torchvision kwargs are not checked
            section = "trainer"
            allowed = set(_trainer_keys())
    else:
        from dataclasses import fields

        allowed = {f.name for f in fields(Pretrain)}
        if not isinstance(raw.get("pretrain"), dict):
            raw["pretrain"] = {"epochs": 3}
    key = draw(unknown_key(allowed))
    if section:
        raw[section] = dict(raw.get(section) or {})
        raw[section][key] = 1
        expect = f"{section}.{key}"
    else:
        raw[key] = 1
        expect = str(key)
    return "unknown_key", expect, f"added {expect!r}", None


def r_missing(draw, raw, cfg):
    key = draw(st.sampled_from(["recipe", "model", "data", "data.name", "model.name"]))
    if "." in key:
        head, tail = key.split(".")
        del raw[head][tail]
    else:
        del raw[key]
    return "missing_key", key, f"deleted {key}", None


def r_recipe(draw, raw, cfg):
    prefix, entry, recipe = recipe_entry(raw, cfg, draw)
    mutate = draw(st.sampled_from([m_bad_value] * 4 + [m_method_name, m_unknown_key, m_phases]))
    kind, expect, note, _ = mutate(draw, entry, recipe, True)
    return kind, f"{prefix}.{expect}", f"{prefix}: {note}", None


def r_unknown_recipe(draw, raw, cfg):
    name = unknown_name(draw)
    slots = ["recipe"] + [f"compare[{i}]" for i in range(len(cfg.compare))]
    slot = draw(st.sampled_from(slots))
    value = name if draw(st.booleans()) else {"extends": name}
    if slot == "recipe":
        raw["recipe"] = value
    else:
        raw["compare"][int(slot[8:-1])] = value
    return "unknown_recipe_name", slot, f"{slot} = {value!r}", None


def r_valid(draw, raw, cfg):
    what = draw(st.sampled_from(["epochs", "batch", "seed", "trainer", "export", "bits",
                                 "output_dir", "threads"]))
    if what == "epochs":
        v = draw(st.integers(1, 50))
        raw.setdefault("trainer", {})["max_epochs"] = v
        return "valid", None, f"trainer.max_epochs = {v}", \
            lambda c: all(r.phases.epochs == v for r in c.recipes)
    if what == "batch":
        v = draw(st.integers(1, 4096))
        raw["data"]["batch_size"] = v
        return "valid", None, f"data.batch_size = {v}", lambda c: c.data["batch_size"] == v
    if what == "seed":
        v = draw(st.integers(0, 2 ** 32 - 1))
        raw["seed"] = v
        split = raw["data"].get("seed", 0)  # data.seed (the split) does not follow seed
        return "valid", None, f"seed = {v}", lambda c: c.seed == v and c.data["seed"] == split
    if what == "trainer":
        key, v = draw(st.sampled_from([("devices", 1), ("devices", 2), ("devices", "auto"),
                                       ("devices", [0]), ("strategy", "ddp"),
                                       ("strategy", "auto"), ("precision", "bf16-mixed"),
                                       ("precision", 32), ("deterministic", True),
                                       ("deterministic", "warn"), ("val_check_interval", 0.5),
                                       ("val_check_interval", 100), ("profiler", "simple"),
                                       ("overfit_batches", 0.0), ("barebones", False)]))
        raw.setdefault("trainer", {})[key] = v
        return "valid", None, f"trainer.{key} = {v!r}", lambda c: c.trainer[key] == v
    if what == "export":
        v = draw(st.lists(st.sampled_from(["int", "onnx", "torchscript", "exported_program"]),
                          max_size=4))
        raw["export"] = v
        return "valid", None, f"export = {v}", lambda c: c.export == list(dict.fromkeys(v))
    if what == "bits":
        prefix, entry, recipe = recipe_entry(raw, cfg, draw)
        b = draw(st.sampled_from(allowed_bits(recipe)))
        set_path(entry, "bits.weight", b)
        index = 0 if prefix == "recipe" else int(prefix[8:-1]) + 1
        return "valid", None, f"{prefix}.bits.weight = {b}", \
            lambda c: c.recipes[index].bits.weight == b
    if what == "output_dir":
        v = draw(st.text(st.characters(categories=("L", "N")) | st.sampled_from("/_-."),
                         min_size=1, max_size=30))
        raw["output_dir"] = v
        return "valid_unicode", None, f"output_dir = {v!r}", lambda c: c.output_dir == Path(v)
    v = draw(st.integers(1, 1024))
    raw["num_threads"] = v
    return "valid", None, f"num_threads = {v}", lambda c: c.num_threads == v


RUN_MUTATORS = [r_bad_value] * 6 + [r_model_kwarg, r_unknown_key, r_unknown_key, r_missing,
                                    r_recipe, r_recipe, r_recipe, r_unknown_recipe] + [r_valid] * 3


@st.composite
def run_cases(draw) -> Case:
    shipped = draw(st.sampled_from(shipped_runs()))
    if draw(st.integers(0, 9)) == 0:
        kind, data, word = file_level(draw, shipped)
        return Case(kind, True, data, ROOT_KEY, note=shipped.path.name, words=(word,))
    raw = copy.deepcopy(shipped.raw)
    mutate = draw(st.sampled_from(RUN_MUTATORS))
    kind, expect, note, check = mutate(draw, raw, shipped.resolved)
    return Case(kind, True, dump(raw), expect, check, f"{shipped.path.name}: {note}")


# ----------------------------------------------------------------------------- checking


@pytest.fixture(scope="module", autouse=True)
def fast_discovery():
    """Scan installed distributions for recipe entry points once instead of on every lookup
    (tens of milliseconds each; entry points are tested in test_recipes.py and test_cli.py)."""
    eps = registry.entry_points(group=registry.ENTRY_POINT_GROUP)
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(registry.RECIPE_PATH_ENV, raising=False)
        mp.setattr(registry, "entry_points", lambda group: eps)
        yield


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def write_case(case: Case, folder: Path) -> Path:
    n = sum(COUNTS["written"].values())
    COUNTS["written"]["files"] += 1
    path = folder / f"case{n:05d}.yaml"
    path.write_bytes(case.data)
    return path


def check_api(case: Case, path: Path) -> None:
    try:
        result = load_run_file(path) if case.run else load_recipe(path)
    except RecipeError as err:
        assert case.expect is not None, f"rejected a valid mutation: {err}\n{case.describe()}"
        assert isinstance(err.key_path, str) and err.key_path, repr(err)
        assert key_matches(err.key_path, case.expect), \
            f"key_path {err.key_path!r}: {err}\n{case.describe()}"
        message = str(err)
        if case.expect == ROOT_KEY:
            assert err.source and Path(err.source).name == path.name, message
            assert path.name in message, message
        else:
            assert case.expect.replace("''", "") in message or err.key_path in message, \
                f"the message does not name {case.expect!r}: {message}"
        for word in case.words:
            assert word in message, message
        COUNTS[("run" if case.run else "recipe")]["rejected: " + case.kind] += 1
        return
    except Exception:  # noqa: BLE001 - anything else is a crash, i.e. a traceback for a user
        pytest.fail(f"{traceback.format_exc()}\n{case.describe()}")
    assert case.expect is None, f"silently accepted a bad value\n{case.describe()}"
    assert isinstance(result, RunConfig if case.run else Recipe)
    if case.check is not None:
        assert case.check(result), f"the valid value did not arrive\n{case.describe()}"
    COUNTS[("run" if case.run else "recipe")]["accepted: " + case.kind] += 1


def _total(kind: str) -> int:
    return sum(COUNTS[kind].values())


def report(kind: str) -> None:
    lines = ", ".join(f"{k} {v}" for k, v in sorted(COUNTS[kind].items()))
    print(f"\nfuzz {kind} files: {_total(kind)} cases ({lines})")


COMMON_KINDS = {"wrong_type", "out_of_range", "missing_key", "unknown_key", "phase_longer_than_run",
                "unknown_recipe_name", "broken_yaml", "empty_file", "huge_number", "valid"}


def fuzz_through_the_api(kind: str, cases, folder) -> set[str]:
    """Check ``API_EXAMPLES[kind]`` generated files of ``kind`` through the API; returns the
    mutation kinds seen."""
    COUNTS[kind].clear()

    @settings(max_examples=API_EXAMPLES[kind], **FUZZ)
    @given(case=cases)
    def one(case):
        check_api(case, write_case(case, folder))

    one()
    report(kind)
    assert _total(kind) >= API_EXAMPLES[kind]
    return {k.split(": ")[1] for k in COUNTS[kind]}


def test_fuzzed_recipe_files_get_the_right_answer(folder):
    kinds = fuzz_through_the_api("recipe", recipe_cases(), folder)
    assert COMMON_KINDS | {"unicode"} <= kinds, kinds


def test_fuzzed_run_files_get_the_right_answer(folder):
    kinds = fuzz_through_the_api("run", run_cases(), folder)
    assert COMMON_KINDS <= kinds, kinds


def test_a_sample_through_qtrainer_validate(folder):
    """``qtrainer validate FILE``: exit 2 with the key in the one-line message for bad files
    (no traceback), exit 0 for valid ones."""
    COUNTS["cli"].clear()
    runner = CliRunner()

    @settings(max_examples=CLI_EXAMPLES, **FUZZ)
    @given(case=st.one_of(recipe_cases(), run_cases()))
    def one(case):
        path = write_case(case, folder)
        r = runner.invoke(app, ["validate", str(path)], catch_exceptions=False)
        out = r.output
        assert "Traceback" not in out, f"{out}\n{case.describe()}"
        if case.expect is None:
            assert r.exit_code == 0, f"{out}\n{case.describe()}"
            assert out.startswith("ok: "), out
        else:
            assert r.exit_code == 2, f"exit {r.exit_code}: {out}\n{case.describe()}"
            assert out.startswith("error: ") and len(out.strip().splitlines()) == 1, out
            if case.expect == ROOT_KEY:
                assert path.name in out, out
            else:
                shown = out[out.rindex("[key: ") + 6:].rstrip().removesuffix("]")
                assert key_matches(shown, case.expect), f"{out}\n{case.describe()}"
        COUNTS["cli"][("accepted: " if case.expect is None else "rejected: ") + case.kind] += 1

    one()
    report("cli")
    assert _total("cli") >= CLI_EXAMPLES
