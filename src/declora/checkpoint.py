"""Checkpoint and resume: every process saves its clients atomically; a marker makes a round complete.

```
<run>/checkpoints/round_<t>/rank_<r>.pt      process r's clients (adapter tensors, optimizer state, data
                                              position), its algorithm state, the metrics history so far
<run>/checkpoints/round_<t>/COMPLETE.json    written by rank 0 once every process has saved round t
```

Each file is written with :func:`~declora.rundir.atomic_write_bytes` (temporary file, fsync, rename),
so a crash during a save leaves at most a stray ``.tmp`` file, never a truncated ``rank_<r>.pt``. A
round without its marker is never loaded: resume continues from the newest round that has one. After
a marker is written the older rounds are deleted, so a run keeps one complete checkpoint.

The simulation is one process (rank 0 holding every client); under torch.distributed each rank holds
its own client, so on several machines each machine keeps its ranks' files and only rank 0 needs the
marker (the round to resume from is agreed on through the communicator).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from declora.algorithms import Algorithm
from declora.client import Client
from declora.comm import Communicator
from declora.config import Config, ConfigError
from declora.rundir import atomic_write_bytes, atomic_write_text

CHECKPOINTS = "checkpoints"
MARKER = "COMPLETE.json"
# Options that may differ between a run and its resumption: they change neither the numbers of the
# rounds already done nor those to come (train.rounds only extends the run).
RESUMABLE_CHANGES = (
    "train.rounds",
    "resume",
    "out_dir",
    "progress",
    "plots",
    "save_adapters",
    "checkpoint_every",
    "comm.timeout_s",
    "comm.startup_timeout_s",
    "comm.init_method",
    "eval.batch_size",
)


@dataclass
class Progress:
    """Where the round loop stands: the last finished round and what it has accumulated."""

    round: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)  # the metrics rows written so far
    total_bytes: int = 0
    train_s: float = 0.0
    wall_s: float = 0.0


def round_dir(run: Path, round_: int) -> Path:
    return Path(run) / CHECKPOINTS / f"round_{round_:06d}"


def rank_file(run: Path, round_: int, rank: int) -> Path:
    return round_dir(run, round_) / f"rank_{rank}.pt"


def due(cfg: Config, round_: int) -> bool:
    """Whether round ``round_`` ends with a checkpoint (every ``checkpoint_every`` rounds and the last)."""
    every = cfg.checkpoint_every
    return every > 0 and (round_ % every == 0 or round_ == cfg.train.rounds)


def save(run: Path, progress: Progress, clients: dict[int, Client], algorithm: Algorithm, comm: Communicator) -> None:
    """Checkpoint round ``progress.round``: this process's file, then (rank 0) the marker, then pruning."""
    payload = {
        "round": progress.round,
        "rank": comm.rank,
        "local_clients": sorted(clients),
        "clients": {i: c.checkpoint() for i, c in clients.items()},
        "algorithm": algorithm.state_dict(),
        "history": progress.history,
        "total_bytes": progress.total_bytes,
        "train_s": progress.train_s,
        "wall_s": progress.wall_s,
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(rank_file(run, progress.round, comm.rank), buffer.getvalue())
    comm.barrier()  # every process has its file for this round
    if comm.rank == 0:
        marker = {"round": progress.round, "clients": comm.num_clients}
        atomic_write_text(round_dir(run, progress.round) / MARKER, json.dumps(marker) + "\n")
    comm.barrier()  # the round is complete: older ones can go
    prune(run, progress.round, comm.rank)


def prune(run: Path, keep: int, rank: int) -> None:
    """Delete this process's files (and, rank 0, the markers) of every round before ``keep``."""
    root = Path(run) / CHECKPOINTS
    for folder in sorted(root.glob("round_*")):
        if _round_of(folder) >= keep:
            continue
        if rank == 0:
            (folder / MARKER).unlink(missing_ok=True)  # first: the round stops being complete
        for f in [*folder.glob(f"rank_{rank}.pt"), *folder.glob(f".rank_{rank}.pt.*")]:
            f.unlink(missing_ok=True)
        try:
            folder.rmdir()  # once every rank's file (and the marker) is gone
        except OSError:
            pass


def _round_of(folder: Path) -> int:
    try:
        return int(folder.name.removeprefix("round_"))
    except ValueError:
        return -1


def latest_complete(run: Path) -> int:
    """The newest round whose marker exists and names it; 0 if there is none."""
    rounds = []
    for marker in (Path(run) / CHECKPOINTS).glob(f"round_*/{MARKER}"):
        try:
            if json.loads(marker.read_text())["round"] == _round_of(marker.parent):
                rounds.append(_round_of(marker.parent))
        except (OSError, ValueError, KeyError):
            continue
    return max(rounds, default=0)


def restore(run: Path, clients: dict[int, Client], algorithm: Algorithm, comm: Communicator, rounds: int) -> Progress:
    """Load the newest complete checkpoint into ``clients`` and ``algorithm``; ``Progress()`` if none.

    Raises:
        ConfigError: the run already reached ``rounds``, or this process's file does not fit.
    """
    found = int(comm.total(latest_complete(run) if comm.rank == 0 else 0))  # rank 0's markers decide
    if found == 0:
        return Progress()
    if found >= rounds:
        raise ConfigError(
            f"resume={run}: the run already finished round {found}; set train.rounds > {found} to continue it"
        )
    path = rank_file(run, found, comm.rank)
    if not path.is_file():
        raise ConfigError(f"resume={run}: {path} is missing (round {found} is complete on rank 0 only)")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if payload["local_clients"] != sorted(clients):
        raise ConfigError(
            f"resume={run}: {path} holds clients {payload['local_clients']}, this process {sorted(clients)}; "
            "resume with the runtime and process count of the original run"
        )
    for i, c in clients.items():
        c.restore(payload["clients"][i])
    algorithm.load_state_dict(payload["algorithm"])
    return Progress(found, payload["history"], payload["total_bytes"], payload["train_s"], payload["wall_s"])


def check_resumable(cfg: Config) -> None:
    """Stop before any work if ``cfg`` changes an option that would make the resumed numbers differ.

    Raises:
        ConfigError: naming the first changed option and both values.
    """
    if cfg.resume is None:
        return
    schema = OmegaConf.structured(Config)
    saved = _flat(OmegaConf.to_container(OmegaConf.merge(schema, OmegaConf.load(Path(cfg.resume) / "config.yaml"))))
    now = _flat(OmegaConf.to_container(OmegaConf.structured(cfg)))
    for key in sorted(saved.keys() | now.keys()):
        if key not in RESUMABLE_CHANGES and saved.get(key) != now.get(key):
            raise ConfigError(
                f"resume={cfg.resume}: {key}={now.get(key)!r} but the run used {saved.get(key)!r}; "
                f"only {', '.join(RESUMABLE_CHANGES[:1] + RESUMABLE_CHANGES[3:])} may change on resume"
            )


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out |= _flat(v, f"{prefix}{k}.")
    return out
