"""Helpers for the multi-process tests: launch N ``declora train`` ranks from one warm launcher
(``tests/comm/rank_launcher.py``), run the same config in-process, and compare metrics rows."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from declora.config import load_config
from declora.training.trainer import run

LAUNCHER = Path(__file__).parent / "comm" / "rank_launcher.py"


@dataclass
class Rank:
    rc: int | None  # None: still running when the launcher was stopped
    ended: float | None  # unix time
    log: str


def launch_ranks(
    world: int,
    args: list[str],
    tmp: Path,
    env: dict[str, str] | None = None,
    timeout: float = 150,
    exits: int | None = None,
    poke: Callable[[Path], None] | None = None,
) -> list[Rank]:
    """Run ``declora train ARGS`` as ``world`` ranks (file:// rendezvous in ``tmp``).

    Returns when ``exits`` ranks (default all) have exited or after ``timeout`` s; then kills the rest.
    ``poke(logdir)`` is called every 0.2 s meanwhile (to signal ranks: their pids are in ``rank_<r>.pid``).
    """
    logs = tmp / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    rdzv = f"comm.init_method=file://{tmp / 'rendezvous'}"
    full_env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"} | (env or {})
    proc = subprocess.Popen(
        [sys.executable, str(LAUNCHER), str(world), str(logs), *args, "runtime=distributed", rdzv],
        env=full_env,
        start_new_session=True,
    )
    deadline = time.time() + timeout
    try:
        while time.time() < deadline and proc.poll() is None:
            if len(list(logs.glob("rank_*.rc"))) >= (exits or world):
                break
            if poke is not None:
                poke(logs)
            time.sleep(0.2)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher and every rank it forked
        except ProcessLookupError:
            pass
        proc.wait()
    ranks = []
    for r in range(world):
        rc_file, log = logs / f"rank_{r}.rc", logs / f"rank_{r}.log"
        rc, ended = map(float, rc_file.read_text().split()) if rc_file.is_file() else (None, None)
        ranks.append(Rank(None if rc is None else int(rc), ended, log.read_text() if log.is_file() else ""))
    return ranks


def _drop_wall(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]


def assert_rows_close(a: list[dict], b: list[dict]) -> None:
    a, b = _drop_wall(a), _drop_wall(b)
    assert [r.keys() for r in a] == [r.keys() for r in b]
    for ra, rb in zip(a, b, strict=True):
        for k, va in ra.items():
            if isinstance(va, float):
                assert va == pytest.approx(rb[k], rel=1e-6, abs=1e-9), (ra["round"], k)
            else:
                assert va == rb[k], (ra["round"], k)


def simulate(overrides: list[str], *extra: str) -> dict:
    """The in-process run, on one thread like each rank (so even float reductions match)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run(load_config(overrides=[*overrides, *extra]))
    finally:
        torch.set_num_threads(threads)


def run_swarm(
    out: Path, clients: int, overrides: list[str], env: dict | None = None, on_start=None, timeout: float = 150
) -> tuple[int, str]:
    """Run ``declora swarm`` to its end (or ``timeout``); every peer's process group is killed afterwards."""
    full_env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"} | (env or {})
    cmd = [sys.executable, "-m", "declora", "swarm", "--clients", str(clients), "--out", str(out), *overrides]
    proc = subprocess.Popen(cmd, env=full_env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        if on_start is not None:
            on_start(out, time.monotonic() + timeout)
        stdout, _ = proc.communicate(timeout=timeout)
        return proc.returncode, stdout.decode(errors="replace")
    finally:
        for pid_file in [*out.glob("peer_*/pid")]:
            try:
                os.killpg(int(pid_file.read_text()), signal.SIGKILL)
            except (ProcessLookupError, ValueError, PermissionError):
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
