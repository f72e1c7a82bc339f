"""The swarm's network node on hivemind: its daemon, its DHT records, and the thread that runs them.

One :class:`SwarmNode` per peer process. It runs hivemind's ``P2P`` (a libp2p daemon with this peer's
persistent identity key) and a ``DHTNode`` on one asyncio loop in a background thread; the training
thread calls :meth:`SwarmNode.exchange` and friends, which block until their coroutine is done. The
exchange protocol itself is :mod:`declora.comm.swarm_protocol`; the framing of its requests is
:mod:`declora.comm.swarm_wire`.

**Discovery.** Every peer stores one signed record under ``<swarm.name>.peers`` (its subkey is its owner
key): ``{client, peer, round: <last finished round, -1 while loading>, maddrs, fp, keys, t}``, refreshed
every ``record_ttl_s / 3`` s and expiring after ``record_ttl_s``: a dead peer's record disappears by
itself. :mod:`declora.comm.swarm_records` says what a record must satisfy to be stored or read at all
(signed by the owner of its peer ID, schema, bounded expiry, on the allowlist). A record whose run
fingerprint (``fp``, :mod:`declora.comm.swarm_fingerprint`) differs from this peer's is set aside: that
peer runs another experiment, and both sides name the config keys that differ, once.

**Start-up.** The daemon is retried with backoff (1, 2, 4 ... 30 s, up to ``startup_timeout_s``) while the
bootstrap peers cannot be reached, with one line per try. The relay *service* (relaying strangers'
traffic) is off unless ``swarm.relay_service=true``; using relays (``use_relay``) is not. Behind NAT
(``use_auto_relay``) the bootstrap peers are the relays: see :mod:`declora.comm.swarm_maddr`.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from declora.comm.swarm_clock import now, sync_clock
from declora.comm.swarm_fingerprint import Fingerprint, describe
from declora.comm.swarm_maddr import announced, nat_options, relayed_neighbours
from declora.comm.swarm_maddr import p2p_class as _p2p_class
from declora.comm.swarm_protocol import HANDLER, ExchangeProtocol
from declora.comm.swarm_records import (
    Allowlist,
    Record,
    make_validator,
    parse_value,
    peer_id_of,
    record_subkey,
    signature_validator,
    signing_key,
)
from declora.comm.swarm_rejoin import Target, ping, to_ping
from declora.errors import PeerError

__all__ = ["Allowlist", "Record", "SwarmNode", "peer_id_of", "say_to_stderr"]
MAX_LOGGED = 200  # distinct rejection lines logged per peer process (a flood of forgeries is not a log flood)


class SwarmNode(ExchangeProtocol):
    """This peer's P2P daemon, DHT node and exchange protocol (see the module docstring).

    Args:
        client: this peer's client id.
        neighbours: its graph neighbours.
        opts: the ``swarm.*`` options (any object with those attributes).
        identity_path: its identity key file (created if missing).
        allowlist: the allowed peers, or None (anyone).
        say: where one-line notices go.
        run: the run's config fingerprint (None: an empty one, for tests of the network alone).
        clients, rounds: bounds of the client ids and rounds a record or a request may name.
    """

    def __init__(
        self,
        client: int,
        neighbours: list[int],
        opts: Any,
        identity_path: Path,
        allowlist: Allowlist | None,
        say: Callable[[str], None],
        run: Fingerprint | None = None,
        clients: int = 1 << 20,
        rounds: int = 1 << 30,
    ) -> None:
        self.client, self.neighbours, self.opts = client, sorted(neighbours), opts
        self.identity_path, self.allowlist, self.say = Path(identity_path).expanduser(), allowlist, say
        self.run = run or Fingerprint("", {})
        self.clients, self.rounds = clients, rounds
        self.key = f"{opts.name}.peers"
        self.finished = -1  # last closed round; -1 while loading
        self.outbox: dict[int, tuple[bytes, Any]] = {}
        self.tentative: dict[tuple[int, int], Any] = {}
        self.committed: dict[int, dict[int, Any]] = defaultdict(dict)
        self.agreed: set[tuple[int, int]] = set()  # (round, sender) commits accepted in the last rounds
        self.failed_in: dict[int, dict[int, str]] = defaultdict(dict)
        self.history: dict[int, list[bool]] = defaultdict(list)  # per neighbour: exchanged in recent rounds?
        self.stragglers: set[int] = set()
        self.snapshot: Any = None  # this peer's latest state, served to newcomers
        self._logged: set[str] = set()
        self.known: dict[int, str] = {}  # client id -> the last peer ID seen for it
        self.seen: dict[int, tuple[Record, float]] = {}  # client id -> its latest record and when it expires
        self.mismatched: dict[int, list[str]] = {}  # client id -> config keys that differ from this peer's
        self.clock = now  # the swarm's time (swarm_clock: corrected at start; replaced in tests to skew it)
        self._active = 0  # requests being handled right now
        self._last_request = 0.0
        self._cache: tuple[float, dict[int, Record]] = (0.0, {})
        self._rejoining: dict[str, asyncio.Task] = {}  # peer ID -> its ping (swarm_rejoin)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="declora-swarm", daemon=True)

    # -- thread plumbing ------------------------------------------------------------------------------
    def call(self, coro: Coroutine[Any, Any, Any], timeout: float | None = None) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def once(self, text: str) -> None:
        """Say ``text`` unless it was said already (bounded: a flood of distinct lines stops being logged)."""
        if text not in self._logged and len(self._logged) < MAX_LOGGED:
            self._logged.add(text)
            self.say(text)

    def start(self) -> list[str]:
        """Start the daemon and the DHT node, announce this peer; returns its multiaddrs."""
        self.thread.start()
        return self.call(self._start(), timeout=self.opts.startup_timeout_s + 60)

    async def _start(self) -> list[str]:
        from hivemind.dht.node import DHTNode
        from hivemind.dht.validation import CompositeValidator

        o = self.opts
        self._changed = asyncio.Event()
        key = signing_key(self.identity_path) if self.identity_path.is_file() else None
        if key is None:
            peer_id_of(self.identity_path)  # creates the key file
            key = signing_key(self.identity_path)
        self.subkey = record_subkey(key)
        on_reject = lambda why: self.once(f"ignored a DHT record: {why}")  # noqa: E731
        ours = make_validator(self.key, self.clients, self.rounds, o.record_ttl_s, self.allowlist, on_reject)
        validator = CompositeValidator([signature_validator(key), ours])
        initial = list(o.initial_peers) or None
        delay, deadline, tries = 1.0, time.monotonic() + o.startup_timeout_s, 0
        while True:
            tries += 1
            self.p2p = None
            try:
                self.p2p = await self._create_p2p()
                await sync_clock(self, initial)  # before the DHT: its expiries must be in the swarm's time
                self.dht = await DHTNode.create(p2p=self.p2p, initial_peers=initial, record_validator=validator)
                break
            except Exception as err:  # noqa: BLE001 - bootstrap peers not up yet, a port taken: retried, then one line
                if self.p2p is not None:
                    await self.p2p.shutdown()
                why = f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"
                if not initial or time.monotonic() + delay > deadline:
                    raise PeerError(
                        f"could not start this peer after {tries} tries ({why}); check swarm.initial_peers, that a "
                        "peer listens there, swarm.host/port, and that the clocks agree (NTP)"
                    ) from None
                self.say(f"bootstrap peers not reachable yet ({why}); retrying in {delay:.0f} s")
                await asyncio.sleep(delay)
                delay = min(2 * delay, 30.0)
        self.peer_id = self.p2p.peer_id.to_base58()
        await self.p2p.add_binary_stream_handler(HANDLER, self._handle_stream)
        self.maddrs = await self._visible()
        await self._announce()
        self._beat = asyncio.create_task(self._heartbeat())
        return self.maddrs

    async def _create_p2p(self) -> Any:
        o = self.opts
        proto = "ip6" if ":" in o.host else "ip4"
        return await _p2p_class(bool(getattr(o, "relay_service", False))).create(
            initial_peers=list(o.initial_peers) or None,
            host_maddrs=[f"/{proto}/{o.host}/tcp/{o.port}"],
            announce_maddrs=list(o.announce_maddrs) or None,
            identity_path=str(self.identity_path),
            use_relay=o.use_relay,
            use_auto_relay=o.use_auto_relay,
            **nat_options(o),
        )

    async def _visible(self) -> list[str]:  # the daemon's, asked afresh (hivemind caches those of the start)
        direct = [str(m) for m in await self.p2p.get_visible_maddrs(latest=True)]
        maddrs, relayed = announced(direct, self.opts, self.peer_id)
        if relayed:
            self.once(f"behind NAT: reachable through relay(s) {', '.join(relayed)}")
        return maddrs

    def shutdown(self) -> None:
        if not self.thread.is_alive():
            return
        try:
            self.call(self._shutdown(), timeout=self.opts.round_timeout_s + 15)
        except Exception:  # noqa: BLE001 - leaving anyway; the daemon dies with its parent's pipe
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)

    async def _shutdown(self) -> None:
        # Linger while requests are in flight: a neighbour's last commit is acknowledged only after this
        # peer has closed its last round, and an acknowledgement cut off here would leave W_t one-sided.
        deadline = time.monotonic() + self.opts.round_timeout_s
        while (self._active or time.monotonic() - self._last_request < 1.0) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        if hasattr(self, "_beat"):
            self._beat.cancel()
        if hasattr(self, "dht"):
            await self.dht.shutdown()
        if getattr(self, "p2p", None) is not None:
            await self.p2p.shutdown()
        for task in asyncio.all_tasks():  # the DHT's own timers: nothing may outlive the loop
            if task is not asyncio.current_task():
                task.cancel()

    # -- discovery ------------------------------------------------------------------------------------
    async def _announce(self) -> None:
        from hivemind.utils import get_dht_time

        value = {
            "client": self.client,
            "peer": self.peer_id,
            "round": self.finished,
            "maddrs": self.maddrs,
            "fp": self.run.digest,
            "keys": self.run.keys,
            "t": time.time(),
        }
        expires = get_dht_time() + self.opts.record_ttl_s
        await self.dht.store(self.key, value, expires, subkey=self.subkey)
        await self._note_relayed()  # at a round's end its links are still open

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.opts.record_ttl_s / 3)
            try:  # addresses gained since the start (a relay reservation) are announced from now on
                self.maddrs = await self._visible() or self.maddrs
                await self._announce()
            except Exception as err:  # noqa: BLE001 - a missed beat is retried; the record lives record_ttl_s
                self.say(f"could not refresh this peer's DHT record ({err})")
            with contextlib.suppress(Exception):  # tried again next beat
                self._rejoin(await self._records())

    def _rejoin(self, live: dict[int, Record]) -> None:
        """While a neighbour is absent: look for it and the bootstrap peers (:mod:`declora.comm.swarm_rejoin`)."""
        seen = {c: r for c, (r, _) in self.seen.items()}
        for peer, target in to_ping(self.neighbours, live, seen, list(self.opts.initial_peers)).items():
            if peer not in self._rejoining or self._rejoining[peer].done():
                self._rejoining[peer] = asyncio.create_task(self._ping(peer, target))

    async def _ping(self, peer: str, target: Target) -> None:
        with contextlib.suppress(Exception):  # not answered: pinged again next beat
            if await ping(self.p2p, self.dht, peer, target):
                self._cache = (0.0, {})  # the other side's records are reachable now
                await self._announce()  # and this one's reaches the other side now, not at the next beat

    async def _note_relayed(self) -> None:
        with contextlib.suppress(Exception):  # a diagnosis only
            for client in relayed_neighbours(await self.p2p.list_peers(), self.known, self.neighbours):
                self.once(f"connected to neighbour client {client} through a relay")

    async def _records(self, max_age: float = 0.5) -> dict[int, Record]:
        """Every allowed peer's live record of this run, by client id (cached for ``max_age`` s)."""
        at, cached = self._cache
        if time.monotonic() - at < max_age:
            return cached
        found = await self.dht.get(self.key, latest=True)
        records: dict[int, Record] = {}
        newest: dict[int, float] = {}
        for item in found.value.values() if found is not None and isinstance(found.value, dict) else []:
            try:  # validated by the DHT already (signature, owner, schema, expiry, allowlist): parsed again here
                rec = parse_value(item.value, self.clients, self.rounds)
            except ValueError:
                continue
            stranger = self.allowlist is not None and not self.allowlist.allows(rec.peer, rec.client)
            if rec.client == self.client or stranger:
                continue
            if rec.fp != self.run.digest:
                self._mismatch(rec)
                self.seen.pop(rec.client, None)  # restarted with another config: its former record is void
                continue
            self.mismatched.pop(rec.client, None)  # restarted with this run's config
            if item.expiration_time > newest.get(rec.client, float("-inf")):  # a restarted peer's latest record
                records[rec.client], newest[rec.client] = rec, item.expiration_time
        for c, r in records.items():  # each client's record that expires last is its latest
            if newest[c] >= self.seen.get(c, (r, float("-inf")))[1]:
                self.seen[c] = (r, newest[c])
        # a record is live until it expires, also when this read missed it: a read that times out on a node
        # that stopped answering (a partition begins or heals) returns nothing, not the records it reached
        records = {c: r for c, (r, expires) in self.seen.items() if expires > self.clock()}
        self.known |= {c: r.peer for c, r in records.items()}  # names peers whose records have expired
        self._cache = (time.monotonic(), records)
        return records

    def _mismatch(self, rec: Record) -> None:
        keys = self.run.differing(rec.keys)
        self.mismatched[rec.client] = keys
        if rec.client in self.neighbours:
            self.once(
                f"refused neighbour client {rec.client} (peer {rec.peer}): it runs another experiment, its config "
                f"differs in {describe(keys)}; start every peer with the same config"
            )

    def records(self) -> dict[int, Record]:
        return self.call(self._records(max_age=0.0), timeout=self.opts.round_timeout_s)

    def set_finished(self, round_: int) -> None:
        """Announce that this peer has finished (or resumed at) ``round_``."""

        async def go() -> None:
            self.finished = round_
            await self._announce()

        self.call(go(), timeout=self.opts.round_timeout_s)


def say_to_stderr(client: int) -> Callable[[str], None]:
    def say(text: str) -> None:
        print(f"declora swarm: client {client}: {text}", file=sys.stderr, flush=True)

    return say
