"""A run directory is never overwritten by accident, and an unwritable one stops the run up front.

- :func:`check_out_dir` runs before anything is loaded: a temporary file must be writable in the folder
  (or its nearest existing parent), and a folder that already holds a run is refused with one line
  offering ``resume=DIR`` or ``overwrite=true``.
- :func:`clear_run` (``overwrite=true``) removes the previous run's files once the new run has passed
  its set-up, so a stale checkpoint can never be resumed into the new run.
- :func:`reloaded_out_dir` makes ``declora train --config RUN/config.yaml`` start a new run folder
  instead of writing into ``RUN``, whose ``out_dir`` its config records.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from declora.errors import ConfigError
from declora.rundir.layout import RUN_FILES, RUN_FOLDERS, RUN_MARKERS


def holds_run(path: str | Path) -> bool:
    """Whether ``path`` already holds (part of) a run: a config, metrics, a DONE mark or checkpoints."""
    return any((Path(path) / name).exists() for name in RUN_MARKERS)


def check_writable(path: str | Path, option: str = "out_dir", folder: bool = True) -> None:
    """Stop unless ``path`` is, or can be created as, a folder (``folder=False``: a file) this process can write.

    Writability is proven, not assumed from permission bits (``os.access`` says yes to root on ``/proc``):
    a temporary file is created and removed in ``path``, or in its nearest existing parent. Nothing is
    left behind, so a check of a folder that is never used costs nothing.

    Args:
        path: the folder (or file) a command will write.
        option: the option or flag that named it (``out_dir``, ``--out``, ``export OUT``), for the message.
        folder: whether ``path`` is a folder (else a file, whose parent is probed).

    Raises:
        ConfigError: one line naming ``option``, the path and why.
    """
    path = Path(path)
    named = f"{option} {path}" if option.startswith("-") or " " in option else f"{option}={path}"
    if path.exists() and path.is_dir() != folder:
        kind = "a folder, not a file" if folder is False else "a file, not a folder"
        raise ConfigError(f"{named}: {path} is {kind}; choose another {option}")
    probe = path if folder else path.parent
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"{named}: {probe} is a file, not a folder; choose another {option}")
    try:
        fd, name = tempfile.mkstemp(dir=probe, prefix=".declora-write-test-")
        os.close(fd)
        os.unlink(name)
    except OSError as err:
        raise ConfigError(
            f"{named}: {probe} is not writable (a test file could not be created: {err.strerror or err}); "
            f"choose another {option}"
        ) from None


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
