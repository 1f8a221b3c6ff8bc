"""Recipe files: reading and writing, ``extends`` resolution, dotted overrides.

Everything here works on raw (unvalidated) mappings; :meth:`Recipe.from_dict` validates the
result. YAML syntax itself is handled by :mod:`qtrainer.recipes.yaml_codec`.
"""

from __future__ import annotations

import copy
import functools
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from .errors import ROOT, RecipeError, show
from .sections import LayerOverride
from .yaml_codec import parse_yaml

MAX_EXTENDS_DEPTH = 32
OVERRIDE_FIELDS = tuple(LayerOverride.__dataclass_fields__)


@functools.lru_cache(maxsize=256)
def _parse_file_text(text: str, source: str) -> Any:
    """Parsed file contents, cached by text: discovery reads every recipe file on each lookup."""
    return parse_yaml(text, source)


def read_recipe_file(path: str | os.PathLike) -> dict:
    """The top-level mapping of a recipe file, unvalidated and with ``extends`` unresolved."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, ValueError) as e:  # missing, a folder, undecodable, NUL in the name...
        raise RecipeError(ROOT, f"cannot read recipe file: {type(e).__name__}: {e}", source=source) from None
    data = copy.deepcopy(_parse_file_text(text, source))
    if data is None:
        raise RecipeError(ROOT, "the recipe file is empty", source=source)
    if not isinstance(data, dict):
        raise RecipeError(ROOT, f"the top level must be a mapping of recipe keys, got "
                                f"{type(data).__name__} {show(data)}", source=source)
    return data


def dump_recipe(recipe: Any, path: str | os.PathLike) -> Path:
    """Write ``recipe`` (a :class:`Recipe`) as resolved YAML to ``path``; returns the path."""
    path = Path(path)
    path.write_text(recipe.to_yaml(), encoding="utf-8")
    return path


def is_path_reference(ref: str) -> bool:
    """Whether a recipe reference names a file (``.yaml``/``.yml`` or containing a slash)
    rather than a registered recipe name."""
    return ref.endswith((".yaml", ".yml")) or "/" in ref or os.sep in ref


# ----------------------------------------------------------------------------- merging


def deep_merge(parent: Mapping, child: Mapping) -> dict:
    """``child`` over ``parent``: mappings merge key by key, anything else replaces."""
    out = dict(parent)
    for key, value in child.items():
        old = out.get(key)
        out[key] = deep_merge(old, value) if isinstance(old, Mapping) and isinstance(value, Mapping) else value
    return out


def merge_recipes(parent: Mapping, child: Mapping) -> dict:
    """Recipe-aware :func:`deep_merge`: a child that names a different ``method.name`` replaces
    the parent's whole ``method`` section (another method's parameters would be invalid)."""
    p_method, c_method = parent.get("method"), child.get("method")
    if (isinstance(p_method, Mapping) and isinstance(c_method, Mapping) and "name" in c_method
            and c_method["name"] != p_method.get("name")):
        parent = {k: v for k, v in parent.items() if k != "method"}
    return deep_merge(parent, child)


Lookup = Callable[[str], "tuple[dict, Path | None, str]"]
"""Name -> (raw recipe mapping, folder its relative ``extends`` resolve against, source)."""


def resolve_extends(raw: Mapping, base_dir: Path | None, lookup: Lookup,
                    chain: tuple[str, ...] = ()) -> dict:
    """Resolve ``raw``'s ``extends`` chain into one mapping without ``extends``.

    ``extends`` names a registered recipe, or a file (``.yaml``/``.yml`` or with a slash)
    relative to ``base_dir`` (the extending file's folder; the working directory for dicts).
    ``chain`` holds the identities already being resolved, for cycle detection.
    """
    if "extends" not in raw:
        return dict(raw)
    ref = raw["extends"]
    if not isinstance(ref, str) or not ref:
        raise RecipeError("extends", f"extends: expected a recipe name or a .yaml path, got {show(ref)}")
    if len(chain) >= MAX_EXTENDS_DEPTH:
        raise RecipeError("extends", f"extends: chain longer than {MAX_EXTENDS_DEPTH} recipes")
    if is_path_reference(ref):
        try:
            path = ((base_dir or Path.cwd()) / ref).resolve()
        except (OSError, ValueError, RuntimeError) as e:
            raise RecipeError("extends", f"extends: bad path {show(ref)}: {e}") from None
        ident = f"file:{path}"
        if ident in chain:
            raise RecipeError("extends", f"extends cycle: {' -> '.join(chain + (ident,))}")
        parent, parent_dir, parent_source = read_recipe_file(path), path.parent, str(path)
    else:
        ident = f"name:{ref}"
        if ident in chain:
            raise RecipeError("extends", f"extends cycle: {' -> '.join(chain + (ident,))}")
        try:
            parent, parent_dir, parent_source = lookup(ref)
        except RecipeError as e:
            if e.key_path == "name" and e.detail.startswith("unknown recipe"):
                # the name that cannot be found is the value of `extends`: say so
                raise RecipeError("extends", f"extends: {e.detail}", source=e.source) from None
            raise
    try:
        resolved_parent = resolve_extends(parent, parent_dir, lookup, chain + (ident,))
    except RecipeError as e:
        raise e.with_source(parent_source) from None
    return merge_recipes(resolved_parent, {k: v for k, v in raw.items() if k != "extends"})


# ----------------------------------------------------------------------------- overrides


def _split_override_key(key: object) -> list[str]:
    if not isinstance(key, str) or not key or any(not part for part in key.split(".")):
        raise RecipeError(show(key) if not isinstance(key, str) or not key else key,
                          f"override key {show(key)} must be a dotted key path like 'bits.weight'")
    parts = key.split(".")
    if parts[0] == "overrides" and len(parts) > 2:
        # Layer patterns contain dots: overrides.<pattern>[.<field>]
        if parts[-1] in OVERRIDE_FIELDS:
            return ["overrides", ".".join(parts[1:-1]), parts[-1]]
        return ["overrides", ".".join(parts[1:])]
    return parts


def _existing_key(node: Mapping, part: str) -> object:
    """The key of ``node`` that dotted segment ``part`` addresses: ``part`` itself, or an int
    key written in digits (``weight_decay.factors.2``)."""
    if part not in node and part.isascii() and part.isdigit() and len(part) <= 18 and int(part) in node:
        return int(part)
    return part


def apply_overrides(raw: Mapping, overrides: Mapping) -> dict:
    """Set dotted key paths (``{"bits.weight": 2, "method.grad_scale": "none"}``) in a copy of
    ``raw``. Missing sections are created; unknown keys are left for validation to report.
    Setting ``method.name`` to another method drops the old method's parameters.
    ``overrides.<pattern>.<field>`` addresses a layer override whose glob may contain dots."""
    if not isinstance(overrides, Mapping):
        raise RecipeError("<overrides>", f"overrides must be a mapping of dotted key paths to values, "
                                         f"got {show(overrides)}")
    out = dict(raw)
    for key, value in overrides.items():
        parts = _split_override_key(key)
        if parts[0] == "extends":
            raise RecipeError("extends", "extends cannot be overridden (it is resolved before overrides)")
        if parts == ["method", "name"] and isinstance(out.get("method"), Mapping) \
                and out["method"].get("name") != value:
            out["method"] = {"name": value}
            continue
        node = out
        for depth, part in enumerate(parts[:-1]):
            existing = _existing_key(node, part)
            child = node.get(existing, {})
            if not isinstance(child, Mapping):
                prefix = ".".join(parts[: depth + 1])
                raise RecipeError(key, f"cannot set '{key}': '{prefix}' is {show(child)}, not a section")
            node[existing] = dict(child)
            node = node[existing]
        node[_existing_key(node, parts[-1])] = value
    return out


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``["bits.weight=2", "method.grad_scale=none"]`` -> ``{"bits.weight": 2, ...}``; each
    value is parsed as YAML (``2`` an int, ``[a, b]`` a list, ``none`` a string)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=") if isinstance(item, str) else ("", "", "")
        if not sep or not key.strip():
            raise RecipeError(show(item), f"override {show(item)} must look like 'key.path=value'")
        try:
            out[key.strip()] = parse_yaml(text)
        except RecipeError as e:
            raise RecipeError(key.strip(), f"override {show(item)}: {e.detail}") from None
    return out
