"""Checkpoints that check themselves: a sha256 of every file a round wrote, kept in its marker.

``COMPLETE.json`` of a round records ``files: {"rank_0.pt": "<sha256>", ...}``: the digest of the bytes
each process saved (rank 0 adds those of the other ranks' files it can see, i.e. all of them on a
shared disk). On resume :func:`newest_intact` walks the rounds from the newest down and takes the
first whose marker is readable, names its own round and whose listed files all hash to their
digests; every newer round it skips is reported (naming the damaged or missing file) so the caller
can say so in one line. Markers written before digests existed list no files and are trusted as
before (their files are still loaded with ``weights_only=True``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from declora.rundir.layout import CHECKPOINTS, MARKER, RANK_FILE_GLOB, ROUND_GLOB, round_of


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def round_files(folder: Path, own: str, own_digest: str) -> dict[str, str]:
    """The ``files`` entry of a round's marker: this process's digest plus every other rank file visible."""
    files = {own: own_digest}
    for path in sorted(folder.glob(RANK_FILE_GLOB)):
        if path.name not in files:
            files[path.name] = sha256_file(path)
    return files


def check_round(folder: Path, marker: dict[str, Any] | None = None, only: str | None = None) -> str | None:
    """Why the round in ``folder`` cannot be resumed (naming the file), or None if it is intact.

    Args:
        marker: the parsed marker, if already read.
        only: check just this file of the marker (a rank verifying its own file).
    """
    path = folder / MARKER
    if marker is None:
        if not path.is_file():
            return f"{path} is missing (the round was not completed)"
        try:
            marker = json.loads(path.read_text())
            if marker["round"] != round_of(folder):
                return f"{path} names round {marker['round']}, not {round_of(folder)}"
        except (OSError, ValueError, KeyError, TypeError):
            return f"{path} is damaged (not a readable marker)"
    files = marker.get("files")
    if not isinstance(files, dict):  # a marker from before digests: nothing to verify
        return None
    for name, digest in sorted(files.items()):
        if only is not None and name != only:
            continue
        file = folder / name
        if not file.is_file():
            return f"{file} is missing"
        if sha256_file(file) != digest:
            return f"{file} is damaged (its sha256 differs from the one in {MARKER})"
    return None


def newest_intact(run: str | Path) -> tuple[int, list[str]]:
    """The newest round whose checkpoint is intact (0 if none), and why each newer round was skipped."""
    skipped: list[str] = []
    folders = [f for f in (Path(run) / CHECKPOINTS).glob(ROUND_GLOB) if f.is_dir() and round_of(f) > 0]
    for folder in sorted(folders, key=round_of, reverse=True):
        if not (folder / MARKER).exists() and not any(folder.glob(RANK_FILE_GLOB)):
            continue  # a save that crashed before writing any file: nothing was lost
        problem = check_round(folder)
        if problem is None:
            return round_of(folder), skipped
        skipped.append(problem)
    return 0, skipped


def resume_round(run: str | Path, from_scratch: bool = False) -> int:
    """The round to resume ``run`` from, saying in one line (stderr) which newer rounds were skipped.

    Args:
        from_scratch: ``resume_from_scratch=true``: with no intact round left, start again from round 1
            instead of stopping.

    Raises:
        CheckpointError: checkpoints exist but none is intact, and ``from_scratch`` is false.
    """
    import sys

    from declora.errors import CheckpointError

    found, skipped = newest_intact(run)
    if not skipped:
        return found
    why = "; ".join(skipped)
    if found:
        print(f"declora: warning: resume={run}: {why}; continuing from round {found}", file=sys.stderr, flush=True)
    elif from_scratch:
        print(f"declora: warning: resume={run}: {why}; starting again from round 1", file=sys.stderr, flush=True)
    else:
        raise CheckpointError(
            f"resume={run}: no intact checkpoint ({why}); pass resume_from_scratch=true to start again from round 1"
        )
    return found


def verify_own(run: str | Path, folder: Path, name: str) -> None:
    """A process's own file of the round it resumes from matches the marker's digest (if it sees the marker).

    Raises:
        CheckpointError: naming the file.
    """
    from declora.errors import CheckpointError

    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return  # this machine does not hold the marker (only rank 0 needs it)
    problem = check_round(folder, marker, only=name)
    if problem is not None:
        raise CheckpointError(f"resume={run}: {problem}; restore it or pass resume_from_scratch=true")
