"""runtime=swarm: one serverless peer per process over hivemind; neighbours that do not answer are skipped.

The trainer's round loop is the same as for the other runtimes; this communicator differs in three places:

- :meth:`SwarmCommunicator.exchange` talks to the graph neighbours that answer before the round's
  deadline (``swarm.round_timeout_s``), through :class:`~declora.comm.swarm_net.SwarmNode`, and every
  received message passed :func:`declora.comm.messages.receive` (names, shapes, dtypes, finite values,
  round, sender, run fingerprint, receiver) before it is returned; a neighbour whose config fingerprint
  differs (:mod:`declora.comm.swarm_fingerprint`) is refused, with one line naming the differing keys;
- :meth:`SwarmCommunicator.round_matrix` is W_t's row for this peer: the base W with the weight of every
  neighbour it did not exchange with moved to its diagonal (:func:`declora.mixing.live.local_row`), so a
  round without failures mixes with W bit for bit, and a failed edge is failed at both ends (see
  :mod:`declora.comm.swarm_protocol` for how both ends agree, and what happens when they cannot);
- there is no global view: ``average``/``gather``/``total`` return this peer's own values, so a peer's
  ``metrics.jsonl`` describes its own model. ``declora swarm`` assembles the averaged adapter and a
  summary from what the peers publish in ``<run>/swarm/`` (``live.jsonl``: per round, whom this peer
  exchanged with; ``state.pt``: its final adapter; ``address.txt``: its peer ID and multiaddrs).

Start-up: round 1 starts once every graph neighbour has loaded, or ``swarm.neighbour_wait_s`` after the
first one was found (:meth:`SwarmCommunicator.barrier`). A joining peer first measures its clock against
its bootstrap peer and uses the swarm's time for the DHT (:mod:`declora.comm.swarm_clock`), so a clock
that is minutes off costs nothing.

Churn: a neighbour that misses a round is logged once by client id and peer ID (and again when it is
back). A peer that restarts resumes from its own last checkpoint and jumps to its graph neighbours'
current round (:meth:`SwarmCommunicator.join`); a newcomer without a checkpoint starts from the mean of
its live neighbours' current adapters.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from declora.comm.base import Communicator, Message, State, message_bytes, neighbors
from declora.comm.swarm_clock import check_clocks
from declora.comm.swarm_fingerprint import Fingerprint
from declora.comm.swarm_net import Allowlist, SwarmNode, say_to_stderr
from declora.comm.swarm_records import check_identity, identity_file
from declora.config import Config, ConfigError
from declora.fault_injection import poisoned, skew_clock
from declora.mixing.kernel import average_states
from declora.mixing.live import local_row
from declora.rundir import layout
from declora.rundir.files import atomic_write_bytes, atomic_write_text


class SwarmCommunicator(Communicator):
    """This process is client ``swarm.client_id``; it writes its own run directory (``rank`` 0)."""

    def __init__(self, cfg: Config, workers: int) -> None:
        from declora.mixing.topology import Topology

        sc = cfg.swarm
        skew_clock(sc.client_id)  # test-only: DECLORA_FAULT_CLOCK_SKEW_S emulates a machine whose clock is off
        if cfg.out_dir is None:
            raise ConfigError("runtime=swarm needs out_dir (each peer writes its own run directory): set out_dir=DIR")
        self.num_clients, self.client = workers, sc.client_id
        self.local_clients, self.rank = [self.client], 0
        self.dir = layout.swarm_dir(cfg.out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.say = say_to_stderr(self.client)
        W = Topology.from_config(cfg.topology, workers, cfg.train.seed).W if workers > 1 else np.eye(1)
        self.graph = neighbors(W, self.client)
        allow = Allowlist.load(sc.allowlist_file) if sc.allowlist_file else None
        identity, option = identity_file(sc.identity_path, cfg.out_dir)
        check_identity(identity, option)
        identity.parent.mkdir(parents=True, exist_ok=True)
        self.run = Fingerprint.of(cfg)
        rounds = cfg.train.rounds
        self.node = SwarmNode(self.client, self.graph, sc, identity, allow, self.say, self.run, workers, rounds)
        maddrs = self.node.start()
        self.peer_id = self.node.peer_id
        if allow is not None and not allow.allows(self.peer_id, self.client):
            self.say(f"warning: this peer's ID {self.peer_id} is not on swarm.allowlist_file: others will refuse it")
        atomic_write_text(self.dir / layout.SWARM_ADDRESS, "\n".join([self.peer_id, *maddrs]) + "\n")
        # behind NAT (use_auto_relay) only the address through a relay is reachable: name that one
        relayed = [m for m in maddrs if "/p2p-circuit" in m] if sc.use_auto_relay else []
        join = f"swarm.initial_peers=[{(relayed or maddrs)[0]}]" if maddrs else "(no address: check swarm.host)"
        if sc.initial_peers:
            print(f"declora peer: client {self.client} is peer {self.peer_id}; others may join with {join}", flush=True)
        else:
            print(
                f"declora peer: client {self.client} is peer {self.peer_id} and starts a new swarm (no "
                f"swarm.initial_peers); the other peers join with {join} (run {self.run.digest})",
                flush=True,
            )
        self.startup_timeout_s = sc.startup_timeout_s
        self.neighbour_wait_s = min(sc.neighbour_wait_s, sc.startup_timeout_s)
        self.absent: set[int] = set()
        self.clients: dict[int, Any] = {}
        self.latest: State | None = None
        self._barriers = 0

    # -- start-up and joining ---------------------------------------------------------------------------
    def barrier(self) -> None:
        """The first call waits until this peer may start round 1; later calls (checkpoints) wait for nobody.

        Round 1 starts when every graph neighbour has loaded its model and data, or
        ``swarm.neighbour_wait_s`` after the first neighbour was found, if the missing ones have not even
        announced themselves (they join later as newcomers, :meth:`join`; until then each is an absent
        neighbour, a failed edge of W_t). A neighbour that has announced itself but is still loading is
        waited for (starting without it would only make round 1 wait ``round_timeout_s`` for it), and so
        is everyone while no neighbour at all was found: up to ``swarm.startup_timeout_s``.
        """
        self._barriers += 1
        if self._barriers > 1:
            return
        self.node.set_finished(0)  # loaded: "at round 0"
        start = beat = time.monotonic()
        found_at: float | None = None  # when the first neighbour was found
        next_clock = start + 3.0  # a neighbour not seen after 3 s: is it a clock the DHT cannot tolerate?
        while True:
            records = self.node.records()
            missing = [j for j in self.graph if j not in records or records[j].round < 0]
            waiting = [j for j in missing if j not in self.node.mismatched]  # another experiment: not waited for
            now = time.monotonic()
            if found_at is None and len(missing) < len(self.graph):
                found_at = now
            waited = now - start
            if not waiting or waited > self.startup_timeout_s:
                break
            loading = [j for j in waiting if j in records]  # announced, still loading its model
            if found_at is not None and not loading and now - found_at >= self.neighbour_wait_s:
                present = sorted(set(self.graph) - set(missing))
                self.say(
                    f"starts round 1 with neighbours {present}: neighbours {waiting} not in the swarm "
                    f"{self.neighbour_wait_s:g} s after the first was found (swarm.neighbour_wait_s); they join "
                    "as newcomers when they come"
                )
                return
            if now > next_clock:
                next_clock = float("inf") if check_clocks(self.node) else time.monotonic() + 10.0
            if now - beat >= 30:
                beat = now
                self.say(f"waiting for neighbours {waiting} ({waited:.0f} s of swarm.startup_timeout_s)")
            time.sleep(0.3)
        if waiting:
            self.say(f"neighbours {waiting} not in the swarm after {waited:.0f} s; starting without them")

    def join(self, done: Any, clients: dict[int, Any]) -> Any:
        """Catch up with the swarm: the round to continue after, and (newcomer) a start from the neighbours.

        Args:
            done: the trainer's :class:`~declora.training.checkpoint.Progress` after a possible resume.
            clients: this process's one client (kept: newcomers are served its state).
        """
        self.clients = clients
        (c,) = clients.values()
        self.node.snapshot = {n: t.detach().clone() for n, t in c.state().items()}  # served to newcomers from now
        records = self.node.records()
        # the graph neighbours' round, not the whole swarm's: at start-up a peer whose neighbours still wait
        # for it in round 1 must not skip it because some faster, distant peer has already finished round 1
        current = max((r.round for j, r in records.items() if j in self.graph), default=0)
        if current <= done.round:
            if done.round > 0:  # resumed, and the neighbours have not moved past its checkpoint
                self.say(f"resumed from its checkpoint of round {done.round}; rejoins at round {done.round + 1}")
            self.node.set_finished(done.round)
            return done
        if done.round == 0:  # a newcomer: the mean of its live neighbours' current adapters
            own = {n: t.detach().clone() for n, t in c.state().items()}
            got = {}
            for j in self.graph:
                if j in records:
                    try:
                        got[j] = self.node.fetch_state(records[j], own)
                    except Exception as err:  # noqa: BLE001 - a neighbour that cannot serve is skipped
                        self.say(f"could not fetch client {j}'s adapter ({type(err).__name__}: {str(err)[:120]})")
            if got:
                c.set_state(average_states([got[j] for j in sorted(got)]))
                self.node.snapshot = {n: t.detach().clone() for n, t in c.state().items()}
            self.say(f"joins at round {current + 1}, starting from the adapters of clients {sorted(got)}")
        else:
            self.say(f"resumed from its checkpoint of round {done.round}; rejoins at round {current + 1}")
        self.node.set_finished(current)
        return replace(done, round=current)

    # -- rounds -------------------------------------------------------------------------------------------
    def exchange(self, messages: dict[int, Message], W: np.ndarray) -> dict[int, dict[int, Message]]:
        (own,) = messages.values()
        if self.clients:
            (c,) = self.clients.values()
            self.node.snapshot = {n: t.detach().clone() for n, t in c.state().items()}
        peers = neighbors(W, self.client)
        t0 = time.monotonic()
        received, failed = self.node.exchange(self.round, poisoned(own, self.client, self.round), peers)
        for j, why in sorted(failed.items()):
            if j not in self.absent:
                self.absent.add(j)
                if j in self.node.mismatched:  # already named, with the keys that differ, by the node
                    continue
                who = f"peer {self.node.known[j]}" if j in self.node.known else "peer ID unknown: never seen"
                self.say(f"neighbour client {j} ({who}) is absent from round {self.round} on: {why}")
        for j in sorted(received):
            if j in self.absent:
                self.absent.discard(j)
                self.say(f"neighbour client {j} is back in round {self.round}")
        row = {
            "round": self.round,
            "client": self.client,
            "peer": self.peer_id,
            "exchanged": sorted(received),
            "failed": {str(j): why for j, why in sorted(failed.items())},
            "exchange_s": round(time.monotonic() - t0, 3),
            "time": time.time(),
        }
        with (self.dir / layout.SWARM_LIVE).open("a") as f:
            f.write(json.dumps(row) + "\n")
        return {self.client: received}

    def send(self, messages: dict[int, Message], W: np.ndarray) -> tuple[dict[int, dict[int, Message]], int]:
        received = self.exchange(messages, W)  # bytes: one message per completed exchange
        return received, sum(len(received[i]) * message_bytes(messages[i]) for i in messages)

    def round_matrix(self, W: np.ndarray, i: int, received: Mapping[int, Message]) -> np.ndarray:
        """W with row i replaced by W_t's row: failed neighbours' weights moved onto the diagonal."""
        Wt = np.array(W, dtype=float, copy=True)
        Wt[i] = local_row(W, i, received.keys())
        return Wt

    # -- no global view -------------------------------------------------------------------------------------
    def average(self, states: dict[int, State]) -> tuple[State, int]:
        (own,) = states.values()
        self.latest = {n: t.detach().clone() for n, t in own.items()}
        return self.latest, 0

    def gather(self, values: dict[int, float]) -> dict[int, float]:
        return dict(values)

    def total(self, value: float) -> float:
        return value

    def close(self) -> None:
        """Publish the final adapter (``swarm/state.pt``) and leave the swarm."""
        if self.latest is not None:
            buffer = io.BytesIO()
            torch.save({"client": self.client, "round": self.round, "state": self.latest}, buffer)
            atomic_write_bytes(self.dir / layout.SWARM_STATE, buffer.getvalue())
        self.node.shutdown()
