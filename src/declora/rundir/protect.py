"""A run directory is never overwritten by accident, and an unwritable one stops the run up front.

- :func:`check_out_dir` runs before anything is loaded: the folder (or its nearest existing parent)
  must be a writable directory, and a folder that already holds a run is refused with one line
  offering ``resume=DIR`` or ``overwrite=true``.
- :func:`clear_run` (``overwrite=true``) removes the previous run's files once the new run has passed
  its set-up, so a stale checkpoint can never be resumed into the new run.
- :func:`reloaded_out_dir` makes ``declora train --config RUN/config.yaml`` start a new run folder
  instead of writing into ``RUN``, whose ``out_dir`` its config records.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from declora.errors import ConfigError

# What a run writes (see declora.rundir.layout); any of them means the folder holds a run.
RUN_MARKERS = ("config.yaml", "metrics.jsonl", "DONE", "checkpoints")
RUN_FILES = ("config.yaml", "environment.json", "metrics.jsonl", "summary.json", "DONE")
RUN_FOLDERS = ("adapters", "plots", "checkpoints", "ranks")


def holds_run(path: str | Path) -> bool:
    """Whether ``path`` already holds (part of) a run: a config, metrics, a DONE mark or checkpoints."""
    return any((Path(path) / name).exists() for name in RUN_MARKERS)


def check_writable(path: str | Path, option: str = "out_dir") -> None:
    """Stop unless ``path`` is, or can be created as, a directory this process can write.

    Raises:
        ConfigError: one line naming ``option``, the folder and why.
    """
    path = Path(path)
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise ConfigError(f"{option}={path}: {probe} is a file, not a folder; choose another {option}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{option}={path}: {probe} is not writable by this user; choose another {option}")


def check_out_dir(out_dir: str | None, *, resume: str | None, overwrite: bool) -> None:
    """The run directory checks that need no model (see the module docstring).

    Args:
        out_dir: the configured run directory; None = a new ``runs/<timestamp>-<algorithm>`` folder.
        resume: ``resume=``; a resumed run writes into its own folder by design.
        overwrite: ``overwrite=true`` replaces a previous run in ``out_dir``.

    Raises:
        ConfigError: unwritable folder, or a folder that holds a run and neither option was given.
    """
    check_writable(out_dir if out_dir is not None else "runs")
    if out_dir is None or resume is not None or overwrite:
        return
    if holds_run(out_dir):
        raise ConfigError(
            f"out_dir={out_dir} already holds a run; continue it with resume={out_dir}, replace it with "
            "overwrite=true, or choose another out_dir"
        )


def clear_run(path: str | Path) -> None:
    """Delete a previous run's files from ``path`` (only the run contract's own names; others stay)."""
    path = Path(path)
    for name in RUN_FILES:
        (path / name).unlink(missing_ok=True)
    for name in RUN_FOLDERS:
        shutil.rmtree(path / name, ignore_errors=True)


def reloaded_out_dir(out_dir: str | None, from_file: bool, overridden: bool, resume: str | None) -> str | None:
    """The out_dir to use when a config file is loaded.

    A config file's ``out_dir`` that already holds a run (``RUN/config.yaml`` records its own folder)
    is dropped, so the reloaded config starts a new run folder; an explicit ``out_dir=`` override (with
    ``overwrite=true``) or ``resume=`` is the way to write into an existing run.
    """
    if out_dir is None or not from_file or overridden or resume is not None:
        return out_dir
    return None if holds_run(out_dir) else out_dir


def new_folder(path: str | Path) -> Path:
    """Create and return ``path``, or ``path-2``, ``path-3``, ... if it exists: two runs started in the
    same second never share a default ``runs/<timestamp>-<algorithm>`` folder (mkdir is atomic)."""
    path = Path(path)
    for k in range(1, 1000):
        candidate = path if k == 1 else path.with_name(f"{path.name}-{k}")
        try:
            candidate.mkdir(parents=True)
            return candidate
        except FileExistsError:
            continue
    raise ConfigError(f"out_dir: {path} and 998 numbered variants exist; set out_dir")
