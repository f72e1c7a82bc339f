"""Addresses the swarm hands to its libp2p daemon (``declora.comm.swarm_maddr``): no daemon is started."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("hivemind")
from declora.comm.swarm_maddr import (  # noqa: E402
    announced,
    circuit_addresses,
    dialable,
    nat_options,
    p2p_class,
    relayed_neighbours,
)
from declora.comm.swarm_records import MAX_MADDRS  # noqa: E402

RELAY = "QmZKW728yvKKazgJMrvUgQEPTKrvMyDfggPmkmUKvJkLkJ"
ME = "QmbiJUogBGGocPhaVGFCNqxxQqhw83DhEBiZgJrsYDhXbc"


def _opts(auto: bool, peers: list[str]) -> SimpleNamespace:
    return SimpleNamespace(use_auto_relay=auto, use_relay=True, initial_peers=peers)


def test_p2p_parts_are_encoded_as_the_go_daemon_reads_them() -> None:
    """hivemind writes /p2p/<Qm..> as a CIDv1 (0x01 0x72 before the multihash), which go-multiaddr refuses;
    dialable writes the bare multihash (length 0x22 = 34 bytes: 0x12 0x20 + 32) and drops the dialled peer."""
    import base58
    from hivemind.utils.multiaddr import Multiaddr

    text = f"/ip4/10.0.0.1/tcp/31337/p2p/{RELAY}/p2p-circuit/p2p/{ME}"
    multihash = base58.b58decode(RELAY)
    assert bytes.fromhex("a503240172") + multihash in Multiaddr(text).to_bytes()  # what the daemon refused
    ours = dialable(text, ME)
    assert ours.to_bytes().endswith(bytes.fromhex("a50322") + multihash + bytes.fromhex("a202"))  # ../p2p-circuit
    assert str(ours) == f"/ip4/10.0.0.1/tcp/31337/p2p/{RELAY}/p2p-circuit"
    assert str(dialable("/ip4/10.0.0.2/tcp/5", ME)) == "/ip4/10.0.0.2/tcp/5"


def test_a_peer_behind_nat_uses_its_bootstrap_peers_as_static_relays() -> None:
    relay = f"/ip4/10.0.0.1/tcp/31337/p2p/{RELAY}"
    assert nat_options(_opts(False, [relay])) == {}
    assert nat_options(_opts(True, [relay])) == {"trusted_relays": [relay], "force_reachability": "private"}
    args = p2p_class(False)._make_process_args("p2pd", relay=True, trustedRelays=relay)
    assert "-relayDiscovery=0" in args and "-relayService=0" in args  # static relays: reserved at once
    assert not any(a.startswith("-relayDiscovery") for a in p2p_class(True)._make_process_args("p2pd"))


def test_relay_addresses_are_announced_within_the_cap() -> None:
    relay = f"/ip4/10.0.0.1/tcp/31337/p2p/{RELAY}"
    assert circuit_addresses([relay, "/ip4/10.0.0.9/tcp/1"], ME) == [f"{relay}/p2p-circuit/p2p/{ME}"]
    direct = [f"/ip4/192.168.0.{k}/tcp/1/p2p/{ME}" for k in range(MAX_MADDRS + 3)]
    maddrs, relayed = announced(direct, _opts(True, [relay]), ME)
    assert len(maddrs) == MAX_MADDRS and maddrs[-1] == f"{relay}/p2p-circuit/p2p/{ME}" == relayed[0]
    assert announced(direct[:2], _opts(False, [relay]), ME) == (direct[:2], [])


def test_neighbours_linked_through_a_relay_are_found() -> None:
    from hivemind.p2p import PeerID

    def info(peer: str, addr: str) -> SimpleNamespace:
        return SimpleNamespace(peer_id=PeerID.from_base58(peer), addrs=[addr])

    circuit = f"/ip4/10.0.0.1/tcp/31337/p2p/{RELAY}/p2p-circuit"
    peers = [info(RELAY, "/ip4/10.0.0.1/tcp/31337"), info(ME, circuit)]
    assert relayed_neighbours(peers, {0: RELAY, 3: ME}, [0, 3]) == [3]
    assert relayed_neighbours(peers, {0: RELAY, 3: ME}, [0]) == []  # not a neighbour
    assert relayed_neighbours(peers[:1], {0: RELAY, 3: ME}, [0, 3]) == []  # a direct link
