"""The YAML dialect of recipe files, for reading and writing.

``yaml.SafeLoader`` (plain data only, no object construction) with two changes: numbers written
without a dot (``1e-4``, as YAML 1.2 reads them) are floats, and a key given twice in one
mapping is an error instead of the last one silently winning. The dumper knows the same float
rule, so text it writes reads back to equal data.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import yaml

from .errors import ROOT, RecipeError, show

_FLOAT_WITHOUT_DOT = re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")


# libyaml's parser when PyYAML was built with it (same safe constructor, ~10x faster).
_SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_SafeDumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


class _Loader(_SafeLoader):
    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # unhashable key: the base class reports it
                break
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"found duplicate key {show(key)}", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


class _Dumper(_SafeDumper):
    pass


for _cls in (_Loader, _Dumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_WITHOUT_DOT, list("-+0123456789"))


def parse_yaml(text: str, source: str | None = None) -> Any:
    """Parse YAML ``text`` safely; any failure becomes a :class:`RecipeError` with the line."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a safe loader
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = e.problem or e.context or "syntax error"
        raise RecipeError(ROOT, f"broken YAML{where}: {problem}", source=source) from None
    except Exception as e:  # invalid dates (ValueError), deep nesting (RecursionError), ...
        raise RecipeError(ROOT, f"broken YAML: {type(e).__name__}: {show(str(e), 200)}",
                          source=source) from None


def dump_yaml_text(data: Mapping) -> str:
    """YAML text of plain recipe data, keys in their given order."""
    return yaml.dump(dict(data), Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100)
