"""runtime=distributed: which peer a rank names when something breaks (declora.comm.dist_failures).

In-process: a real c10d store and real local processes (one that crashed, one that stopped on purpose),
no process group. The multi-process scenarios are in test_distributed.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import torch.distributed as dist

from declora.comm import dist_safety
from declora.comm.distributed import DistributedCommunicator

STOP_ON_PURPOSE = "from declora.comm import dist_safety; dist_safety.mark_stopping()"


def _exited_process(code: str = "pass") -> str:
    """Run ``code`` in a child that exits at once (reaped); its :func:`this_process` string."""
    child = subprocess.Popen([sys.executable, "-c", code])
    child.wait()
    return f"{os.uname().nodename} {child.pid}"


def _rank(rank: int, processes: dict[int, str]) -> DistributedCommunicator:
    comm = DistributedCommunicator(rank, 4, store=dist.HashStore())
    comm.round, comm.processes = 2, processes
    return comm


def test_a_peer_found_dead_on_this_machine_is_recorded_for_the_others() -> None:
    """Rank 1 learns from /proc (nobody reported anything) that rank 2 crashed; it records that, so rank 0,
    which only sees rank 1 stop, names rank 2 too and not the messenger."""
    crashed, messenger = _exited_process(), _exited_process(STOP_ON_PURPOSE)
    one = _rank(1, {0: dist_safety.this_process(), 2: crashed, 3: dist_safety.this_process()})
    err = one._collective_failed("send/receive", RuntimeError("Connection closed by peer"))
    assert err.peer == 2 and "rank 1: peer rank 2 is missing at round 2" in str(err)
    assert one.store.get("failed/2").decode().startswith("2|1|missing|")

    zero = _rank(0, {1: messenger, 2: crashed, 3: dist_safety.this_process()})
    zero.store = one.store
    err = zero._neighbour_failed(1, "exchange with neighbour", RuntimeError("Connection closed by peer"))
    assert err.peer == 2 and "rank 0: peer rank 2 is missing at round 2 (reported by rank 1" in str(err)


def test_a_neighbour_that_stopped_on_purpose_is_not_blamed_for_a_failure_nobody_reported() -> None:
    """The neighbour left its stop marker; the crashed peer is on this machine, unreported: it is named
    (after the short wait for a report), and recorded."""
    crashed, messenger = _exited_process(), _exited_process(STOP_ON_PURPOSE)
    zero = _rank(0, {1: messenger, 2: crashed, 3: dist_safety.this_process()})
    start = time.monotonic()
    err = zero._neighbour_failed(1, "exchange with neighbour", RuntimeError("Connection closed by peer"))
    assert err.peer == 2 and time.monotonic() - start < 10
    assert zero.store.check(["failed/2"]) and not zero.store.check(["failed/1"])


def test_a_neighbour_that_crashed_is_named_at_once() -> None:
    crashed = _exited_process()
    zero = _rank(0, {1: crashed, 3: dist_safety.this_process()})
    start = time.monotonic()
    err = zero._neighbour_failed(1, "exchange with neighbour", RuntimeError("Connection closed by peer"))
    assert err.peer == 1 and time.monotonic() - start < 1  # no wait: it left no marker
    assert zero.store.get("failed/1").decode().startswith("2|0|missing|")


def test_a_peer_that_marks_and_exits_between_two_looks_is_not_taken_for_dead(monkeypatch) -> None:
    """The race behind a CI failure: a SIGTERMed peer writes its marker and exits while another rank
    looks. Looking at the marker before /proc blamed it; looking at /proc first cannot."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    where = f"{os.uname().nodename} {child.pid}"
    real = dist_safety.stopped_on_purpose

    def marks_then_exits(w: str) -> bool:  # the peer stops on purpose right after this look
        seen = real(w)
        marker = dist_safety._marker(child.pid)
        os.makedirs(os.path.dirname(marker), exist_ok=True)
        open(marker, "w").close()
        child.kill()
        child.wait()
        return seen

    monkeypatch.setattr(dist_safety, "stopped_on_purpose", marks_then_exits)
    try:
        assert dist_safety.exited({1: where}) == []  # alive when looked at: not dead, whatever comes next
        monkeypatch.undo()
        if child.poll() is None:  # /proc was looked at first: the peer stops on purpose only now
            marks_then_exits(where)
        assert dist_safety.exited({1: where}) == []  # dead now, with its marker: stopped on purpose
    finally:
        child.kill()
        child.wait()
        marker = dist_safety._marker(child.pid)
        if os.path.exists(marker):
            os.remove(marker)
