"""Where recipes come from, and loading them by name, path or dict.

Sources, each searched on every call (no stale cache):

- ``builtin``: the YAML files in ``qtrainer/recipes/builtin/``.
- ``path:<dir>``: every ``*.yaml``/``*.yml`` file in the folders of the environment variable
  ``QTRAINER_RECIPE_PATH`` (``os.pathsep``-separated).
- ``entry-point:<dist>``: entry points of group ``qtrainer.recipes`` of installed
  distributions. The entry point's object (``module:attribute``) is one of: a path (str or
  ``os.PathLike``) to a recipe YAML file or to a folder of them, a :class:`Recipe`, or a recipe
  mapping. The entry point's own name is only a label; recipe names come from the recipes.
- ``registered``: :func:`register_recipe` in this process.

A recipe found by discovery must state its ``name`` in its own file (not only through
``extends``). Two sources defining one name is a :class:`RecipeError` naming both, raised when
that name is looked up and by :func:`list_recipes`; nothing is silently shadowed.
``register_recipe(..., overwrite=True)`` is the one explicit way to replace a recipe.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from .errors import ROOT, RecipeError, did_you_mean, show
from .io import apply_overrides, is_path_reference, read_recipe_file, resolve_extends
from .schema import NAME, Recipe

BUILTIN_DIR = Path(__file__).parent / "builtin"
RECIPE_PATH_ENV = "QTRAINER_RECIPE_PATH"
ENTRY_POINT_GROUP = "qtrainer.recipes"


@dataclass(frozen=True)
class RecipeInfo:
    """One line of :func:`list_recipes`.

    Attributes:
        name: the recipe's name.
        method: ``lsq``, ``nipq`` or ``tempering``.
        weight_bits, act_bits: default bit-widths (initial ones when NIPQ learns bits).
        description: the recipe's description.
        source: ``builtin``, ``path:<dir>``, ``entry-point:<dist>`` or ``registered``.
        target: for NIPQ mixed precision (learned bit-widths under a resource constraint), the
            constraint (``avg 4 bits``, ``5.3 GBOPs``); empty otherwise.
    """

    name: str
    method: str
    weight_bits: int
    act_bits: int | None  # None: weights only
    description: str
    source: str
    target: str = ""


@dataclass(frozen=True)
class _Entry:
    name: str
    source: str
    where: str  # file path or other locator, for messages
    path: Path | None = None  # a recipe file ...
    recipe: Recipe | None = None  # ... or an in-memory recipe
    raw: Mapping | None = None  # ... or an in-memory mapping
    overwrite: bool = False

    def describe(self) -> str:
        return f"{self.source} ({self.where})"


_registered: dict[str, _Entry] = {}


def _file_entry(path: Path, source: str) -> _Entry:
    raw = read_recipe_file(path)
    if "name" not in raw:
        raise RecipeError("name", "missing required key 'name': a discovered recipe file must state "
                                  "its own name", source=str(path))
    return _Entry(_checked_name(raw["name"], str(path)), source, str(path), path=path)


def _checked_name(name: object, where: str) -> str:
    try:
        return NAME(name, "name")
    except RecipeError as e:
        raise e.with_source(where) from None


def _folder_entries(folder: Path, source: str) -> list[_Entry]:
    files = sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")])
    return [_file_entry(f, source) for f in files]


def _entry_point_entries() -> list[_Entry]:
    entries = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist.name if ep.dist is not None else "unknown distribution"
        source = f"entry-point:{dist}"
        label = f"entry point '{ep.name} = {ep.value}' of {dist}"
        try:
            obj = ep.load()
        except Exception as e:  # any import-time failure of a third-party package
            raise RecipeError(ROOT, f"{label} failed to load: {type(e).__name__}: {e}") from None
        if isinstance(obj, (str, os.PathLike)):
            path = Path(obj)
            if path.is_dir():
                entries += _folder_entries(path, source)
            elif path.is_file():
                entries.append(_file_entry(path, source))
            else:
                raise RecipeError(ROOT, f"{label} points to {show(str(path))}, which is neither a "
                                        "recipe file nor a folder")
        elif isinstance(obj, Recipe):
            entries.append(_Entry(obj.name, source, label, recipe=obj))
        elif isinstance(obj, Mapping):
            if "name" not in obj:
                raise RecipeError("name", f"missing required key 'name' in the recipe of {label}")
            entries.append(_Entry(_checked_name(obj["name"], label), source, label, raw=obj))
        else:
            raise RecipeError(ROOT, f"{label} gave {type(obj).__name__}; expected a path to a recipe "
                                    "file or folder, a Recipe, or a recipe mapping")
    return entries


def _discover() -> dict[str, list[_Entry]]:
    """Every name -> the entries that define it (more than one is a clash)."""
    entries = _folder_entries(BUILTIN_DIR, "builtin")
    for folder in os.environ.get(RECIPE_PATH_ENV, "").split(os.pathsep):
        if not folder:
            continue
        if not Path(folder).is_dir():
            raise RecipeError(ROOT, f"{RECIPE_PATH_ENV} lists {show(folder)}, which is not a folder")
        entries += _folder_entries(Path(folder), f"path:{folder}")
    entries += _entry_point_entries()
    index: dict[str, list[_Entry]] = {}
    for entry in entries:
        index.setdefault(entry.name, []).append(entry)
    for name, entry in _registered.items():
        index[name] = [entry] if entry.overwrite else [*index.get(name, []), entry]
    return index


def _target(recipe: Recipe) -> str:
    """The mixed-precision constraint of a recipe that learns its bit-widths, for listings."""
    mp = recipe.mixed_precision
    if not getattr(recipe.method, "learn_bits", False) or mp.target == "none":
        return ""
    return f"avg {mp.value:g} bits" if mp.target == "avg_bits" else f"{mp.value:g} GBOPs"


def _clash(name: str, found: list[_Entry]) -> RecipeError:
    """Attributed to the newest definition (the last found; not a built-in), so that the error
    names it even when raised while loading another recipe that ``extends`` the name."""
    return RecipeError("name", f"recipe name '{name}' is defined by more than one source: "
                               f"{' and '.join(e.describe() for e in found)}; rename one of them "
                               "(register_recipe(..., overwrite=True) replaces explicitly)",
                       source=found[-1].where)


def _pick(index: dict[str, list[_Entry]], name: str) -> _Entry:
    found = index.get(name, [])
    if not found:
        known = sorted(index)
        raise RecipeError("name", f"unknown recipe {show(name)}{did_you_mean(name, known)} "
                                  f"(known recipes: {', '.join(known)})")
    if len(found) > 1:
        raise _clash(name, found)
    return found[0]


def _raw_of(entry: _Entry) -> tuple[dict, Path | None, str]:
    """(raw mapping, folder for relative extends, source label) of one entry."""
    if entry.path is not None:
        return read_recipe_file(entry.path), entry.path.parent, str(entry.path)
    if entry.recipe is not None:
        return entry.recipe.to_dict(), None, entry.describe()
    return dict(entry.raw), None, entry.describe()


class _Lookup:
    """Name -> raw recipe, discovering the sources once, on the first name looked up
    (scanning installed distributions' entry points costs tens of milliseconds)."""

    def __init__(self, index: dict[str, list[_Entry]] | None = None):
        self._index = index

    def __call__(self, name: str) -> tuple[dict, Path | None, str]:
        if self._index is None:
            self._index = _discover()
        return _raw_of(_pick(self._index, name))


def load_recipe(recipe: str | os.PathLike | Mapping | Recipe,
                overrides: Mapping[str, Any] | None = None) -> Recipe:
    """Load and validate a recipe.

    Args:
        recipe: a recipe name (see :func:`list_recipes`), a path to a YAML file (a str ending
            in ``.yaml``/``.yml`` or containing a slash, or an ``os.PathLike``), a recipe
            mapping (relative ``extends`` paths resolve against the working directory), or a
            :class:`Recipe`.
        overrides: dotted key paths -> values, applied after ``extends``
            (``{"bits.weight": 2, "method.grad_scale": "none"}``); see
            :func:`qtrainer.recipes.io.apply_overrides`.

    Raises:
        RecipeError: for every problem, with ``key_path`` and, for files, ``source``.
    """
    return _load(recipe, overrides, _Lookup())


def _load(recipe: object, overrides: Mapping[str, Any] | None, lookup: _Lookup) -> Recipe:
    source = None
    try:
        if isinstance(recipe, Recipe):
            raw, base, chain = recipe.to_dict(), None, ()
        elif isinstance(recipe, Mapping):
            raw, base, chain = dict(recipe), None, ()
        elif isinstance(recipe, os.PathLike) or (isinstance(recipe, str) and is_path_reference(recipe)):
            path = Path(recipe)
            source = str(path)
            raw, base, chain = read_recipe_file(path), path.parent, (f"file:{path.resolve()}",)
        elif isinstance(recipe, str):
            raw, base, source = lookup(recipe)
            chain = (f"name:{recipe}",)
        else:
            raise RecipeError(ROOT, f"expected a recipe name, a path, a mapping or a Recipe, "
                                    f"got {type(recipe).__name__} {show(recipe)}")
        resolved = resolve_extends(raw, base, lookup, chain)
        if overrides:
            resolved = apply_overrides(resolved, overrides)
        return Recipe.from_dict(resolved)
    except RecipeError as e:
        key = _override_at(e.key_path, overrides)
        if key is not None:  # the override's value is wrong, not the file it overrides
            source = f"override {key}={show(overrides[key])}" + (f" of {source}" if source else "")
        raise (e.with_source(source) if source else e) from None
    except RecursionError:
        raise RecipeError(ROOT, "the recipe is nested too deeply (recursive YAML anchors?)",
                          source=source) from None


def _override_at(key_path: str, overrides: Mapping[str, Any] | None) -> str | None:
    """The override key that set ``key_path`` (itself, a section above it or a key below it)."""
    for key in overrides or ():
        if not isinstance(key, str):
            continue
        if key == key_path or key_path.startswith(f"{key}.") or key.startswith(f"{key_path}."):
            return key
    return None


def get_recipe(name: str) -> Recipe:
    """The recipe registered under ``name`` (any source)."""
    if not isinstance(name, str):
        raise RecipeError("name", f"a recipe name must be a string, got {show(name)}")
    if is_path_reference(name):
        raise RecipeError("name", f"{show(name)} is a path, not a recipe name; use load_recipe()")
    return load_recipe(name)


def list_recipes() -> list[RecipeInfo]:
    """Every available recipe, sorted by name. Raises on a name clash or a broken recipe."""
    index = _discover()
    infos = []
    for name, found in sorted(index.items()):
        if len(found) > 1:
            raise _clash(name, found)
        recipe = _load(name, None, _Lookup(index))
        infos.append(RecipeInfo(name, recipe.method.name, recipe.bits.weight, recipe.bits.activation,
                                recipe.description, found[0].source, _target(recipe)))
    return infos


def register_recipe(recipe: str | os.PathLike | Mapping | Recipe, name: str | None = None,
                    overwrite: bool = False) -> Recipe:
    """Make a recipe available by name in this process (source ``registered``).

    Args:
        recipe: anything :func:`load_recipe` accepts.
        name: register under this name instead of the recipe's own (the stored recipe is renamed).
        overwrite: replace an existing recipe of that name from any source (otherwise a clash
            is a :class:`RecipeError`).

    Returns:
        The validated recipe as stored.
    """
    loaded = load_recipe(recipe, None if name is None else {"name": name})
    existing = _discover().get(loaded.name, [])
    if existing and not overwrite:
        raise RecipeError("name", f"recipe '{loaded.name}' already exists: "
                                  f"{' and '.join(e.describe() for e in existing)}; pass overwrite=True "
                                  "to replace it")
    _registered[loaded.name] = _Entry(loaded.name, "registered", "register_recipe()", recipe=loaded,
                                      overwrite=overwrite)
    return loaded


def unregister_recipe(name: str) -> None:
    """Forget a recipe added by :func:`register_recipe`."""
    if name not in _registered:
        raise RecipeError("name", f"no registered recipe {show(name)}"
                                  f"{did_you_mean(name, list(_registered))}")
    del _registered[name]
