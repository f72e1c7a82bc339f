"""Writing a run's files: atomically, with the permission bits the umask asks for, as strict JSON.

:func:`atomic_write_bytes` writes a temporary file in the same folder, fsyncs and renames it, so a
reader (or a resume after a crash) never sees half a file.

``tempfile.mkstemp`` creates its file with mode 0600 whatever the umask; the run directory's atomic
writes go through a temporary file, so without :func:`file_mode` every ``config.yaml``,
``metrics.jsonl`` and checkpoint would be private to its owner. Python's ``json.dumps`` writes
``NaN``/``Infinity``, which strict JSON readers (``jq``, JavaScript, pandas' ``orient=records``)
reject; :func:`dumps` writes ``null`` instead.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any


def current_umask() -> int:
    """The process umask, read without changing it where Linux tells it (``/proc/self/status``)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (the only portable way to read it)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give a new file: ``0o666 & ~umask``."""
    return 0o666 & ~current_umask()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, file_mode())  # mkstemp makes 0600; a run's files get what the umask gives any new file
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def finite_or_none(obj: Any) -> Any:
    """``obj`` with every non-finite float (also numpy scalars) replaced by None, recursively."""
    if isinstance(obj, float) or (hasattr(obj, "dtype") and getattr(obj, "shape", None) == ()):
        try:
            value = float(obj)
        except (TypeError, ValueError):
            return obj
        if isinstance(obj, float) or obj.dtype.kind == "f":
            return value if math.isfinite(value) else None
        return obj
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def dumps(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` that writes strict JSON: NaN and infinities become ``null``."""
    return json.dumps(finite_or_none(obj), allow_nan=False, **kwargs)


def share_files(folder: str | os.PathLike[str]) -> None:
    """Give every file under ``folder`` the umask's mode (safetensors writes 0600 like mkstemp)."""
    mode = file_mode()
    for path in Path(folder).rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.chmod(path, mode)
