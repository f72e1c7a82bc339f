"""Finding the swarm again after a partition (:mod:`declora.comm.swarm_rejoin`), and records that stay live
until they expire. The netns scenario (tests/comm/test_swarm_netns.py) cuts and heals a real link; these
check the pieces: whom a peer pings, and that two DHT nodes which forgot each other meet again."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from declora.comm.swarm_records import Record
from declora.comm.swarm_rejoin import Target, peer_of, to_ping

A, B, R = "QmAaaa", "QmBbbb", "QmRelay"


def _rec(client: int, peer: str, *maddrs: str) -> Record:
    return Record(client, peer, 1, tuple(maddrs))


def test_peer_of_reads_the_last_p2p_part() -> None:
    assert peer_of(f"/ip4/10.0.0.1/tcp/1/p2p/{A}") == A
    assert peer_of(f"/ip4/10.0.0.1/tcp/1/p2p/{R}/p2p-circuit/p2p/{B}") == B  # relayed: the peer, not the relay
    assert peer_of("/ip4/10.0.0.1/tcp/1") is None


def test_nobody_is_pinged_while_every_neighbour_is_live() -> None:
    live = {1: _rec(1, A, "/ip4/10.0.0.2/tcp/1"), 2: _rec(2, B, "/ip4/10.0.0.3/tcp/1")}
    assert to_ping([1, 2], live, live, [f"/ip4/10.0.0.9/tcp/1/p2p/{R}"]) == {}


def test_absent_neighbours_are_redialled_and_the_bootstrap_peers_pinged() -> None:
    seen = {1: _rec(1, A, "/ip4/10.0.0.2/tcp/1"), 2: _rec(2, B, "/ip4/10.0.0.3/tcp/1"), 5: _rec(5, "QmFar")}
    boot = f"/ip4/10.0.0.9/tcp/1/p2p/{R}"
    got = to_ping([1, 2, 3], {2: seen[2]}, seen, [boot])  # 1 absent (seen before), 3 never seen, 5 no neighbour
    assert got == {R: Target([boot], redial=False), A: Target(["/ip4/10.0.0.2/tcp/1"], redial=True)}


def test_an_absent_neighbour_that_is_also_the_bootstrap_peer_keeps_its_connection() -> None:
    """It may be this peer's relay: dropping the connection would drop the relay reservation."""
    boot = f"/ip4/10.0.0.9/tcp/1/p2p/{A}"
    got = to_ping([1], {}, {1: _rec(1, A, "/ip4/10.0.0.2/tcp/1")}, [boot])
    assert got == {A: Target([boot], redial=False)}


def test_two_nodes_that_forgot_each_other_meet_again(tmp_path: Path) -> None:
    """A and B drop each other from their DHT routing tables (as at a partition): each stores and reads its
    records alone (nothing else would make them talk again). Once B's record has expired at A, A pings B at
    its last addresses; both tables hold the other again and each reads the other's record again."""
    pytest.importorskip("hivemind")
    sys.path.insert(0, str(Path(__file__).parent))
    from test_swarm_security import Swarm

    swarm = Swarm(tmp_path)
    try:
        a = swarm.start("A", 0, [1], record_ttl_s=3.0)
        b = swarm.start("B", 1, [0], record_ttl_s=3.0)
        a.set_finished(0), b.set_finished(0)
        assert 1 in a.records() and 0 in b.records()

        async def forget(node, other) -> None:
            table = node.dht.protocol.routing_table
            del table[table.get(peer_id=other.p2p.peer_id)]
            node.dht.protocol.storage.clear()  # the other's record, replicated here, goes too

        a.call(forget(a, b), timeout=5), b.call(forget(b, a), timeout=5)
        met = lambda x, y: x.dht.protocol.routing_table.get(peer_id=y.p2p.peer_id) is not None  # noqa: E731
        assert not met(a, b) and not met(b, a)
        deadline = time.monotonic() + 20  # B's record expires at A (3 s), A's next beat pings B
        while not (met(a, b) and met(b, a) and 1 in a.records() and 0 in b.records()):
            assert time.monotonic() < deadline, (met(a, b), met(b, a), a.records(), b.records(), swarm.logs)
            time.sleep(0.2)
    finally:
        swarm.close()
