"""RunDir: creates one run folder and writes its files (names from :mod:`declora.rundir.layout`)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from declora.config import Config, to_yaml
from declora.rundir import layout
from declora.rundir.files import atomic_write_text
from declora.rundir.files import dumps as strict_json
from declora.rundir.layout import read_metrics
from declora.rundir.protect import new_folder
from declora.rundir.provenance import environment, run_environment


class RunDir:
    """Creates and fills one run directory."""

    def __init__(self, cfg: Config) -> None:
        default = Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.train.algorithm}"
        self.path = Path(cfg.out_dir) if cfg.out_dir else new_folder(default)  # never another run's folder
        self.path.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.path / layout.METRICS

    def write_config(self, cfg: Config) -> None:
        atomic_write_text(self.path / layout.CONFIG, to_yaml(cfg))
        env = environment() | run_environment(cfg.model.name_or_path) | {"seed": cfg.train.seed}
        atomic_write_text(self.path / layout.ENVIRONMENT, json.dumps(env, indent=2) + "\n")

    def start_metrics(self, rows: list[dict[str, Any]] | tuple = ()) -> None:
        """Start ``metrics.jsonl`` afresh, or with the rows of the rounds a resumed run already did."""
        atomic_write_text(self.metrics_path, "".join(strict_json(row) + "\n" for row in rows))

    def rank_dir(self, rank: int) -> Path:
        """``ranks/rank_<r>/``: one process's own metrics and summary under runtime=distributed."""
        return layout.rank_dir(self.path, rank)

    def start_rank_metrics(self, rank: int, upto_round: int = 0) -> None:
        """Start ``ranks/rank_<r>/metrics.jsonl``, keeping the rows of rounds <= ``upto_round`` (resume)."""
        path = self.rank_dir(rank) / layout.METRICS
        kept = [r for r in read_metrics(path.parent) if r["round"] <= upto_round] if path.is_file() else []
        atomic_write_text(path, "".join(strict_json(row) + "\n" for row in kept))

    def append_rank_metrics(self, rank: int, row: dict[str, Any]) -> None:
        with (self.rank_dir(rank) / layout.METRICS).open("a") as f:
            f.write(strict_json(row) + "\n")

    def write_rank_summary(self, rank: int, summary: dict[str, Any]) -> None:
        atomic_write_text(self.rank_dir(rank) / layout.SUMMARY, strict_json(summary, indent=2) + "\n")

    def append_metrics(self, row: dict[str, Any]) -> None:
        with self.metrics_path.open("a") as f:
            f.write(strict_json(row) + "\n")
            f.flush()

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_text(self.path / layout.SUMMARY, strict_json(summary, indent=2) + "\n")

    def adapter_dir(self, name: str) -> Path:
        return layout.adapter_dir(self.path, name)

    @property
    def plots_dir(self) -> Path:
        return self.path / layout.PLOTS

    def mark_done(self) -> None:
        """Write ``DONE``: the run finished (a resumed run removes it with :meth:`unmark_done` first)."""
        atomic_write_text(self.path / layout.DONE, "")

    def unmark_done(self) -> None:
        (self.path / layout.DONE).unlink(missing_ok=True)
