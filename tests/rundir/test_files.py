"""Run files people can share: the umask's permission bits and strict JSON (declora.rundir.files;
from test_trust.py, issue 13)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from conftest import train_run

from declora.config import load_config
from declora.rundir.writer import RunDir

pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest


def test_run_files_honour_the_umask(tiny_overrides: list[str], tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        train_run(tiny_overrides, "train.rounds=1", "checkpoint_cleanup=false")
    finally:
        os.umask(old)
    out = tmp_path / "run"
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {"config.yaml", "metrics.jsonl", "summary.json", "DONE", "rank_0.pt", "COMPLETE.json"} <= {
        p.name for p in files
    }
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, p


def test_metrics_and_summary_are_strict_json(tmp_path: Path) -> None:
    import numpy as np

    rd = RunDir(load_config(overrides=[f"out_dir={tmp_path}"]))
    rd.start_metrics([{"round": 1, "train_loss": float("nan")}])
    rd.append_metrics({"round": 2, "train_loss": float("inf"), "accuracy": np.float64(0.5), "x": [float("-inf")]})
    rd.write_summary({"best": float("nan"), "counts": [[1, 2]]})

    def strict(text: str) -> Any:
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))

    rows = [strict(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"round": 1, "train_loss": None}, {"round": 2, "train_loss": None, "accuracy": 0.5, "x": [None]}]
    assert strict((tmp_path / "summary.json").read_text()) == {"best": None, "counts": [[1, 2]]}
