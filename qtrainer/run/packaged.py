"""The run files shipped inside the package (``qtrainer/runfiles/*.yaml``), runnable by name:
``qtrainer run quickstart``. ``recipes/`` in the source tree links to the same files."""

from __future__ import annotations

from pathlib import Path

from ..recipes.errors import ROOT, did_you_mean
from .errors import RunFileError

RUNFILES_DIR = Path(__file__).resolve().parents[1] / "runfiles"


def packaged_run_files() -> dict[str, Path]:
    """Name (file stem) -> path of every shipped run file."""
    return {p.stem: p for p in sorted(RUNFILES_DIR.glob("*.yaml"))}


def resolve_run_file(ref: str) -> Path:
    """An existing file ``ref``, or the shipped run file named ``ref`` (``quickstart``,
    ``quickstart.yaml``). Raises :class:`RunFileError` listing the shipped ones."""
    path = Path(ref)
    if path.is_file():
        return path
    shipped = packaged_run_files()
    name = path.name[:-5] if path.name.endswith(".yaml") else path.name
    if path.parent == Path(".") and name in shipped:
        return shipped[name]
    raise RunFileError(ROOT, f"run file {ref!r} does not exist{did_you_mean(name, shipped)} "
                             f"(shipped run files, runnable by name: {', '.join(shipped)})")


__all__ = ["RUNFILES_DIR", "packaged_run_files", "resolve_run_file"]
