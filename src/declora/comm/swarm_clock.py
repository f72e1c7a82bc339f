"""The swarm's clock: DHT record expiries in the swarm's time, so a peer whose clock is off still takes part.

Round agreement uses only local monotonic deadlines; the one thing in the swarm that needs wall clocks to
agree is the DHT: hivemind stamps and checks every record expiry with ``get_dht_time`` (``time.time``),
refuses to bootstrap from a peer more than 3 s off (``MAX_DHT_TIME_DISCREPANCY_SECONDS``), and declora's
validator caps an expiry at ``record_ttl_s + CLOCK_TOLERANCE_S`` from now.

So a joining peer, once its daemon is up and before its DHT node starts, asks its bootstrap peers for their
time (the ``clock`` request of :mod:`declora.comm.swarm_protocol`, NTP-style: of a few requests, the one
with the shortest round trip; offset = their time - the midpoint of the request), and from then on every
expiry this process writes or checks uses :func:`now` = this machine's clock at that moment + that offset
+ the monotonic time since. Peers answer with :func:`now` themselves, so the whole swarm keeps the first
peer's time whichever peer one joins through; and a wall clock stepped after joining (by hand, by NTP
correcting a bad start) changes nothing: before, a 30 s step cut the peer off (its records looked forged,
everyone else's expired).

How it is hooked: declora runs hivemind's ``DHTNode`` in this process (not hivemind's ``DHT``, which would
fork a child), and hivemind modules import ``get_dht_time`` by name (``from hivemind.utils import
get_dht_time``), so :func:`set_offset` re-points that name in every loaded hivemind module. Offsets of 1 s
or more are reported in one line; an offset that cannot be measured (the bootstrap peer is no declora peer
of this run, or refuses) leaves the clock as it is, and a clock too far off is then named by
:func:`check_clocks` (the same ``clock`` request, asked of the peers one is connected to) or the start-up error.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from declora.comm.swarm_wire import REFUSED

SAY_FROM_S = 1.0  # offsets at least this large are reported
CLOCK_TOLERANCE_S = 10.0  # how far ahead of this machine's clock a record's expiry may be (beyond its TTL)
SAMPLES = 4  # clock requests per bootstrap peer
_offset = 0.0
_anchor: tuple[float, float] | None = None  # (wall, monotonic) when the offset was set: the swarm's time runs
# on the monotonic clock from there, so a wall clock stepped later (by hand, by NTP) does not move it


def now() -> float:
    """The swarm's time: this machine's wall clock when the offset was set, corrected by the offset, plus
    the monotonic time since (immune to the wall clock's later steps; NTP's rate corrections still apply)."""
    global _anchor
    if _anchor is None:
        _anchor = (time.time(), time.monotonic())
    return _anchor[0] + (time.monotonic() - _anchor[1]) + _offset


def offset() -> float:
    return _offset


def set_offset(seconds: float) -> None:
    """Use ``seconds`` as this machine's offset for every DHT expiry from now on (see the module docstring)."""
    global _offset, _anchor
    import hivemind.dht.node  # noqa: F401 - every module that imports get_dht_time by name is loaded
    import hivemind.utils.auth  # noqa: F401

    _offset, _anchor = float(seconds), (time.time(), time.monotonic())
    for name, module in list(sys.modules.items()):
        if name.split(".")[0] == "hivemind" and callable(getattr(module, "get_dht_time", None)):
            module.get_dht_time = now


async def sample(node: Any, rec: Any, clock: Callable[[], float], samples: int = SAMPLES) -> tuple[float, float]:
    """(offset, round trip) in seconds against ``rec``'s peer: of ``samples`` ``clock`` requests, the one with
    the shortest round trip; offset = its time - the midpoint of the request on ``clock``."""
    best: tuple[float, float] | None = None
    for _ in range(samples):
        t0 = clock()
        resp, _ = await asyncio.wait_for(node._rpc(rec, node._header(0, "clock", rec.client)), 5.0)
        t1 = clock()
        if REFUSED in resp:
            raise PermissionError(str(resp[REFUSED])[:200])
        got = (float(resp["time"]) - (t0 + t1) / 2, t1 - t0)
        if best is None or got[1] < best[1]:
            best = got
    assert best is not None
    return best


async def measure(node: Any, maddr: str) -> tuple[float, float]:
    """(offset, round trip) of this machine's own clock against the peer at ``maddr`` (ending ``/p2p/<ID>``)."""
    rec = SimpleNamespace(client=-1, peer=maddr.rsplit("/p2p/", 1)[1], maddrs=(maddr,))  # what _rpc reads
    return await sample(node, rec, time.time)


def check_clocks(node: Any) -> bool:
    """Ask the peers ``node`` is connected to for their time; one line per peer whose clock is off from
    ``node.clock`` by more than the DHT tolerates (its records would look expired or forged). True once a
    peer answered."""
    try:
        peers = node.call(node.p2p.list_peers(), timeout=10)
    except Exception:  # noqa: BLE001 - a diagnosis only
        return False
    answered = False
    for info in peers[:8]:
        rec = SimpleNamespace(client=-1, peer=info.peer_id.to_base58(), maddrs=tuple(str(m) for m in info.addrs))
        try:
            seconds, _ = node.call(sample(node, rec, node.clock, samples=1), timeout=10.0)
        except Exception:  # noqa: BLE001 - not a declora peer, or not allowed: no diagnosis from it
            continue
        answered = True
        if abs(seconds) > CLOCK_TOLERANCE_S:
            node.once(
                f"this machine's clock is {abs(seconds):.0f} s {'behind' if seconds > 0 else 'ahead of'} peer "
                f"{rec.peer}'s; the swarm's DHT tolerates {CLOCK_TOLERANCE_S:g} s: sync both clocks (NTP)"
            )
    return answered


async def sync_clock(node: Any, initial_peers: list[str] | None) -> None:
    """Measure this machine's offset against the first bootstrap peer that answers, and use it (no bootstrap
    peers: this peer starts the swarm, and its clock is the swarm's)."""
    for maddr in [m for m in initial_peers or [] if "/p2p/" in m]:
        try:
            seconds, rtt = await measure(node, maddr)
        except Exception:  # noqa: BLE001 - not a declora peer of this run, or not up: try the next one
            continue
        set_offset(seconds)
        if abs(seconds) >= SAY_FROM_S:
            node.say(
                f"this machine's clock is {abs(seconds):.1f} s {'behind' if seconds > 0 else 'ahead of'} the swarm's "
                f"(peer {maddr.rsplit('/p2p/', 1)[1]}, measured to {rtt / 2:.3f} s): corrected its clock by "
                f"{seconds:+.1f} s for the swarm's DHT; syncing it with NTP is still advised"
            )
        return
    set_offset(0.0)
