"""The error type of run files and the helpers that raise it with a key path."""

from __future__ import annotations

from collections.abc import Mapping

from ..recipes import RecipeError
from ..recipes.errors import did_you_mean, show


class RunFileError(RecipeError):
    """A run file is invalid; ``key_path`` names the offending key (``data.batch_size``)."""

    def with_source(self, source: str) -> RunFileError:
        if self.source is not None:
            return self
        return RunFileError(self.key_path, self.detail, source=source)



def err(path: str, detail: str) -> RunFileError:
    return RunFileError(path, detail)


def mapping(raw: object, path: str) -> Mapping:
    if not isinstance(raw, Mapping):
        raise err(path, f"{path}: expected a mapping, got {show(raw)} ({type(raw).__name__})")
    return raw


def unknown(key: object, allowed, path: str) -> RunFileError:
    full = f"{path}.{key}" if path else str(key)
    where = f"'{path}'" if path else "a run file"
    return err(full, f"unknown key '{full}'{did_you_mean(key, list(allowed))} (allowed keys "
                      f"in {where}: {', '.join(allowed)})")


__all__ = ["RunFileError", "err", "mapping", "unknown"]
