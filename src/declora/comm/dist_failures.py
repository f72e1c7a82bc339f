"""How a torch.distributed rank names the peer that failed, and what it says when torchrun stops it.

The detecting rank records a failure in the rendezvous store (``failed/<peer>`` = ``round|reporter|kind|
detail``), so a rank that only sees a broken collective, or a neighbour that stopped because of it, names
the failed peer rather than the messenger; failing that, a peer on this machine whose process exited is
named. :class:`FailureReports` is mixed into :class:`~declora.comm.distributed.DistributedCommunicator`.
"""

from __future__ import annotations

import time
from typing import Any

from declora.comm import dist_safety
from declora.comm.dist_safety import BadMessage, PeerFailure
from declora.errors import PeerError


class FailureReports:
    """Failure records in the rendezvous store; needs ``store``, ``rank``, ``round``, ``num_clients`` and
    ``processes`` (the local peers' pids) from the communicator it is mixed into."""

    store: Any
    rank: int
    round: int
    num_clients: int
    processes: Any

    def sigterm_line(self) -> str:
        """What this rank says when the launcher SIGTERMs it (torchrun does as soon as any rank exits)."""
        self._sigterm_dead = dist_safety.exited(self.processes)  # one snapshot for the line and the code
        return dist_safety.sigterm_line(self.rank, self.round, self.processes, self._sigterm_dead)

    def sigterm_code(self) -> int:
        """1 when the line names an exited peer, else 128 + SIGTERM (the same snapshot as the line)."""
        dead = getattr(self, "_sigterm_dead", None)
        dead = dist_safety.exited(self.processes) if dead is None else dead
        return PeerError.exit_code if dead else dist_safety.SIGTERM_EXIT

    # -- failure handling ------------------------------------------------------------------------------
    def _report(self, peer: int, kind: str = "missing", detail: str = "") -> None:
        """Record in the rendezvous store that ``peer`` failed (best effort: the store may be gone too).

        ``kind`` is ``missing`` or ``bad`` (it sent a bad message); the value is ``round|reporter|kind|detail``.
        """
        try:
            if self.store is not None:
                self.store.set(f"failed/{peer}", f"{self.round}|{self.rank}|{kind}|{detail[:200]}")
        except Exception:  # noqa: BLE001 - the store lives with rank 0 or the agent; it may be dead as well
            pass

    def _report_about(self, exclude: int | None = None) -> PeerError | None:
        """The failure some rank recorded about a peer other than ``exclude``, as an error (None: none).

        A bad message outranks a missing peer (the ranks that stop because of it look missing to theirs).
        """
        found: list[tuple[bool, int, int, str, str, str]] = []
        try:
            for peer in range(self.num_clients):
                if peer == exclude or self.store is None or not self.store.check([f"failed/{peer}"]):
                    continue
                round_, reporter, kind, detail = self.store.get(f"failed/{peer}").decode().split("|", 3)
                found.append((kind != "bad", peer, int(round_), reporter, kind, detail))
        except Exception:  # noqa: BLE001 - best effort: the store may be gone
            pass
        for _, peer, round_, reporter, kind, detail in sorted(found):
            if kind == "bad" and peer == self.rank:
                return PeerError(
                    f"rank {self.rank}: rank {reporter} rejected this rank's message at round {round_} ({detail}); "
                    "stopping"
                )
            if kind == "bad":
                return BadMessage(peer, round_, self.rank, detail, reporter=int(reporter))
            if peer != self.rank:
                return PeerFailure(peer, round_, self.rank, f"reported by rank {reporter}", detail)
        return None

    def _neighbour_failed(self, peer: int, what: str, err: Exception) -> PeerError:
        """Neighbour ``peer`` broke an exchange: name it, unless it stopped because another peer failed.

        A neighbour that stopped on a failure it detected recorded that failure before exiting, so its
        record is usually in the store by the time this rank sees the broken connection. A neighbour on
        this machine that left a stop marker (it noticed a failure, or was SIGTERMed because of one) is the
        messenger, not the failure: then this rank waits briefly for the record, or for a local peer that
        exited without a marker, before it names anyone.
        """
        dist_safety.mark_stopping()
        reported = self._report_about(exclude=peer)
        if reported is None and dist_safety.stopped_on_purpose(self.processes.get(peer, "")):
            self._reported_peer(exclude=peer)  # records a local peer that exited, when nobody reported one
            reported = self._report_about(exclude=peer)
        if reported is not None:
            return reported
        self._report(peer, "missing", " ".join(str(err).split())[:160])
        return PeerFailure(peer, self.round, self.rank, what, str(err))

    def _reported_peer(self, wait_s: float = 3.0, exclude: int | None = None) -> int | None:
        """A peer some rank reported as failed; polls briefly since the report may still be on its way.

        Failing that, a peer on this machine whose process exited without a stop marker: it is recorded in
        the store, so that ranks which only see this rank stop name the same peer.
        """
        deadline = time.monotonic() + wait_s
        try:
            while self.store is not None:
                for peer in range(self.num_clients):
                    if peer not in (self.rank, exclude) and self.store.check([f"failed/{peer}"]):
                        return peer
                if time.monotonic() > deadline:
                    break
                time.sleep(0.1)
        except Exception:  # noqa: BLE001
            pass
        dead = [r for r in dist_safety.exited(self.processes) if r != exclude]
        if dead:
            self._report(dead[0], "missing", "its process exited")
        return dead[0] if dead else None

    def _collective_failed(self, what: str, err: Exception) -> PeerError:
        dist_safety.mark_stopping()
        peer = self._reported_peer()
        reported = self._report_about() if peer is not None else None
        return reported or PeerFailure(peer, self.round, self.rank, what, str(err))
