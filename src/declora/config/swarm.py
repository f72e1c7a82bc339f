"""``swarm.*``: the serverless swarm runtime (hivemind): addresses, allowlist, deadlines, relays."""

from __future__ import annotations

from dataclasses import dataclass

from declora.config.fields import _f, _int_at_least, _positive
from declora.errors import ConfigError


@dataclass
class SwarmConfig:
    client_id: int = _f(0, "runtime=swarm: this peer's client id (its node in the graph and its data share), 0..N-1.")
    initial_peers: list[str] = _f(
        [], "runtime=swarm: multiaddrs of any live peers to join through ([] = this peer starts the swarm)."
    )
    host: str = _f("127.0.0.1", "runtime=swarm: interface to listen on (0.0.0.0 = all, for other machines).")
    port: int = _f(0, "runtime=swarm: TCP port to listen on; 0 = any free port (open a fixed one in the firewall).")
    announce_maddrs: list[str] = _f(
        [], "runtime=swarm: public multiaddrs to announce (behind NAT with a forwarded port); [] = what libp2p sees."
    )
    use_relay: bool = _f(True, "runtime=swarm: allow reaching peers behind NAT through libp2p circuit relays.")
    relay_service: bool = _f(
        False, "runtime=swarm: serve as a circuit relay for peers behind NAT (off: no stranger relays through it)."
    )
    use_auto_relay: bool = _f(False, "runtime=swarm: behind NAT yourself: find a relay to become reachable.")
    identity_path: str | None = _f(
        None, "runtime=swarm: key file fixing this peer's ID (created if missing); null = <out_dir>/swarm/identity.key"
    )
    allowlist_file: str | None = _f(
        None, "runtime=swarm: allowed peer IDs, one 'PEER_ID [CLIENT_ID]' per line; null = anyone may join (testing)."
    )
    open: bool = _f(
        False,
        "runtime=swarm: allow listening on a non-loopback swarm.host without swarm.allowlist_file (anyone who "
        "reaches the port may then join as any client).",
    )
    straggler_wait_s: float = _f(
        10.0,
        "runtime=swarm: a neighbour that missed 3 of its last 4 rounds is waited for at most this long per round "
        "(instead of round_timeout_s) until it exchanges in time again.",
    )
    round_timeout_s: float = _f(
        120.0, "runtime=swarm: per-round deadline after the local steps; neighbours not exchanged by then are skipped."
    )
    startup_timeout_s: float = _f(
        600.0, "runtime=swarm: seconds a peer waits at start for its graph neighbours before training without them."
    )
    neighbour_wait_s: float = _f(
        30.0,
        "runtime=swarm: once a peer has found one graph neighbour at start, seconds it still waits for neighbours "
        "not yet in the swarm before round 1 (ones still loading are waited for up to startup_timeout_s); "
        "later ones join as newcomers. 0 = no wait.",
    )
    record_ttl_s: float = _f(
        20.0, "runtime=swarm: lifetime of a peer's DHT record (refreshed every third): how fast a dead peer vanishes."
    )
    name: str = _f("declora", "runtime=swarm: the swarm's name (DHT key prefix): peers of one run share it.")

    def __post_init__(self) -> None:
        _int_at_least("swarm.client_id", self.client_id, 0)
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"swarm.port={self.port} must be in 0..65535 (0 = any free port)")
        for name in ("round_timeout_s", "startup_timeout_s", "record_ttl_s", "straggler_wait_s"):
            _positive(f"swarm.{name}", getattr(self, name))
        _positive("swarm.neighbour_wait_s", self.neighbour_wait_s, allow_zero=True)
        loopback = self.host == "localhost" or self.host.startswith("127.") or self.host == "::1"
        if not loopback and self.allowlist_file is None and not self.open:
            raise ConfigError(
                f"swarm.host={self.host} listens beyond this machine without swarm.allowlist_file: anyone who "
                "reaches the port could join as any client; set swarm.allowlist_file=FILE (peer IDs from "
                "`declora peer --print-id`), or swarm.open=true to accept that"
            )
        if not self.name or any(c.isspace() for c in self.name):
            raise ConfigError(f"swarm.name={self.name!r} must be a non-empty word")
        _check_multiaddrs("swarm.initial_peers", self.initial_peers, "/ip4/192.0.2.1/tcp/4001/p2p/PEER_ID")
        _check_multiaddrs("swarm.announce_maddrs", self.announce_maddrs, "/ip4/203.0.113.7/tcp/4001")


def _check_multiaddrs(option: str, addresses: list[str], example: str) -> None:
    """Each address must parse as a libp2p multiaddr (hivemind's parser), before any daemon starts.

    Without hivemind (the ``swarm`` extra) nothing is checked here: runtime=swarm then stops on its own
    missing-package line.
    """
    if not addresses:
        return
    try:
        from hivemind.utils.multiaddr import Multiaddr
    except ImportError:
        return
    for address in addresses:
        try:
            Multiaddr(str(address))
        except Exception as err:  # noqa: BLE001 - the parser raises ParseError/ValueError/TypeError by case
            detail = " ".join(str(err).split())
            raise ConfigError(f"{option}: {address!r} is not a multiaddr ({detail}); e.g. {example}") from None
