"""runtime=swarm across emulated hosts: each peer in its own network namespace, started with `declora peer`.

Every peer is started exactly as a user would on a separate machine: its own out_dir, identity key,
``swarm.host`` = its private address, the allowlist of every peer ID, and the first peer's multiaddr as
``swarm.initial_peers``. All peers are started at once (the others before the first one is up: they retry).
The harness (:mod:`netns`) removes every namespace and process, also when a test fails. Skipped where
namespaces cannot be made (not root, no iproute2); CI runs them as root.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from declora.config import load_config

pytest.importorskip("hivemind")
sys.path.insert(0, str(Path(__file__).parent))
from netns import Hosts, nat_unavailable, unavailable  # noqa: E402

REASON = unavailable()
pytestmark = [pytest.mark.distributed, pytest.mark.skipif(REASON is not None, reason=f"netns: {REASON}")]
PORT = 31337
ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def _base(tiny_overrides: list[str], drop: tuple[str, ...] = ()) -> list[str]:
    skip = ("out_dir=", "train.clients=", *drop)
    return [o for o in tiny_overrides if not o.startswith(skip)]


class NetSwarm:
    """``clients`` peers, peer i on host i of ``hosts``, each run with ``declora peer``."""

    def __init__(self, hosts: Hosts, base: Path, clients: int) -> None:
        from declora.comm.swarm_records import peer_id_of

        self.hosts, self.base, self.clients = hosts, base, clients
        base.mkdir(parents=True, exist_ok=True)
        self.keys = {i: base / "keys" / f"{i}.key" for i in range(clients)}
        self.ids = {i: peer_id_of(k) for i, k in self.keys.items()}  # what `declora peer --print-id` prints
        self.allow = base / "allowlist.txt"
        self.allow.write_text("".join(f"{p} {i}\n" for i, p in self.ids.items()))
        self.first = f"/ip4/{hosts.ip(0)}/tcp/{PORT}/p2p/{self.ids[0]}"
        self.procs: dict[int, subprocess.Popen] = {}
        self.relayed = False

    def impair(self, delay_ms: float, loss: float, rate: str) -> None:
        """Every host: a token bucket on its egress, and its peer behind a delaying, losing relay on ``PORT``
        (the peer listens on the host's loopback, ``PORT + 1``, and announces the relay's address)."""
        self.relayed = True
        for i in range(self.clients):
            self.folder(i).mkdir(parents=True, exist_ok=True)
            self.hosts.rate(i, rate)
            self.hosts.relay(i, PORT, PORT + 1, delay_ms, loss, self.folder(i) / "relay.log")

    def folder(self, i: int) -> Path:
        return self.base / f"peer_{i}"

    def start(self, overrides: list[str], per_peer: dict[int, list[str]] | None = None, env=None, late=False) -> None:
        """Start every peer; ``late``: the bootstrap peer only once the others have failed to reach it."""
        for i in reversed(range(self.clients)):
            if i == 0 and late:
                deadline = time.monotonic() + 90
                while time.monotonic() < deadline and "retrying in" not in self.log(1):
                    time.sleep(0.2)
            self.folder(i).mkdir(parents=True, exist_ok=True)
            net = [f"swarm.host={self.hosts.addr(i)}", f"swarm.port={PORT}"]
            if self.relayed:
                announce = f"swarm.announce_maddrs=[/ip4/{self.hosts.ip(i)}/tcp/{PORT}]"
                net = ["swarm.host=127.0.0.1", f"swarm.port={PORT + 1}", announce]
            if i > 0:
                net.append(f"swarm.initial_peers=[{self.first}]")
            args = [
                *overrides,
                f"train.clients={self.clients}",
                f"swarm.client_id={i}",
                f"out_dir={self.folder(i)}",
                f"swarm.identity_path={self.keys[i]}",
                f"swarm.allowlist_file={self.allow}",
                *net,
                *(per_peer or {}).get(i, []),
            ]
            argv = [sys.executable, "-m", "declora", "peer", *args]
            self.procs[i] = self.hosts.popen(i, argv, self.folder(i) / "peer.log", ENV | (env or {}))

    def wait(self, timeout: float) -> dict[int, int | None]:
        deadline = time.monotonic() + timeout
        codes: dict[int, int | None] = {}
        for i, p in self.procs.items():
            try:
                codes[i] = p.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                codes[i] = None
        return codes

    def log(self, i: int) -> str:
        path = self.folder(i) / "peer.log"
        return path.read_text(errors="replace") if path.is_file() else ""

    def rows(self, i: int) -> list[dict]:
        live = self.folder(i) / "swarm" / "live.jsonl"
        return [json.loads(r) for r in (live.read_text().splitlines() if live.is_file() else []) if r.strip()]

    def until_round(self, t: int, deadline: float, peers: range | None = None) -> None:
        """Wait (to ``deadline``, monotonic) until every peer of ``peers`` (default: all) has done round ``t``."""
        while min(self.rounds_done(i) for i in peers or range(self.clients)) < t and time.monotonic() < deadline:
            time.sleep(0.1)

    def rounds_done(self, i: int) -> int:
        live = self.folder(i) / "swarm" / "live.jsonl"
        rows = live.read_text().splitlines() if live.is_file() else []
        return max((json.loads(r)["round"] for r in rows if r.strip()), default=0)


def _adapters(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def _max_diff(a: Path, b: Path) -> float:
    x, y = _adapters(a), _adapters(b)
    assert x.keys() == y.keys() and x
    return max(float((x[k] - y[k]).abs().max()) for k in x)


def test_four_hosts_equal_the_simulation_while_a_stranger_attacks(tiny_overrides: list[str], tmp_path: Path) -> None:
    """4 peers on 4 hosts (ring, 2 rounds) give the simulation's numbers (1e-5), although a fifth host runs a
    stranger that forges every peer's record (round 1,000,000, far-future expiry), sends each a 100 MB
    request and a request for round 200,000; the peers name it and ignore its records."""
    from declora.launch.swarm import assemble
    from declora.training.trainer import run

    overrides = _base(tiny_overrides)
    sim = run(load_config(overrides=[*overrides, "train.clients=4", f"out_dir={tmp_path / 'sim'}"]))
    with Hosts(5, halves=5) as hosts:
        s = NetSwarm(hosts, tmp_path / "swarm", 4)
        s.start([*overrides, "swarm.round_timeout_s=60", "swarm.name=nsa"], late=True)
        stranger_out = tmp_path / "stranger.json"
        argv = [sys.executable, str(Path(__file__).parent / "netns_stranger.py"), s.first, hosts.ip(4)]
        hosts.popen(4, [*argv, "nsa.peers", "60", str(stranger_out)], tmp_path / "stranger.log", ENV)
        codes = s.wait(150)
        assert codes == {i: 0 for i in range(4)}, [s.log(i)[-2500:] for i in range(4)]
    assert not hosts.leftovers()
    summary = assemble(s.base, codes)
    assert summary["live_per_round"] == {"1": [0, 1, 2, 3], "2": [0, 1, 2, 3]}
    assert summary["edges_per_round"]["2"] == [[0, 1], [0, 3], [1, 2], [2, 3]]
    assert abs(summary["final_accuracy"] - sim["final_accuracy"]) <= 1e-5
    assert _max_diff(tmp_path / "sim/adapters/average", s.base / "adapters/average") <= 1e-5
    for i in range(4):
        assert _max_diff(tmp_path / f"sim/adapters/client_{i}", s.folder(i) / f"adapters/client_{i}") <= 1e-5
    attack = json.loads(stranger_out.read_text())
    assert attack["stores"] > 0 and attack["answers"], attack  # it did attack
    logs = "".join(s.log(i) for i in range(4))
    assert f"refused peer {attack['peer']}" in logs and "ignored a DHT record" in logs
    assert "bootstrap peers not reachable yet" in logs  # started before peer 0: retried, then joined
    assert "starts a new swarm" in s.log(0)


def test_delay_loss_and_bandwidth_give_the_same_numbers(tiny_overrides: list[str], tmp_path: Path) -> None:
    """50 ms one way and 1 % loss on every link (a relay), 10 Mbit/s per host: no deadline is missed, so the
    numbers are the simulation's (1e-5)."""
    from declora.launch.swarm import assemble
    from declora.training.trainer import run

    overrides = _base(tiny_overrides) + ["eval.clients=false"]
    sim = run(load_config(overrides=[*overrides, "train.clients=4", f"out_dir={tmp_path / 'sim'}"]))
    with Hosts(4, halves=4) as hosts:
        s = NetSwarm(hosts, tmp_path / "swarm", 4)
        s.impair(50.0, 0.01, "10mbit")
        s.start([*overrides, "swarm.round_timeout_s=60", "swarm.name=nsd"])
        codes = s.wait(150)
        assert codes == {i: 0 for i in range(4)}, [s.log(i)[-2500:] for i in range(4)]
    assert not hosts.leftovers()
    summary = assemble(s.base, codes)
    assert summary["edges_per_round"]["2"] == [[0, 1], [0, 3], [1, 2], [2, 3]]
    assert abs(summary["final_accuracy"] - sim["final_accuracy"]) <= 1e-5
    assert _max_diff(tmp_path / "sim/adapters/average", s.base / "adapters/average") <= 1e-5


def test_a_peer_behind_nat_takes_part_through_a_relay(tiny_overrides: list[str], tmp_path: Path) -> None:
    """Ring 0-1-2-3-0, 3 rounds; host 3 sits behind a NAT router (iptables MASQUERADE) whose firewall lets
    it out to host 0 only. Peer 0 runs the relay service; peer 3 (``use_auto_relay``) reserves a slot on
    it, its bootstrap peer, and announces its ``/p2p-circuit`` address. Peer 2 initiates edge (2, 3) and
    can reach 3 only through the relay: both of 3's edges are exchanged in every round, and the numbers
    are the simulation's (1e-5)."""
    if (why := nat_unavailable()) is not None:
        pytest.skip(f"NAT: {why}")
    from declora.launch.swarm import assemble
    from declora.training.trainer import run

    overrides = _base(tiny_overrides, ("train.rounds=",)) + ["train.rounds=3", "eval.clients=false"]
    sim = run(load_config(overrides=[*overrides, "train.clients=4", f"out_dir={tmp_path / 'sim'}"]))
    with Hosts(4, halves=4, nat={3}) as hosts:
        hosts.egress_only(3, 0)
        s = NetSwarm(hosts, tmp_path / "swarm", 4)
        nat = ["swarm.use_auto_relay=true"]
        s.start(
            [*overrides, "swarm.round_timeout_s=60", "swarm.record_ttl_s=6", "swarm.name=nsr"],
            per_peer={0: ["swarm.relay_service=true"], 3: nat},
        )
        codes = s.wait(110)
        assert codes == {i: 0 for i in range(4)}, [s.log(i)[-2500:] for i in range(4)]
    assert not hosts.leftovers()
    circuit = f"{s.first}/p2p-circuit/p2p/{s.ids[3]}"
    assert f"reachable through relay(s) {circuit}" in s.log(3), s.log(3)[-2000:]
    assert f"others may join with swarm.initial_peers=[{circuit}]" in s.log(3), s.log(3)[-2000:]  # not its LAN IP
    assert "connected to neighbour client 3 through a relay" in s.log(2), s.log(2)[-2000:]
    for i, others in [(3, [0, 2]), (2, [1, 3]), (0, [1, 3])]:  # 3 mixed with each neighbour in every round
        assert [r["exchanged"] for r in s.rows(i)] == [others] * 3, s.rows(i)
    summary = assemble(s.base, codes)
    assert all(summary["edges_per_round"][str(t)] == [[0, 1], [0, 3], [1, 2], [2, 3]] for t in (1, 2, 3))
    assert abs(summary["final_accuracy"] - sim["final_accuracy"]) <= 1e-5
    assert _max_diff(tmp_path / "sim/adapters/average", s.base / "adapters/average") <= 1e-5


def test_a_partition_for_rounds_2_and_3_then_heal(tiny_overrides: list[str], tmp_path: Path) -> None:
    """Ring 0-1-2-3-0 on hosts {0, 1} | {2, 3}: the link between the halves is cut once round 1 is done and
    joined again after round 3. Both halves go on, each peer names its absent neighbour once, the cross
    edges come back, every peer finishes, and the summary shows the partition."""
    from declora.launch.swarm import assemble

    overrides = _base(tiny_overrides, ("train.rounds=",)) + ["train.rounds=8", "eval.clients=false"]
    overrides += ["swarm.round_timeout_s=4", "swarm.record_ttl_s=6", "swarm.name=nsp", "swarm.straggler_wait_s=4"]
    with Hosts(4) as hosts:
        s = NetSwarm(hosts, tmp_path / "swarm", 4)
        s.start(overrides, env={"DECLORA_ROUND_DELAY": "2"})
        deadline = time.monotonic() + 120
        s.until_round(1, deadline)
        hosts.partition()
        s.until_round(3, deadline)
        hosts.heal()
        codes = s.wait(120)
        assert codes == {i: 0 for i in range(4)}, [s.log(i)[-2500:] for i in range(4)]
    assert not hosts.leftovers()
    summary = assemble(s.base, codes, evaluate_average=False)
    edges = summary["edges_per_round"]
    full, halves = [[0, 1], [0, 3], [1, 2], [2, 3]], [[0, 1], [2, 3]]
    assert edges["1"] == full
    # cut: no edge across; the edges inside each half hold (their records stay live until they expire, also
    # while DHT reads time out on the nodes across the cut), at the latest from round 3 on
    assert set(map(tuple, edges["2"])) <= {(0, 1), (2, 3)} and edges["3"] == halves, edges
    # healed: each side pings the absent neighbours and the bootstrap peer (swarm_rejoin), so the cross edges
    # are back within a few rounds (round 4 when nothing is slow), and stay
    healed = min((t for t in range(4, 9) if edges[str(t)] == full), default=None)
    assert healed is not None and healed <= 6 and edges["8"] == full, edges
    assert all(2 <= int(t) <= healed for t in summary["one_sided_edges"]), summary["one_sided_edges"]
    for i, j in [(0, 3), (1, 2), (2, 1), (3, 0)]:
        assert s.log(i).count(f"neighbour client {j} (peer") == 1, s.log(i)[-2000:]  # named once
        assert f"neighbour client {j} is back" in s.log(i)


def test_two_peers_killed_at_once_the_others_finish(tiny_overrides: list[str], tmp_path: Path) -> None:
    """Ring of 5 hosts: peers 1 and 3 are SIGKILLed together (with their daemons) after round 2. Peers 0, 2, 4
    finish; each names every dead neighbour once; 0 and 4 keep exchanging, 2 (both neighbours dead) goes alone."""
    overrides = _base(tiny_overrides, ("train.rounds=",)) + ["train.rounds=6", "eval.clients=false"]
    overrides += ["swarm.round_timeout_s=4", "swarm.record_ttl_s=3", "swarm.name=nsk", "swarm.straggler_wait_s=4"]
    with Hosts(5) as hosts:
        s = NetSwarm(hosts, tmp_path / "swarm", 5)
        s.start(overrides, env={"DECLORA_ROUND_DELAY": "1"})
        s.until_round(2, time.monotonic() + 120)
        for i in (1, 3):
            os.killpg(s.procs[i].pid, signal.SIGKILL)
        codes = s.wait(150)
        assert codes[0] == codes[2] == codes[4] == 0, [s.log(i)[-2500:] for i in (0, 2, 4)]
        assert codes[1] == codes[3] == -signal.SIGKILL
    assert not hosts.leftovers()
    for i, dead in [(0, [1]), (2, [1, 3]), (4, [3])]:
        for j in dead:
            assert s.log(i).count(f"neighbour client {j} (peer") == 1, s.log(i)[-2000:]  # named once
        last = s.rows(i)[-1]
        assert last["round"] == 6 and last["exchanged"] == {0: [4], 2: [], 4: [0]}[i], s.rows(i)


def test_a_peer_with_another_rank_is_refused_in_under_a_round(tiny_overrides: list[str], tmp_path: Path) -> None:
    """peft.r=4 on host 0 and peft.r=8 on host 1: each prints one line naming peft.r before its first round
    ends, neither mixes the other, both finish."""
    overrides = _base(tiny_overrides, ("train.rounds=", "peft.r=")) + ["train.rounds=1", "swarm.name=nsm"]
    overrides += ["swarm.round_timeout_s=30", "swarm.startup_timeout_s=30", "eval.clients=false"]
    with Hosts(2) as hosts:
        s = NetSwarm(hosts, tmp_path / "swarm", 2)
        s.start(overrides, per_peer={0: ["peft.r=4"], 1: ["peft.r=8"]})
        codes = s.wait(120)
        assert codes == {0: 0, 1: 0}, [s.log(i)[-2500:] for i in range(2)]
    assert not hosts.leftovers()
    for i in range(2):
        lines = [x for x in s.log(i).splitlines() if "runs another experiment" in x]
        assert len(lines) == 1 and "differs in peft.r;" in lines[0], s.log(i)[-2000:]
        row = json.loads((s.folder(i) / "swarm" / "live.jsonl").read_text().splitlines()[0])
        assert row["exchanged"] == [] and "another experiment" in row["failed"][str(1 - i)]
        assert row["exchange_s"] < 30  # refused, not waited out


def test_harness_leaves_nothing_behind_when_a_test_fails(tmp_path: Path) -> None:
    hosts = Hosts(2)
    with pytest.raises(RuntimeError):
        with hosts:
            hosts.popen(0, ["sleep", "600"], tmp_path / "sleep.log")
            raise RuntimeError("a failing test")
    assert not hosts.leftovers() and all(p.poll() is not None for p in hosts.procs)
