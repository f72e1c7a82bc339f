"""The swarm's exchange protocol: one exchange per edge and round, which both ends agree on.

Mixed into :class:`declora.comm.swarm_net.SwarmNode` (which owns the daemon, the DHT and the state used
here). Both ends of an edge must agree on whether it was exchanged, or W_t is not symmetric. On edge
(i, j) with i < j, i initiates; both ends have a deadline ``round_timeout_s`` after they enter the round:

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
committed: j mixes x_i, i does not mix x_j. W_t is then not symmetric for that round and the sum over peers
moves by ``W_ij (x_i - x_j)``: the mean is not exactly preserved (no finite protocol can rule this out on a
lossy network: the two generals' problem). A request for a later round tells j that i has moved on,
so j stops waiting for i's earlier round.

**What a request must pass, in this order, before its payload is read:** the remote's authenticated peer
ID on the allowlist (before a byte is read); a header of at most 64 KB; the sender bound to that peer
by the allowlist and a graph neighbour; the same run fingerprint; a round in ``(finished, finished +
ROUND_WINDOW]`` and at most ``train.rounds``; a payload of exactly this peer's own message size.
Messages name their run, round, sender and receiver (:func:`declora.comm.messages.receive`).

**Stragglers.** A neighbour that missed 3 of its last 4 rounds is named once, and waited for at most
``swarm.straggler_wait_s`` per round (not ``round_timeout_s``) until it exchanges in time again.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from declora.comm.messages import Message, MessageRejected, encode, make_header, receive
from declora.comm.swarm_maddr import dialable
from declora.comm.swarm_records import Record
from declora.comm.swarm_wire import REFUSED, FrameError, close, read_frame, read_header, read_payload, write_frame
from declora.errors import PeerError

HANDLER = "declora.swarm.v2"
ROUND_WINDOW = 4  # how far ahead of this peer a request's round may be
STRAGGLER = (3, 4)  # missed in 3 of the last 4 rounds


class ExchangeProtocol:
    """The request handler and the round (see the module docstring); state lives on the node."""

    # -- serving -------------------------------------------------------------------------------------
    def _header(self, t: int, kind: str, to: int, message: Message | None = None) -> dict[str, Any]:
        if message is None:
            return {"v": 1, "sender": self.client, "round": t, "run": self.run.digest, "to": to, "kind": kind}
        return make_header(message, self.client, t, self.run.digest, to) | {"kind": kind}

    async def _handle_stream(self, info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        remote = info.peer_id.to_base58()
        self._active += 1
        try:
            if self.allowlist is not None and not self.allowlist.allows(remote):
                raise self._refuse(remote, "not on swarm.allowlist_file")  # nothing of the request was read
            header, announced = await asyncio.wait_for(read_header(reader), self.opts.round_timeout_s)
            reply = await self._serve(remote, header, announced, reader)
            await write_frame(writer, *reply)
        except (ValueError, PermissionError, PeerError) as err:  # an expected refusal: one line, no traceback
            try:
                await write_frame(writer, {REFUSED: str(err)[:300]})
            except Exception:  # noqa: BLE001 - the remote is gone
                pass
        except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError):
            pass
        finally:
            close(writer)
            self._active -= 1
            self._last_request = time.monotonic()

    def _refuse(self, peer: str, what: str) -> PermissionError:
        self.once(f"refused peer {peer}: {what}")
        return PermissionError(f"peer {peer} is not allowed in this swarm")

    async def _serve(self, remote: str, header: dict, announced: int, reader: Any) -> tuple[dict, bytes]:
        try:
            kind, sender, t = header.get("kind"), int(header["sender"]), int(header["round"])
        except (KeyError, TypeError, ValueError):
            raise ValueError("malformed request header") from None
        if self.allowlist is not None and not self.allowlist.allows(remote, sender):
            raise self._refuse(remote, f"speaks as client {sender}, which the allowlist binds to another peer")
        if kind == "clock":  # the time is no secret: any allowed peer may ask, before the run fingerprint is
            # compared, since a joining peer corrects its clock before it knows whether it runs the same experiment
            await read_payload(reader, announced, 0)
            return {"time": self.clock()}, b""
        if header.get("run") != self.run.digest:
            keys = self.mismatched.get(sender)
            what = f"its config differs in {', '.join(keys)}" if keys else "another run fingerprint"
            self.once(f"refused client {sender} (peer {remote}): it runs another experiment ({what})")
            raise PermissionError(f"client {self.client} runs another experiment ({what})")
        if sender not in self.neighbours:
            raise ValueError(f"client {sender} is not a graph neighbour of client {self.client}")
        if header.get("to") != self.client:
            raise ValueError(f"request addressed to client {header.get('to')}, not {self.client}")
        if kind == "state":  # a newcomer asks for this peer's current adapter
            await read_payload(reader, announced, 0)
            if self.snapshot is None:
                raise ValueError("no state yet")
            return self._header(self.finished, "state", sender, self.snapshot), encode(self.snapshot)
        if kind == "commit":
            await read_payload(reader, announced, 0)
            return {"ack": self._commit(t, sender)}, b""
        if kind != "exchange" or sender > self.client:
            raise ValueError(f"unexpected request {str(kind)[:20]!r} from client {sender}")
        if t <= self.finished:
            raise ValueError(f"round {t} is closed at client {self.client}")
        if t > self.finished + ROUND_WINDOW or t > self.rounds:
            self.once(f"refused client {sender} (peer {remote}): round {t} is out of bounds (now {self.finished + 1})")
            raise ValueError(f"round {t} is out of bounds at client {self.client} (now {self.finished + 1})")
        for r in range(self.finished + 1, t):  # the sender moved on: it will not complete earlier rounds
            self.failed_in[r].setdefault(sender, f"it moved on to round {t}")
        self._changed.set()
        deadline = time.monotonic() + self.opts.round_timeout_s
        while t not in self.outbox:  # this peer's own round-t message is not ready yet
            if time.monotonic() > deadline or t <= self.finished:
                raise ValueError(f"client {self.client} did not reach round {t} in time")
            await asyncio.sleep(0.05)
        payload, like = self.outbox[t]
        # exactly one message's size, or refused unread; a sender that stalls mid-payload is cut off
        data = await asyncio.wait_for(read_payload(reader, announced, len(payload)), self.opts.round_timeout_s)
        try:
            msg = receive(header, data, like, sender, t, run=self.run.digest, receiver=self.client)
        except MessageRejected as err:
            self.say(f"{err} (peer {remote}); not mixed")
            self.failed_in[t][sender] = f"sent a bad message: {err.reason}"
            self._changed.set()
            raise
        self.tentative[(t, sender)] = msg
        return self._header(t, "exchange", sender, like), payload

    def _commit(self, t: int, sender: int) -> str:
        if (t, sender) in self.agreed:  # a repeated commit: the first acknowledgement was lost
            return "ok"
        msg = self.tentative.pop((t, sender), None)
        if msg is None or t <= self.finished:
            return "late"
        self.committed[t][sender] = msg
        self.agreed.add((t, sender))
        self._changed.set()
        return "ok"

    # -- requesting ----------------------------------------------------------------------------------
    async def _rpc(self, rec: Record, header: dict, payload: bytes = b"", expected: int = 0) -> tuple[dict, bytes]:
        from hivemind.p2p import PeerID

        peer = PeerID.from_base58(rec.peer)
        try:  # libp2p reuses a live connection; a relayed peer is reached through its /p2p-circuit address
            await self.p2p._client.connect(peer, [dialable(m, rec.peer) for m in rec.maddrs])
        except Exception:  # noqa: BLE001 - the call below reports the failure
            pass
        _, reader, writer = await self.p2p.call_binary_stream_handler(peer, HANDLER)
        try:
            await write_frame(writer, header, payload)
            return await read_frame(reader, expected)
        finally:
            close(writer)

    def fetch_state(self, rec: Record, like: Message) -> Message:
        """A neighbour's current state (for a newcomer's start), checked like any message."""

        async def go() -> Message:
            h, data = await self._rpc(rec, self._header(0, "state", rec.client), expected=len(encode(like)))
            if REFUSED in h:
                raise PeerError(f"client {rec.client} refused: {h[REFUSED]}")
            return receive(h, data, like, rec.client, int(h["round"]), run=self.run.digest, receiver=self.client)

        return self.call(go(), timeout=self.opts.round_timeout_s)

    # -- one round ------------------------------------------------------------------------------------
    def exchange(self, t: int, message: Message, neighbours: list[int]) -> tuple[dict[int, Message], dict[int, str]]:
        """Exchange round ``t`` with ``neighbours``; returns (messages received on agreed edges, failures)."""
        return self.call(self._exchange(t, message, neighbours))

    def _deadline(self, j: int, start: float) -> float:
        """Round start + round_timeout_s, or + straggler_wait_s for a neighbour that keeps missing rounds."""
        missed, window = STRAGGLER
        recent = self.history[j][-window:]
        if len(recent) >= missed and recent.count(False) >= missed:
            wait = min(getattr(self.opts, "straggler_wait_s", self.opts.round_timeout_s), self.opts.round_timeout_s)
            if j not in self.stragglers:  # named once per spell
                self.stragglers.add(j)
                self.say(
                    f"neighbour client {j} missed {recent.count(False)} of its last {len(recent)} rounds: waiting "
                    f"at most {wait:g} s per round for it (swarm.straggler_wait_s) until it is in time again"
                )
            return start + wait
        self.stragglers.discard(j)
        return start + self.opts.round_timeout_s

    async def _exchange(self, t: int, message: Message, neighbours: list[int]) -> tuple[dict, dict]:
        loop = asyncio.get_running_loop()
        start = loop.time()
        deadlines = {j: self._deadline(j, start) for j in neighbours}
        self.outbox[t] = (encode(message), message)
        higher = [j for j in neighbours if j > self.client]
        lower = [j for j in neighbours if j < self.client]
        results = await asyncio.gather(*(self._initiate(t, j, deadlines[j]) for j in higher))
        received = {j: m for j, (m, _) in zip(higher, results, strict=True) if m is not None}
        failed = {j: why for j, (m, why) in zip(higher, results, strict=True) if m is None}
        while True:  # the lower neighbours initiate: wait for their commits, a refusal or their deadline
            self._changed.clear()
            pending = [j for j in lower if j not in self.committed[t] and j not in self.failed_in[t]]
            for j in [j for j in pending if loop.time() >= deadlines[j]]:
                pending.remove(j)
            if not pending:
                break
            live = await self._records()
            for j in pending:
                if j not in live:
                    self.failed_in[t][j] = self._absent_reason(j)
            wait = min(deadlines[j] for j in pending) - loop.time()
            try:
                await asyncio.wait_for(self._changed.wait(), min(0.5, max(wait, 0.01)))
            except asyncio.TimeoutError:
                pass
        self.finished = t  # from here on, commits for round t are refused: the set below is final
        for j in lower:
            if j in self.committed[t]:
                received[j] = self.committed[t][j]
            else:
                failed[j] = self.failed_in[t].get(j, "no exchange before the deadline")
        for j in neighbours:
            self.history[j] = [*self.history[j][-7:], j in received]
        for r in [r for r in self.outbox if r < t]:
            del self.outbox[r]
        for key in [k for k in self.tentative if k[0] <= t]:
            del self.tentative[key]
        self.committed.pop(t, None), self.failed_in.pop(t, None)
        self.agreed = {k for k in self.agreed if k[0] > t - 3}
        await self._announce()
        return received, failed

    def _absent_reason(self, j: int) -> str:
        if j in self.mismatched:
            return f"runs another experiment (config differs in {', '.join(self.mismatched[j][:6])})"
        return "offline (no record in the DHT)"

    async def _initiate(self, t: int, j: int, deadline: float) -> tuple[Message | None, str]:
        loop = asyncio.get_running_loop()
        payload, like = self.outbox[t]
        last = "no answer"
        while deadline - loop.time() > 0:
            rec = (await self._records()).get(j)
            if rec is None:
                return None, self._absent_reason(j)
            try:
                resp, data = await asyncio.wait_for(
                    self._rpc(rec, self._header(t, "exchange", j, like), payload, len(payload)), deadline - loop.time()
                )
            except asyncio.TimeoutError:
                break
            except FrameError as err:  # j answered with a frame this peer does not read: final for this round
                return None, f"sent a bad frame: {err}"
            except Exception as err:  # noqa: BLE001 - not reachable (yet): retry until the deadline
                last = f"{type(err).__name__}: {str(err)[:120]}"
                await asyncio.sleep(0.3)
                continue
            if REFUSED in resp:  # j refused (stale round, not allowed, bad message, another run)
                return None, f"refused: {str(resp[REFUSED])[:200]}"
            try:
                msg = receive(resp, data, like, j, t, run=self.run.digest, receiver=self.client)
            except MessageRejected as err:
                self.say(f"{err} (peer {rec.peer}); not mixed")
                return None, f"sent a bad message: {err.reason}"
            return await self._send_commit(rec, t, j, deadline, msg)
        return None, f"no answer before the deadline ({last})"

    async def _send_commit(self, rec: Record, t: int, j: int, deadline: float, msg: Message) -> tuple[Any, str]:
        loop = asyncio.get_running_loop()
        while True:  # j answers "ok" again to a repeated commit: retry a lost acknowledgement
            try:
                ack, _ = await asyncio.wait_for(
                    self._rpc(rec, self._header(t, "commit", j)), max(deadline - loop.time(), 0.5)
                )
                break
            except Exception as err:  # noqa: BLE001
                if deadline - loop.time() <= 0:
                    return None, f"commit not acknowledged ({type(err).__name__})"
                await asyncio.sleep(0.1)
        return (msg, "") if ack.get("ack") == "ok" else (None, "commit refused: its round was already closed")
