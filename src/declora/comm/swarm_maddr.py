"""Multiaddrs the swarm hands to its libp2p daemon: ones it can dial, and circuit-relay addresses.

**Dialling.** hivemind 1.1.12's multiaddr package encodes a ``/p2p/<Qm...>`` part as a CIDv1, while its Go
daemon (go-multiaddr) expects the bare multihash and refuses the whole address ("length greater than
remaining number of bytes in buffer"). Every ``connect`` given such an address failed, so a peer was
reachable only through addresses the daemon had learned by itself; a relayed peer's
``/p2p/<relay>/p2p-circuit`` address never reached the daemon. :func:`dialable` encodes what the daemon
reads.

**Relays.** A peer behind NAT (``swarm.use_auto_relay``) reserves a slot on its bootstrap peers
(``swarm.initial_peers``, which must run ``swarm.relay_service=true``) as *static* relays, at once
(:func:`p2p_class`: libp2p's relay discovery, all hivemind offers, waits for 4 candidates or 3 minutes;
the reachability is set to private, as the option says), and is reached at
``<relay>/p2p-circuit/p2p/<itself>``. libp2p announces such addresses only for relays with a public IP
address (it drops private ones), so :func:`circuit_addresses` builds them from the relays it was given:
relays on a private network (a VPN, a LAN, the tests' namespaces) work too.
"""

from __future__ import annotations

from typing import Any

from declora.comm.swarm_records import MAX_MADDRS

P2P_CODE = 0x01A5  # the multicodec of /p2p/


def p2p_class(relay_service: bool) -> Any:
    """hivemind's P2P with the daemon's relay service switched as asked (hivemind leaves it on), and with
    given relays (``trusted_relays``) used as static relays only (hivemind cannot switch discovery off)."""
    from hivemind.p2p import P2P

    class SwarmP2P(P2P):
        @staticmethod
        def _make_process_args(*args: Any, **kwargs: Any) -> list[str]:
            static = {"relayDiscovery": False} if kwargs.get("trustedRelays") else {}
            return P2P._make_process_args(*args, **kwargs, **static, relayService=relay_service)

    return SwarmP2P


def relays_of(opts: Any) -> list[str]:
    """The relays a peer reserves a slot on (``swarm.*`` options): its bootstrap peers, if behind NAT."""
    return list(opts.initial_peers) if opts.use_auto_relay and opts.use_relay else []


def nat_options(opts: Any) -> dict[str, Any]:
    """``P2P.create`` arguments for a peer behind NAT: its relays as static relays, reachability private."""
    relays = relays_of(opts)
    return {"trusted_relays": relays, "force_reachability": "private"} if relays else {}


def announced(direct: list[str], opts: Any, peer: str) -> tuple[list[str], list[str]]:
    """The addresses to announce (within ``MAX_MADDRS``): ``direct``, then ``peer``'s through each of its
    relays; and those relay addresses."""
    relayed = [m for m in circuit_addresses(relays_of(opts), peer) if m not in direct][:MAX_MADDRS]
    return direct[: MAX_MADDRS - len(relayed)] + relayed, relayed


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def dialable(maddr: str, peer: str | None = None) -> Any:
    """``maddr`` as a hivemind ``Multiaddr`` whose ``/p2p/`` parts the Go daemon can read; a trailing
    ``/p2p/<peer>`` (the peer being dialled, passed separately to the daemon) is dropped."""
    import base58
    from hivemind.utils.multiaddr import Multiaddr

    if peer is not None and maddr.endswith(f"/p2p/{peer}"):
        maddr = maddr[: -len(f"/p2p/{peer}")]
    raw = b""
    for part in Multiaddr(maddr).split():
        text = str(part)
        if text.startswith("/p2p/"):
            multihash = base58.b58decode(text[len("/p2p/") :])
            raw += _varint(P2P_CODE) + _varint(len(multihash)) + multihash
        else:
            raw += part.to_bytes()
    return Multiaddr(raw)


def circuit_addresses(relays: list[str], peer: str) -> list[str]:
    """Where ``peer`` is reached through each relay in ``relays`` (multiaddrs ending in ``/p2p/<relay>``)."""
    return [f"{r.rstrip('/')}/p2p-circuit/p2p/{peer}" for r in relays if "/p2p/" in r and "p2p-circuit" not in r]


def relayed_neighbours(peers: list[Any], known: dict[int, str], neighbours: list[int]) -> list[int]:
    """The neighbours among ``peers`` (the daemon's connections) linked through a relay (``p2p-circuit``)."""
    by_peer = {p: c for c, p in known.items() if c in neighbours}
    linked = {
        by_peer.get(info.peer_id.to_base58()) for info in peers if any("p2p-circuit" in str(a) for a in info.addrs)
    }
    return sorted(c for c in linked if c is not None)
