"""The run-directory contract: the name of every file and folder a run writes, defined once.

```
<run>/config.yaml                 the resolved config                                    CONFIG
<run>/environment.json            versions, host, code, seed, command                    ENVIRONMENT
<run>/metrics.jsonl               one JSON object per evaluated round                    METRICS
<run>/summary.json                the final numbers                                      SUMMARY
<run>/DONE                        the run finished                                       DONE
<run>/adapters/<name>/            average, best, client_<i> (peft folders + declora.json) ADAPTERS
<run>/plots/*.png                 accuracy, consensus, churn, partition                  PLOTS
<run>/checkpoints/round_<t>/      rank_<r>.pt + COMPLETE.json; CLEANED.txt once deleted  CHECKPOINTS
<run>/ranks/rank_<r>/             runtime=distributed: each rank's metrics and summary   RANKS
<run>/swarm/                      runtime=swarm: live.jsonl, address.txt, state.pt       SWARM
<base>/peer_<i>/                  `declora swarm`: one run folder per local peer
```

Pure names and paths (nothing here imports the rest of declora), so every layer, even the config's
"is this folder a run" rule through :mod:`declora.rundir.protect`, can use them without an import
cycle. The names are those of every run made so far: changing one would stop old runs from resuming
and loading. :class:`~declora.rundir.writer.RunDir` writes the folder; :func:`read_metrics` reads it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# --- top-level files and folders of a run ---
CONFIG = "config.yaml"
ENVIRONMENT = "environment.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
DONE = "DONE"
ADAPTERS = "adapters"
PLOTS = "plots"
CHECKPOINTS = "checkpoints"
RANKS = "ranks"
SWARM = "swarm"

# Any of these means a folder holds (part of) a run; clear_run (overwrite=true) deletes only these names.
RUN_MARKERS = (CONFIG, METRICS, DONE, CHECKPOINTS)
RUN_FILES = (CONFIG, ENVIRONMENT, METRICS, SUMMARY, DONE)
RUN_FOLDERS = (ADAPTERS, PLOTS, CHECKPOINTS, RANKS)

# --- checkpoints/ ---
MARKER = "COMPLETE.json"  # a round is complete (and its files' sha256) once rank 0 wrote it
CLEANED = "CLEANED.txt"  # left by checkpoint cleanup: resume then says why there is nothing to load
ROUND_PREFIX = "round_"
ROUND_GLOB = ROUND_PREFIX + "*"
RANK_FILE_GLOB = "rank_*.pt"

# --- adapters/<name>/ ---
AVERAGE = "average"  # the mean over clients after the last round
BEST = "best"  # the round chosen on the validation split
ADAPTER_METADATA = "declora.json"  # labels, base model, settings, accuracy
MODEL_CARD = "README.md"
PEFT_CONFIG = "adapter_config.json"  # written by peft's save_pretrained
PEFT_WEIGHTS = "adapter_model.safetensors"  # written by peft's save_pretrained
HEAD_WEIGHTS = "head.safetensors"  # peft.method=head_only: no peft wrapper

# --- plots/ ---
ACCURACY_PLOT = "accuracy.png"
CONSENSUS_PLOT = "consensus.png"
CHURN_PLOT = "churn.png"
PARTITION_PLOT = "partition.png"

# --- swarm/ (runtime=swarm) and a local swarm's base folder ---
SWARM_LIVE = "live.jsonl"  # per round, whom this peer exchanged with
SWARM_ADDRESS = "address.txt"  # its peer ID and multiaddrs
SWARM_STATE = "state.pt"  # its final adapter
SWARM_IDENTITY = "identity.key"  # the key fixing its peer ID
SWARM_ALLOWLIST = "allowlist.txt"  # <base>/: the peer IDs a local swarm admits
PEER_PREFIX = "peer_"
PEER_LOG = "peer.log"  # <base>/peer_<i>/: the forked peer's stdout and stderr
PEER_PID = "pid"  # <base>/peer_<i>/: its process id


def client_adapter(i: int) -> str:
    """``client_<i>``: the name of client i's adapter folder."""
    return f"client_{i}"


def adapter_dir(run: str | Path, name: str) -> Path:
    """``<run>/adapters/<name>``."""
    return Path(run) / ADAPTERS / name


def rank_dir(run: str | Path, rank: int) -> Path:
    """``<run>/ranks/rank_<r>/``: one process's own metrics and summary under runtime=distributed."""
    return Path(run) / RANKS / f"rank_{rank}"


def round_dir(run: str | Path, round_: int) -> Path:
    """``<run>/checkpoints/round_<t>`` (t zero-padded to 6 digits, so folders sort by round)."""
    return Path(run) / CHECKPOINTS / f"{ROUND_PREFIX}{round_:06d}"


def rank_file_name(rank: int) -> str:
    """``rank_<r>.pt``: process r's file in a round's checkpoint folder."""
    return f"rank_{rank}.pt"


def rank_file(run: str | Path, round_: int, rank: int) -> Path:
    return round_dir(run, round_) / rank_file_name(rank)


def round_of(folder: Path) -> int:
    """The round a ``round_<t>`` folder holds; -1 for any other name."""
    try:
        return int(folder.name.removeprefix(ROUND_PREFIX))
    except ValueError:
        return -1


def swarm_dir(run: str | Path) -> Path:
    """``<run>/swarm/``: what a swarm peer publishes for ``declora swarm`` to assemble."""
    return Path(run) / SWARM


def peer_dir(base: str | Path, i: int) -> Path:
    """``<base>/peer_<i>``: local peer i's run folder under ``declora swarm``."""
    return Path(base) / f"{PEER_PREFIX}{i}"


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of ``metrics.jsonl``."""
    lines = (Path(run_dir) / METRICS).read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]
