"""Checkpoint and resume: every process saves its clients atomically; a marker makes a round complete.

```
<run>/checkpoints/round_<t>/rank_<r>.pt      process r's clients (adapter tensors, optimizer state, data
                                              position), its algorithm state (and Byzantine suspects and
                                              attack memory), the metrics history so far
<run>/checkpoints/round_<t>/COMPLETE.json    written by rank 0 once every process has saved round t
```

Each file is written with :func:`~declora.rundir.files.atomic_write_bytes` (temporary file, fsync, rename),
so a crash during a save leaves at most a stray ``.tmp`` file, never a truncated ``rank_<r>.pt``. A
round without its marker is never loaded: resume continues from the newest round that has one. After
a marker is written the older rounds are deleted, so a run keeps its ``checkpoint_keep`` newest
complete checkpoints (default 1); once it finishes, :func:`cleanup` deletes them all
(``checkpoint_cleanup=true``, the default) and leaves ``CLEANED.txt``.

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
from declora.byzantine.defense import checkpoint_state, restore_state
from declora.client.client import Client
from declora.comm import Communicator
from declora.config import Config, ConfigError
from declora.errors import CheckpointError
from declora.rundir import integrity
from declora.rundir.files import atomic_write_bytes, atomic_write_text
from declora.rundir.layout import (
    CHECKPOINTS,
    CLEANED,
    CONFIG,
    MARKER,
    ROUND_GLOB,
    rank_file,
    rank_file_name,
    round_dir,
    round_of,
)

# Options that may differ between a run and its resumption: they change neither the numbers of the
# rounds already done nor those to come (train.rounds only extends the run).
# train.lr changes only the rounds to come (the restored optimizer's rates are rescaled): the way to go
# on after a divergence. "eval.*" = every eval option. Listed in the README ("Errors, exit codes and resuming").
RESUMABLE_CHANGES = (
    "train.rounds",
    "train.lr",
    "train.divergence_factor",
    "eval.*",
    "progress",
    "plots",
    "report_to",  # trackers log, they change no number
    "save_adapters",
    "checkpoint_every",
    "checkpoint_keep",
    "checkpoint_cleanup",
    "comm.timeout_s",
    "comm.startup_timeout_s",
    "comm.init_method",
    "swarm.*",  # addresses, deadlines, keys (a changed client_id is caught: the checkpoint holds another client)
)
# Options about where and how a run starts, never compared.
_NOT_COMPARED = ("resume", "out_dir", "overwrite", "resume_from_scratch")


def resumable_change(key: str) -> bool:
    """Whether option ``key`` (dotted) may differ between a run and its resumption."""
    allowed = RESUMABLE_CHANGES + _NOT_COMPARED
    return key in allowed or any(a.endswith(".*") and key.startswith(a[:-1]) for a in allowed)


@dataclass
class Progress:
    """Where the round loop stands: the last finished round and what it has accumulated."""

    round: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)  # the metrics rows written so far
    total_bytes: int = 0
    train_s: float = 0.0
    wall_s: float = 0.0


def due(cfg: Config, round_: int) -> bool:
    """Whether round ``round_`` ends with a checkpoint (every ``checkpoint_every`` rounds and the last)."""
    every = cfg.checkpoint_every
    return every > 0 and (round_ % every == 0 or round_ == cfg.train.rounds)


def save(
    run: Path, progress: Progress, clients: dict[int, Client], algorithm: Algorithm, comm: Communicator, keep: int = 1
) -> None:
    """Checkpoint round ``progress.round``: this process's file, then (rank 0) the marker, then pruning
    all but the newest ``keep`` rounds (``checkpoint_keep``)."""
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
        "lr": {i: c.train_cfg.lr for i, c in clients.items()},  # resume may change train.lr (see restore)
    }
    byzantine = checkpoint_state(algorithm)  # comm.robust / byzantine.*: suspect counts, flags, attack memory
    if byzantine is not None:
        payload["byzantine"] = byzantine
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    own = rank_file(run, progress.round, comm.rank)
    atomic_write_bytes(own, buffer.getvalue())
    digest = integrity.sha256_bytes(buffer.getvalue())
    comm.barrier()  # every process has its file for this round
    if comm.rank == 0:
        marker = {"round": progress.round, "clients": comm.num_clients}
        marker["files"] = integrity.round_files(own.parent, own.name, digest)  # verified on resume
        atomic_write_text(round_dir(run, progress.round) / MARKER, json.dumps(marker) + "\n")
    comm.barrier()  # the round is complete: older ones can go
    prune(run, oldest_kept(run, progress.round, comm.rank, keep), comm.rank)


def prune(run: Path, keep: int, rank: int) -> None:
    """Delete this process's files (and, rank 0, the markers) of every round before ``keep``."""
    root = Path(run) / CHECKPOINTS
    for folder in sorted(root.glob(ROUND_GLOB)):
        if round_of(folder) >= keep:
            continue
        if rank == 0:
            (folder / MARKER).unlink(missing_ok=True)  # first: the round stops being complete
        own = rank_file_name(rank)
        for f in [*folder.glob(own), *folder.glob(f".{own}.*")]:  # and a crashed save's temporary file
            f.unlink(missing_ok=True)
        try:
            folder.rmdir()  # once every rank's file (and the marker) is gone
        except OSError:
            pass


def restore(
    run: Path,
    clients: dict[int, Client],
    algorithm: Algorithm,
    comm: Communicator,
    rounds: int,
    from_scratch: bool = False,
) -> Progress:
    """Load the newest intact checkpoint into ``clients`` and ``algorithm``; ``Progress()`` if none.

    A newer round that is damaged or incomplete is named in one line and skipped (see
    :mod:`declora.rundir.integrity`); with checkpoints but none intact the run stops unless ``from_scratch``.

    Raises:
        ConfigError: the run already reached ``rounds``.
        CheckpointError: no intact checkpoint, or this process's file is damaged, unreadable or does not fit.
    """
    # rank 0's markers decide
    found = int(comm.total(integrity.resume_round(run, from_scratch) if comm.rank == 0 else 0))
    if found == 0:
        check_not_cleaned(run)
        return Progress()
    if found >= rounds:
        raise ConfigError(
            f"resume={run}: the run already finished round {found}; set train.rounds > {found} to continue it"
        )
    path = rank_file(run, found, comm.rank)
    if not path.is_file():
        raise CheckpointError(f"resume={run}: {path} is missing (round {found} is complete on rank 0 only)")
    if comm.rank != 0:  # rank 0 verified every file it can see when it picked the round
        integrity.verify_own(run, path.parent, path.name)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated or foreign file: name it, in one line
        detail = (str(err).splitlines() or [""])[0][:160]
        raise CheckpointError(f"resume={run}: cannot read {path} ({type(err).__name__}: {detail})") from None
    if payload["local_clients"] != sorted(clients):
        raise CheckpointError(
            f"resume={run}: {path} holds clients {payload['local_clients']}, this process {sorted(clients)}; "
            "resume with the runtime and process count of the original run"
        )
    for i, c in clients.items():
        c.restore(payload["clients"][i])
        _apply_lr(c, payload.get("lr", {}).get(i))
    algorithm.load_state_dict(payload["algorithm"])
    restore_state(algorithm, payload.get("byzantine"))  # absent from older checkpoints: start empty
    return Progress(found, payload["history"], payload["total_bytes"], payload["train_s"], payload["wall_s"])


def _apply_lr(client: Client, saved_lr: float | None) -> None:
    """Resume with a changed train.lr: scale the restored optimizer's rates (load_state_dict restores the old).

    Scaling rather than setting keeps any schedule's position; with an unchanged lr nothing is touched.
    """
    lr = client.train_cfg.lr
    if saved_lr is None or saved_lr == lr:
        return

    def scaled(value: float) -> float:
        return lr if value == saved_lr else value * lr / saved_lr

    for group in client.optimizer.param_groups:
        for key in ("lr", "initial_lr"):
            if key in group:
                group[key] = scaled(group[key])
    scheduler = getattr(client, "scheduler", None)  # an lr schedule restarts each step from its base_lrs
    if scheduler is not None and hasattr(scheduler, "base_lrs"):
        scheduler.base_lrs = [scaled(b) for b in scheduler.base_lrs]


def check_resumable(cfg: Config) -> None:
    """Stop before any work if ``cfg`` changes an option that would make the resumed numbers differ.

    Raises:
        ConfigError: one line naming every changed option with both values.
    """
    if cfg.resume is None:
        return
    if cfg.runtime == "simulation" and not cfg.resume_from_scratch:  # one process sees every file: check now
        found, skipped = integrity.newest_intact(cfg.resume)
        if skipped and not found:
            integrity.resume_round(cfg.resume)  # CheckpointError naming the file, before any model is loaded
    schema = OmegaConf.structured(Config)
    saved = _flat(OmegaConf.to_container(OmegaConf.merge(schema, OmegaConf.load(Path(cfg.resume) / CONFIG))))
    now = _flat(OmegaConf.to_container(OmegaConf.structured(cfg)))
    changed = [
        f"{key}={now.get(key)!r} but the run used {saved.get(key)!r}"
        for key in sorted(saved.keys() | now.keys())
        if not resumable_change(key) and saved.get(key) != now.get(key)
    ]
    if changed:
        raise ConfigError(
            f"resume={cfg.resume}: {'; '.join(changed)}; only {', '.join(RESUMABLE_CHANGES)} may change on resume"
        )


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out |= _flat(v, f"{prefix}{k}.")
    return out


def oldest_kept(run: Path, newest: int, rank: int, keep: int) -> int:
    """The oldest of the ``keep`` newest rounds <= ``newest`` that hold this process's file."""
    root = Path(run) / CHECKPOINTS
    rounds = sorted(
        {round_of(f) for f in root.glob(ROUND_GLOB) if round_of(f) <= newest and (f / rank_file_name(rank)).is_file()}
    )
    return rounds[-keep] if len(rounds) >= keep else (rounds[0] if rounds else newest)


def cleanup(run: Path, comm: Communicator) -> None:
    """Delete every checkpoint of a finished run (``checkpoint_cleanup=true``); rank 0 leaves a note.

    Called after ``DONE``: the adapters, metrics and summary are the run's result; the checkpoints only
    served to resume it.
    """
    comm.barrier()  # every rank is done with its files
    root = Path(run) / CHECKPOINTS
    if not root.is_dir():
        return
    prune(run, 1 << 62, comm.rank)
    comm.barrier()  # every rank's files are gone
    if comm.rank == 0:
        atomic_write_text(
            root / CLEANED,
            "This run finished and its checkpoints were deleted (checkpoint_cleanup=true).\n"
            "To extend a finished run with resume=RUN_DIR train.rounds=MORE, train it with checkpoint_cleanup=false.\n",
        )


def check_not_cleaned(run: Path) -> None:
    """Stop a resume of a finished run whose checkpoints ``cleanup`` deleted (it would silently restart).

    Raises:
        ConfigError: naming the option that keeps them.
    """
    if (Path(run) / CHECKPOINTS / CLEANED).is_file():
        raise ConfigError(
            f"resume={run}: the run finished and its checkpoints were deleted (checkpoint_cleanup=true); "
            "rerun it with checkpoint_cleanup=false to be able to extend it"
        )
