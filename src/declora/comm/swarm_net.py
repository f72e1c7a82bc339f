"""The swarm's network layer on hivemind: discovery in its DHT, exchanges over its libp2p RPCs.

One :class:`SwarmNode` per peer process. It runs hivemind's ``P2P`` (a libp2p daemon with this peer's
persistent identity key) and a ``DHTNode`` on one asyncio loop in a background thread; the training
thread calls :meth:`SwarmNode.exchange` and friends, which block until their coroutine is done.

**Discovery.** Every peer stores a record under ``<swarm.name>.peers``, subkey ``<client id>/<peer ID>``:
``{peer, round: <last finished round, -1 while loading>, maddrs}``, refreshed every ``record_ttl_s / 3`` s
and expiring after ``record_ttl_s``: a dead peer's record disappears by itself.
Records of peers not on the allowlist (or naming another client id than the allowlist binds) are ignored.

**One exchange per edge and round** (both ends must agree, or W_t is not symmetric). On edge (i, j) with
i < j, i initiates; both ends have a deadline ``round_timeout_s`` after they enter the round:

1. i -> j ``exchange(round t, header, x_i)``; j waits until it has its own round-t message, checks i's
   (:func:`declora.comm.messages.receive`), keeps it *tentatively* and answers with ``x_j``;
2. i checks ``x_j``, then sends ``commit(t)``; j moves x_i from tentative to committed, unless its
   round t is already closed (it answers "late" then), and acknowledges;
3. i counts the edge iff the acknowledgement came back "ok"; j counts it iff it committed before
   closing its round. Everything else (a refusal, a bad message, a missed deadline) is a failed edge
   at both ends, whose weight goes to both diagonals (:func:`declora.mixing.live.local_row`).

Each peer's own state changes only on its event loop, so "commit accepted" and "round closed" cannot
interleave. An acknowledgement that does not arrive (the stream breaks) makes i send its commit again
until its deadline; j answers "ok" again for a commit it already holds, even after closing the round.
The one case where the two ends disagree is an acknowledgement still missing at i's deadline after j
committed: j mixes x_i, i does not mix x_j. W_t is then not symmetric for that round and the sum over peers moves by
``W_ij (x_i - x_j)``: the mean is not exactly preserved (no finite protocol can rule this out on a
lossy network: the two generals' problem). A request for a later round tells j that i has moved on,
so j stops waiting for i's earlier round.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from declora.comm.messages import Message, MessageRejected, encode, header_bytes, make_header, parse_header, receive
from declora.errors import ConfigError, PeerError

HANDLER = "declora.swarm.v1"
REFUSED = b"refused:"  # metadata prefix of a refusal (stale round, stranger, bad message)


@dataclass(frozen=True)
class Record:
    """A peer as announced in the DHT."""

    client: int
    peer: str
    round: int
    maddrs: tuple[str, ...]


class Allowlist:
    """Peer IDs allowed in the swarm, one per line: ``PEER_ID [CLIENT_ID]`` (``#`` starts a comment).

    A line with a client id binds that peer ID to that client: the peer may then speak only as it.
    """

    def __init__(self, peers: dict[str, int | None]) -> None:
        self.peers = peers

    @classmethod
    def load(cls, path: str | Path) -> Allowlist:
        peers: dict[str, int | None] = {}
        try:
            lines = Path(path).read_text().splitlines()
        except OSError as err:
            raise ConfigError(f"swarm.allowlist_file={path}: cannot read it ({err.strerror})") from None
        for n, line in enumerate(lines, 1):
            fields = line.split("#")[0].split()
            if not fields:
                continue
            if len(fields) > 2 or (len(fields) == 2 and not fields[1].isdigit()):
                raise ConfigError(f"swarm.allowlist_file={path}:{n}: use 'PEER_ID [CLIENT_ID]' per line")
            peers[fields[0]] = int(fields[1]) if len(fields) == 2 else None
        return cls(peers)

    def allows(self, peer: str, client: int | None = None) -> bool:
        if peer not in self.peers:
            return False
        bound = self.peers[peer]
        return bound is None or client is None or bound == client


def peer_id_of(identity_path: str | Path) -> str:
    """The peer ID (base58) of an identity key file, creating the file if it does not exist."""
    from hivemind.p2p import P2P, PeerID

    path = Path(identity_path)
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        P2P.generate_identity(str(path))
    return PeerID.from_identity(path.read_bytes()).to_base58()


class SwarmNode:
    """This peer's P2P daemon, DHT node and exchange protocol (see the module docstring)."""

    def __init__(
        self,
        client: int,
        neighbours: list[int],
        opts: Any,
        identity_path: Path,
        allowlist: Allowlist | None,
        say: Callable[[str], None],
    ) -> None:
        self.client, self.neighbours, self.opts = client, sorted(neighbours), opts
        self.identity_path, self.allowlist, self.say = identity_path, allowlist, say
        self.key = f"{opts.name}.peers"
        self.finished = -1  # last closed round; -1 while loading
        self.outbox: dict[int, tuple[bytes, bytes, Message]] = {}
        self.tentative: dict[tuple[int, int], Message] = {}
        self.committed: dict[int, dict[int, Message]] = defaultdict(dict)
        self.agreed: set[tuple[int, int]] = set()  # (round, sender) commits accepted in the last rounds
        self.failed_in: dict[int, dict[int, str]] = defaultdict(dict)
        self.snapshot: Message | None = None  # this peer's latest state, served to newcomers
        self._refused: set[str] = set()
        self.known: dict[int, str] = {}  # client id -> the last peer ID seen for it
        self._active = 0  # requests being handled right now
        self._last_request = 0.0
        self._cache: tuple[float, dict[int, Record]] = (0.0, {})
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="declora-swarm", daemon=True)

    # -- thread plumbing ------------------------------------------------------------------------------
    def call(self, coro: Coroutine[Any, Any, Any], timeout: float | None = None) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> list[str]:
        """Start the daemon and the DHT node, announce this peer; returns its multiaddrs."""
        self.thread.start()
        return self.call(self._start(), timeout=self.opts.startup_timeout_s)

    async def _start(self) -> list[str]:
        from hivemind.dht.node import DHTNode
        from hivemind.p2p import P2P
        from hivemind.proto import runtime_pb2

        o = self.opts
        self._changed = asyncio.Event()
        proto = "ip6" if ":" in o.host else "ip4"
        self.p2p = await P2P.create(
            initial_peers=list(o.initial_peers) or None,
            host_maddrs=[f"/{proto}/{o.host}/tcp/{o.port}"],
            announce_maddrs=list(o.announce_maddrs) or None,
            identity_path=str(self.identity_path),
            use_relay=o.use_relay,
            use_auto_relay=o.use_auto_relay,
        )
        self.peer_id = self.p2p.peer_id.to_base58()
        self.dht = await DHTNode.create(p2p=self.p2p, initial_peers=list(o.initial_peers) or None)
        await self.p2p.add_protobuf_handler(HANDLER, self._handle, runtime_pb2.ExpertRequest, stream_output=True)
        self.maddrs = [str(m) for m in await self.p2p.get_visible_maddrs()]
        await self._announce()
        self._beat = asyncio.create_task(self._heartbeat())
        return self.maddrs

    def shutdown(self) -> None:
        if not self.thread.is_alive():
            return
        try:
            self.call(self._shutdown(), timeout=10)
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
        self._beat.cancel()
        await self.dht.shutdown()
        await self.p2p.shutdown()
        for task in asyncio.all_tasks():  # the DHT's own timers: nothing may outlive the loop
            if task is not asyncio.current_task():
                task.cancel()

    # -- discovery ------------------------------------------------------------------------------------
    async def _announce(self) -> None:
        from hivemind.utils import get_dht_time

        value = {"peer": self.peer_id, "round": self.finished, "maddrs": self.maddrs}
        # one subkey per (client, peer ID): a stranger announcing the same client id cannot overwrite it
        subkey = f"{self.client}/{self.peer_id}"
        await self.dht.store(self.key, value, get_dht_time() + self.opts.record_ttl_s, subkey=subkey)

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.opts.record_ttl_s / 3)
            try:
                await self._announce()
            except Exception as err:  # noqa: BLE001 - a missed beat is retried; the record lives record_ttl_s
                self.say(f"could not refresh this peer's DHT record ({err})")

    async def _records(self, max_age: float = 0.5) -> dict[int, Record]:
        """Every allowed peer's live record, by client id (cached for ``max_age`` s)."""
        at, cached = self._cache
        if time.monotonic() - at < max_age:
            return cached
        found = await self.dht.get(self.key, latest=True)
        records: dict[int, Record] = {}
        newest: dict[int, float] = {}
        for sub, item in found.value.items() if found is not None and isinstance(found.value, dict) else []:
            v = item.value
            try:
                client, peer = str(sub).split("/", 1)
                rec = Record(int(client), peer, int(v["round"]), tuple(map(str, v["maddrs"])))
            except (KeyError, TypeError, ValueError):
                continue
            stranger = self.allowlist is not None and not self.allowlist.allows(peer, rec.client)
            if rec.client == self.client or stranger:
                continue
            if item.expiration_time > newest.get(rec.client, float("-inf")):  # a restarted peer's latest record
                records[rec.client], newest[rec.client] = rec, item.expiration_time
        self.known |= {c: r.peer for c, r in records.items()}  # names peers whose records have expired
        self._cache = (time.monotonic(), records)
        return records

    def records(self) -> dict[int, Record]:
        return self.call(self._records(max_age=0.0), timeout=self.opts.round_timeout_s)

    def set_finished(self, round_: int) -> None:
        """Announce that this peer has finished (or resumed at) ``round_``."""

        async def go() -> None:
            self.finished = round_
            await self._announce()

        self.call(go(), timeout=self.opts.round_timeout_s)

    # -- RPC ------------------------------------------------------------------------------------------
    async def _rpc(self, rec: Record, kind: str, header: bytes, payload: bytes = b"") -> Any:
        from hivemind.p2p import PeerID
        from hivemind.proto import runtime_pb2
        from hivemind.utils.asyncio import as_aiter
        from hivemind.utils.multiaddr import Multiaddr

        peer = PeerID.from_base58(rec.peer)
        try:
            await self.p2p._client.connect(peer, [Multiaddr(m) for m in rec.maddrs])  # libp2p reuses a live one
        except Exception:  # noqa: BLE001 - the call below reports the failure
            pass
        req = runtime_pb2.ExpertRequest(uid=kind, metadata=header, tensors=[runtime_pb2.Tensor(buffer=payload)])
        return await self.p2p.call_protobuf_handler(peer, HANDLER, as_aiter(req), runtime_pb2.ExpertResponse)

    def _refuse(self, peer: str, what: str) -> PermissionError:
        if peer not in self._refused:  # log each stranger once
            self._refused.add(peer)
            self.say(f"refused peer {peer}: {what}")
        return PermissionError(f"peer {peer} is not allowed in this swarm")

    async def _handle(self, req: Any, ctx: Any) -> Any:
        from hivemind.proto import runtime_pb2

        self._active += 1
        try:
            return await self._serve(req, ctx)
        except (ValueError, PermissionError, PeerError) as err:  # an expected refusal: one line, no traceback
            return runtime_pb2.ExpertResponse(metadata=REFUSED + str(err).encode()[:300])
        finally:
            self._active -= 1
            self._last_request = time.monotonic()

    async def _serve(self, req: Any, ctx: Any) -> Any:
        from hivemind.proto import runtime_pb2

        remote = ctx.remote_id.to_base58()
        if self.allowlist is not None and not self.allowlist.allows(remote):
            raise self._refuse(remote, "not on swarm.allowlist_file")
        header = parse_header(req.metadata)
        sender, t = int(header["sender"]), int(header["round"])
        if self.allowlist is not None and not self.allowlist.allows(remote, sender):
            raise self._refuse(remote, f"speaks as client {sender}, which the allowlist binds to another peer")
        if sender not in self.neighbours:
            raise ValueError(f"client {sender} is not a graph neighbour of client {self.client}")
        if req.uid == "state":  # a newcomer asks for this peer's current adapter
            state = self.snapshot
            if state is None:
                raise ValueError("no state yet")
            h = header_bytes(make_header(state, self.client, self.finished))
            return runtime_pb2.ExpertResponse(metadata=h, tensors=[runtime_pb2.Tensor(buffer=encode(state))])
        if req.uid == "commit":
            if (t, sender) in self.agreed:  # a repeated commit: the first acknowledgement was lost
                return runtime_pb2.ExpertResponse(metadata=b"ok")
            msg = self.tentative.pop((t, sender), None)
            if msg is None or t <= self.finished:
                return runtime_pb2.ExpertResponse(metadata=b"late")
            self.committed[t][sender] = msg
            self.agreed.add((t, sender))
            self._changed.set()
            return runtime_pb2.ExpertResponse(metadata=b"ok")
        if req.uid != "exchange" or sender > self.client:
            raise ValueError(f"unexpected request {req.uid!r} from client {sender}")
        for r in range(self.finished + 1, t):  # the sender moved on: it will not complete earlier rounds
            self.failed_in[r].setdefault(sender, f"it moved on to round {t}")
        self._changed.set()
        if t <= self.finished:
            raise ValueError(f"round {t} is closed at client {self.client}")
        deadline = time.monotonic() + self.opts.round_timeout_s
        while t not in self.outbox:  # this peer's own round-t message is not ready yet
            if time.monotonic() > deadline or t <= self.finished:
                raise ValueError(f"client {self.client} did not reach round {t} in time")
            await asyncio.sleep(0.05)
        own_header, payload, like = self.outbox[t]
        try:
            msg = receive(header, req.tensors[0].buffer if req.tensors else b"", like, sender, t)
        except MessageRejected as err:
            self.say(f"{err} (peer {remote}); not mixed")
            self.failed_in[t][sender] = f"sent a bad message: {err.reason}"
            self._changed.set()
            raise
        self.tentative[(t, sender)] = msg
        return runtime_pb2.ExpertResponse(metadata=own_header, tensors=[runtime_pb2.Tensor(buffer=payload)])

    # -- one round ------------------------------------------------------------------------------------
    def exchange(self, t: int, message: Message, neighbours: list[int]) -> tuple[dict[int, Message], dict[int, str]]:
        """Exchange round ``t`` with ``neighbours``; returns (messages received on agreed edges, failures)."""
        return self.call(self._exchange(t, message, neighbours))

    async def _exchange(self, t: int, message: Message, neighbours: list[int]) -> tuple[dict, dict]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.opts.round_timeout_s
        self.outbox[t] = (header_bytes(make_header(message, self.client, t)), encode(message), message)
        higher = [j for j in neighbours if j > self.client]
        lower = [j for j in neighbours if j < self.client]
        results = await asyncio.gather(*(self._initiate(t, j, deadline) for j in higher))
        received = {j: m for j, (m, _) in zip(higher, results, strict=True) if m is not None}
        failed = {j: why for j, (m, why) in zip(higher, results, strict=True) if m is None}
        while True:  # the lower neighbours initiate: wait for their commits, a refusal or the deadline
            self._changed.clear()
            pending = [j for j in lower if j not in self.committed[t] and j not in self.failed_in[t]]
            if not pending or loop.time() >= deadline:
                break
            live = await self._records()
            for j in pending:
                if j not in live:
                    self.failed_in[t][j] = "offline (no record in the DHT)"
            try:
                await asyncio.wait_for(self._changed.wait(), min(0.5, max(deadline - loop.time(), 0.01)))
            except asyncio.TimeoutError:
                pass
        self.finished = t  # from here on, commits for round t are refused: the set below is final
        for j in lower:
            if j in self.committed[t]:
                received[j] = self.committed[t][j]
            else:
                failed[j] = self.failed_in[t].get(j, "no exchange before the deadline")
        for r in [r for r in self.outbox if r < t]:
            del self.outbox[r]
        for key in [k for k in self.tentative if k[0] <= t]:
            del self.tentative[key]
        self.committed.pop(t, None), self.failed_in.pop(t, None)
        self.agreed = {k for k in self.agreed if k[0] > t - 3}
        await self._announce()
        return received, failed

    async def _initiate(self, t: int, j: int, deadline: float) -> tuple[Message | None, str]:
        from hivemind.p2p import P2PHandlerError

        loop = asyncio.get_running_loop()
        own_header, payload, like = self.outbox[t]
        last = "no answer"
        while deadline - loop.time() > 0:
            rec = (await self._records()).get(j)
            if rec is None:
                return None, "offline (no record in the DHT)"
            try:
                resp = await asyncio.wait_for(self._rpc(rec, "exchange", own_header, payload), deadline - loop.time())
            except asyncio.TimeoutError:
                break
            except P2PHandlerError as err:  # j failed while handling it: final for this round
                return None, f"failed at client {j}: {str(err).split(': ', 1)[-1][:160]}"
            except Exception as err:  # noqa: BLE001 - not reachable (yet): retry until the deadline
                last = f"{type(err).__name__}: {str(err)[:120]}"
                await asyncio.sleep(0.3)
                continue
            if resp.metadata.startswith(REFUSED):  # j refused (stale round, not allowed, bad message)
                return None, f"refused: {resp.metadata[len(REFUSED) :].decode(errors='replace')}"
            try:
                msg = receive(parse_header(resp.metadata), resp.tensors[0].buffer if resp.tensors else b"", like, j, t)
            except MessageRejected as err:
                self.say(f"{err} (peer {rec.peer}); not mixed")
                return None, f"sent a bad message: {err.reason}"
            commit = header_bytes({"v": 1, "sender": self.client, "round": t})
            while True:  # j answers "ok" again to a repeated commit: retry a lost acknowledgement
                try:
                    ack = await asyncio.wait_for(self._rpc(rec, "commit", commit), max(deadline - loop.time(), 0.5))
                    break
                except Exception as err:  # noqa: BLE001
                    if deadline - loop.time() <= 0:
                        return None, f"commit not acknowledged ({type(err).__name__})"
                    await asyncio.sleep(0.1)
            return (msg, "") if ack.metadata == b"ok" else (None, "commit refused: its round was already closed")
        return None, f"no answer before the deadline ({last})"

    def fetch_state(self, rec: Record, like: Message) -> Message:
        """A neighbour's current state (for a newcomer's start), checked like any message."""

        async def go() -> Message:
            header = header_bytes({"v": 1, "sender": self.client, "round": 0})
            resp = await self._rpc(rec, "state", header)
            if resp.metadata.startswith(REFUSED):
                why = resp.metadata[len(REFUSED) :].decode(errors="replace")
                raise PeerError(f"client {rec.client} refused: {why}")
            h = parse_header(resp.metadata)
            return receive(h, resp.tensors[0].buffer, like, rec.client, int(h["round"]))

        return self.call(go(), timeout=self.opts.round_timeout_s)


def say_to_stderr(client: int) -> Callable[[str], None]:
    def say(text: str) -> None:
        print(f"declora swarm: client {client}: {text}", file=sys.stderr, flush=True)

    return say
