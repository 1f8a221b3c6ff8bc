"""The run layer behind ``qtrainer run``: run files (:mod:`.runfile`, with its sections), the
runner that executes them (:mod:`.runner`) and loading a run's checkpoints (:mod:`.checkpoints`).

    from qtrainer.run import load_run_file, run
    result = run(load_run_file(resolve_run_file("quickstart")))
"""

from .checkpoints import find_run_file, load_checkpoint_model
from .errors import RunFileError
from .packaged import RUNFILES_DIR, packaged_run_files, resolve_run_file
from .runfile import (RUN_FILE_MARKERS, TOP_KEYS, RunConfig, apply_run_overrides, is_run_file,
                      load_run_file, read_run_file, validate_run)
from .runner import (EXTRA_CALLBACKS, JobResult, RunResult, bundle_loaders, is_main_process,
                     prepare, pretrain, run, write_json)
from .sections import EXPORT_FORMATS, Pretrain

__all__ = [
    "EXPORT_FORMATS", "EXTRA_CALLBACKS", "JobResult", "Pretrain", "RUN_FILE_MARKERS", "RunConfig",
    "RunFileError", "RunResult", "TOP_KEYS", "apply_run_overrides", "bundle_loaders",
    "find_run_file", "is_main_process", "is_run_file", "load_checkpoint_model", "load_run_file",
    "prepare", "pretrain", "read_run_file", "run", "validate_run", "write_json",
    "RUNFILES_DIR", "packaged_run_files", "resolve_run_file",
]
