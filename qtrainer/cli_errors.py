"""How the ``qtrainer`` command reports problems: exit codes (0 success, 2 bad input, 1
failure), one-paragraph messages that name the key and where the bad value came from (a
command-line ``KEY=VALUE`` argument, a run file, a recipe file), tracebacks only with
``--debug``."""

from __future__ import annotations

import functools
import traceback
from typing import List, Optional

import typer

from .recipes import RecipeError, parse_overrides

EXIT_BAD_INPUT, EXIT_FAILURE = 2, 1

STATE: dict = {"debug": False, "arguments": {}}
"""Per invocation: ``debug`` (--debug) and ``arguments`` (key -> (``KEY=VALUE`` text, value))."""


class BadInput(Exception):
    """A user error outside the run-file schema (e.g. a missing file)."""


def fail(code: int, message: str, exc: BaseException | None = None) -> None:
    if exc is not None and STATE["debug"]:
        traceback.print_exception(exc)
    typer.echo(message, err=True)
    raise typer.Exit(code)


def _command_line_argument(key_path: str) -> str | None:
    """The ``KEY=VALUE`` argument that set ``key_path``, or a mapping or list above it, if
    any (``recipe=my.yaml`` only names a file: that file is the source of what is in it)."""
    key = key_path.replace("[", ".").replace("]", "")
    for name, (argument, value) in STATE["arguments"].items():
        if key == name or (key.startswith(name + ".") and isinstance(value, (dict, list))):
            return argument
    return None


def _describe(err: RecipeError) -> str:
    argument = _command_line_argument(err.key_path)
    if argument is not None:
        where = f"command line argument {argument!r}: "
    else:
        where = f"{err.source}: " if err.source else ""
    key = "" if err.key_path in ("<root>",) else f" [key: {err.key_path}]"
    return f"error: {where}{err.detail}{key}"


def handle_errors(fn):
    """Map exceptions to exit codes: bad input 2, anything else 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except RecipeError as e:
            fail(EXIT_BAD_INPUT, _describe(e), e)
        except (BadInput, FileNotFoundError, IsADirectoryError) as e:
            fail(EXIT_BAD_INPUT, f"error: {e}", e)
        except KeyboardInterrupt as e:
            fail(EXIT_FAILURE, "interrupted", e)
        except Exception as e:  # noqa: BLE001 - the CLI's last line of defence
            hint = "" if STATE["debug"] else " (run with --debug for the traceback)"
            fail(EXIT_FAILURE, f"failed: {type(e).__name__}: {e}{hint}", e)

    return wrapper


def overrides(items: Optional[List[str]]) -> dict:
    """Parsed ``KEY=VALUE`` arguments; remembered so that errors about those keys name the
    argument rather than the file the key would otherwise come from."""
    parsed = parse_overrides(items or [])
    raw = {item.partition("=")[0].strip(): item for item in items or []}
    STATE["arguments"] = {k: (raw.get(k, f"{k}=..."), v) for k, v in parsed.items()}
    return parsed


__all__ = ["EXIT_BAD_INPUT", "EXIT_FAILURE", "STATE", "BadInput", "fail", "handle_errors",
           "overrides"]
