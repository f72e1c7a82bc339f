"""The run directory contract, written atomically.

```
<out_dir>/config.yaml        the resolved config
<out_dir>/environment.json   versions of python/torch/transformers/peft/declora, seed, host, command
<out_dir>/metrics.jsonl      one JSON object per evaluated round
<out_dir>/summary.json       the final numbers
<out_dir>/adapters/average/  the averaged adapter (peft save_pretrained)
<out_dir>/adapters/client_<i>/
<out_dir>/plots/*.png
<out_dir>/checkpoints/round_<t>/   rank_<r>.pt + COMPLETE.json (see declora.training.checkpoint)
<out_dir>/ranks/rank_<r>/        runtime=distributed: each rank's own metrics.jsonl and summary.json
```
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from declora.config import Config, to_yaml
from declora.rundir.files import dumps as strict_json
from declora.rundir.files import file_mode
from declora.rundir.protect import new_folder


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


def environment() -> dict[str, Any]:
    """Versions and host facts recorded next to every run."""
    out: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "argv": sys.argv,
    }
    for pkg in ("declora", "torch", "transformers", "peft", "datasets", "networkx", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


class RunDir:
    """Creates and fills one run directory."""

    def __init__(self, cfg: Config) -> None:
        default = Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.train.algorithm}"
        self.path = Path(cfg.out_dir) if cfg.out_dir else new_folder(default)  # never another run's folder
        self.path.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.path / "metrics.jsonl"

    def write_config(self, cfg: Config) -> None:
        atomic_write_text(self.path / "config.yaml", to_yaml(cfg))
        from declora.rundir.provenance import run_environment

        env = environment() | run_environment(cfg.model.name_or_path) | {"seed": cfg.train.seed}
        atomic_write_text(self.path / "environment.json", json.dumps(env, indent=2) + "\n")

    def start_metrics(self, rows: list[dict[str, Any]] | tuple = ()) -> None:
        """Start ``metrics.jsonl`` afresh, or with the rows of the rounds a resumed run already did."""
        atomic_write_text(self.metrics_path, "".join(strict_json(row) + "\n" for row in rows))

    def rank_dir(self, rank: int) -> Path:
        """``ranks/rank_<r>/``: one process's own metrics and summary under runtime=distributed."""
        return self.path / "ranks" / f"rank_{rank}"

    def start_rank_metrics(self, rank: int, upto_round: int = 0) -> None:
        """Start ``ranks/rank_<r>/metrics.jsonl``, keeping the rows of rounds <= ``upto_round`` (resume)."""
        path = self.rank_dir(rank) / "metrics.jsonl"
        kept = [r for r in read_metrics(path.parent) if r["round"] <= upto_round] if path.is_file() else []
        atomic_write_text(path, "".join(strict_json(row) + "\n" for row in kept))

    def append_rank_metrics(self, rank: int, row: dict[str, Any]) -> None:
        with (self.rank_dir(rank) / "metrics.jsonl").open("a") as f:
            f.write(strict_json(row) + "\n")

    def write_rank_summary(self, rank: int, summary: dict[str, Any]) -> None:
        atomic_write_text(self.rank_dir(rank) / "summary.json", strict_json(summary, indent=2) + "\n")

    def append_metrics(self, row: dict[str, Any]) -> None:
        with self.metrics_path.open("a") as f:
            f.write(strict_json(row) + "\n")
            f.flush()

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_text(self.path / "summary.json", strict_json(summary, indent=2) + "\n")

    def adapter_dir(self, name: str) -> Path:
        return self.path / "adapters" / name


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of ``metrics.jsonl``."""
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]
