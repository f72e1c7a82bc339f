"""Finding the rest of the swarm again after a network partition heals.

hivemind's DHT drops a node from its routing table at the first request it fails to answer, and never looks
for it again: a Kademlia node only learns of peers from the peers it already knows. After a partition, each
side has dropped the other, and stores and reads its records on its own side only. The link may come back,
but the two sides would stay apart until some request happened to cross it (in practice several seconds,
sometimes never).

So, on each heartbeat, while a graph neighbour has no live record, a peer pings (DHT ``ping``) the
neighbour at the addresses of its last record and the bootstrap peers (``swarm.initial_peers``), each
unless it is already in the routing table, each in its own task (a dead one does not hold up the
others). A ping that is answered puts both ends in each other's routing table, and hivemind then hands
the new node the records it should hold; the peer also stores its own record again at once. The next
reads reach both sides again. A peer that stays dead costs one failed dial per heartbeat.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, NamedTuple

from declora.comm.swarm_maddr import dialable
from declora.comm.swarm_records import Record

PING_TIMEOUT_S = 3.0


def peer_of(maddr: str) -> str | None:
    """The peer ID in a multiaddr's ``/p2p/`` part (the last one: a relayed address names the relay first)."""
    parts = maddr.split("/")
    ids = [parts[k + 1] for k, p in enumerate(parts[:-1]) if p in ("p2p", "ipfs")]
    return ids[-1] if ids else None


class Target(NamedTuple):
    """A peer to ping: where to dial it, and whether to drop the connection the daemon holds to it first."""

    maddrs: list[str]
    redial: bool


def to_ping(
    neighbours: list[int], live: dict[int, Record], seen: dict[int, Record], initial_peers: list[str]
) -> dict[str, Target]:
    """Who to ping, by peer ID: the absent neighbours at their last addresses, and the bootstrap peers.

    Empty while every neighbour has a live record (nothing to look for). An absent neighbour is redialled:
    the connection the daemon still holds to it went silent in the partition, and a new stream on it waits
    for TCP's retransmission backoff (seconds) after the link is back, where a new connection is up at once.
    A bootstrap peer's connection is kept (it may be this peer's relay, holding its reservation).
    """
    absent = [j for j in neighbours if j not in live]
    if not absent:
        return {}
    out: dict[str, Target] = {}
    for m in initial_peers:
        peer = peer_of(str(m))
        if peer is not None:
            out.setdefault(peer, Target([], redial=False)).maddrs.append(str(m))
    for j in absent:
        if j in seen and seen[j].peer not in out:
            out[seen[j].peer] = Target(list(seen[j].maddrs), redial=True)
    return out


async def ping(p2p: Any, dht: Any, peer_b58: str, target: Target) -> bool:
    """Ping ``peer_b58`` unless it is in ``dht``'s routing table (or is this peer); True if it answered."""
    from hivemind.p2p import PeerID

    peer = PeerID.from_base58(peer_b58)
    if peer_b58 == p2p.peer_id.to_base58() or dht.protocol.routing_table.get(peer_id=peer) is not None:
        return False
    if target.redial:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(p2p._client.disconnect(peer), 1.0)
    with contextlib.suppress(Exception):  # the daemon may have forgotten its addresses; the ping tells
        maddrs = [dialable(m, peer_b58) for m in target.maddrs]
        await asyncio.wait_for(p2p._client.connect(peer, maddrs), PING_TIMEOUT_S)
    return await asyncio.wait_for(dht.protocol.call_ping(peer), PING_TIMEOUT_S) is not None
