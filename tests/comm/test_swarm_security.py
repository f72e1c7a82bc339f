"""The swarm against strangers and mismatched peers: SwarmNodes (one p2p daemon each) in this process, loopback.

Each test reproduces one hole of issue 26 (forged or far-future DHT records, an oversized request, a huge
round, an open listener, a peer of another experiment, a peer started before its bootstrap peer, a
skewed clock, a straggler, an open relay) and checks that it is closed.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from declora.comm.messages import MessageRejected, encode, make_header, receive
from declora.config import ConfigError, load_config

pytest.importorskip("hivemind")
pytestmark = pytest.mark.distributed

from declora.comm.swarm_clock import check_clocks  # noqa: E402
from declora.comm.swarm_fingerprint import Fingerprint  # noqa: E402
from declora.comm.swarm_net import Allowlist, SwarmNode, _p2p_class, peer_id_of  # noqa: E402
from declora.comm.swarm_protocol import HANDLER  # noqa: E402
from declora.comm.swarm_wire import REFUSED, read_frame  # noqa: E402


def _opts(initial: list[str], port: int = 0, **more) -> SimpleNamespace:
    base = dict(
        host="127.0.0.1",
        port=port,
        initial_peers=initial,
        announce_maddrs=[],
        use_relay=False,
        use_auto_relay=False,
        round_timeout_s=4.0,
        startup_timeout_s=30.0,
        record_ttl_s=10.0,
        name="sec",
        straggler_wait_s=0.5,
    )
    return SimpleNamespace(**(base | more))


def _msg(value: float = 1.0) -> dict[str, torch.Tensor]:
    return {"a": torch.full((2, 3), value), "b": torch.arange(4, dtype=torch.float64)}


class Swarm:
    """Nodes started in order (the first is the bootstrap peer); every one shut down at the end."""

    def __init__(self, tmp: Path) -> None:
        self.tmp, self.nodes, self.logs = tmp, [], {}

    def start(self, name: str, client: int, neighbours: list[int], allow=None, run=None, first=None, **opts):
        first = (self.nodes[0].maddrs[:1] if self.nodes else []) if first is None else first
        self.logs[name] = []
        node = SwarmNode(
            client,
            neighbours,
            _opts(first, **opts),
            self.tmp / f"{name}.key",
            allow,
            self.logs[name].append,
            run,
            4,
            50,
        )
        self.nodes.append(node)
        node.start()
        return node

    def close(self) -> None:
        for n in self.nodes:
            n.shutdown()


@pytest.fixture
def swarm(tmp_path: Path):
    s = Swarm(tmp_path)
    try:
        yield s
    finally:
        s.close()


def _exchange_all(t: int, pairs: list[tuple[SwarmNode, dict]]) -> list:
    out: list = [None] * len(pairs)

    def go(k: int, node: SwarmNode, msg: dict) -> None:
        out[k] = node.exchange(t, msg, node.neighbours)

    threads = [threading.Thread(target=go, args=(k, n, m)) for k, (n, m) in enumerate(pairs)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    return out


def _stranger_call(node: SwarmNode, stranger: SwarmNode, header: dict, payload_size: int, chunk: int = 1 << 20):
    """The stranger opens a raw stream to ``node``'s handler, announces ``payload_size`` bytes and streams
    them in 1 MB chunks (the same bytes object: the sender itself holds 1 MB); returns the answer or None."""

    async def go():
        import json

        from hivemind.p2p import PeerID

        _, reader, writer = await stranger.p2p.call_binary_stream_handler(PeerID.from_base58(node.peer_id), HANDLER)
        raw = json.dumps(header).encode()
        try:
            writer.write(len(raw).to_bytes(4, "big") + raw + payload_size.to_bytes(8, "big"))
            await writer.drain()
        except ConnectionError:  # refused (stream reset) before the header was flushed: a refusal too
            pass
        answer = None
        try:  # a peer that reads the payload first would answer only after it: then this times out
            answer = (await asyncio.wait_for(read_frame(reader, 0), 5))[0]
        except Exception:  # noqa: BLE001 - no answer, or the stream was closed on it
            pass
        block = b"\0" * chunk
        try:
            for _ in range(payload_size // chunk):
                writer.write(block)
                await asyncio.wait_for(writer.drain(), 5)
        except (ConnectionError, asyncio.TimeoutError):
            pass
        writer.close()
        return answer

    return stranger.call(go(), timeout=60)


# -- discovery -----------------------------------------------------------------------------------------------
def test_forged_and_far_future_records_change_nothing(swarm: Swarm) -> None:
    """A stranger (a bare hivemind DHT node, no validators) writes client 0's record with round 1,000,000 and a
    far-future expiry, in the old subkey format and under B's owner key: A still sees B's own record, B's
    later refreshes still land, and the stranger's own record (not allowlisted) is ignored too."""
    from hivemind.dht.node import DHTNode
    from hivemind.p2p import P2P
    from hivemind.utils import get_dht_time

    ids = {n: peer_id_of(swarm.tmp / f"{n}.key") for n in "AB"}
    allow = Allowlist({ids["A"]: 1, ids["B"]: 0})
    a = swarm.start("A", 1, [0], allow)
    b = swarm.start("B", 0, [1], allow)
    b.set_finished(2)

    async def forge():
        value = {"client": 0, "peer": ids["B"], "round": 1_000_000, "maddrs": [], "fp": "", "keys": {}, "t": 0.0}
        far = get_dht_time() + 10**7
        attempts = [  # one fresh stranger node each: hivemind's own storage cannot mix str and bytes subkeys
            (a.key, value | {"maddrs": a.maddrs}, far, f"0/{ids['B']}"),
            (a.key, value, far, b.subkey),  # B's public key, the stranger's signature: none
            (a.key, value, get_dht_time() + 5, b"x"),
            ("other.key", b"x" * 100_000, get_dht_time() + 10**6, None),  # memory on other keys
        ]
        ok = []
        for key, v, expires, subkey in attempts:
            p2p = await P2P.create(initial_peers=a.maddrs[:1])
            dht = await DHTNode.create(p2p=p2p, initial_peers=a.maddrs[:1])
            ok.append(await dht.store(key, v, expires, subkey=subkey))
            await dht.shutdown(), await p2p.shutdown()
        return ok

    stored = a.call(forge(), timeout=60)
    seen = a.records()
    assert set(seen) == {0} and seen[0].peer == ids["B"] and seen[0].round == 2, seen
    b.set_finished(3)  # the owner's refresh is not blocked by the forgery's expiry
    assert a.records()[0].round == 3
    assert a.dht.protocol.storage.get(__import__("hivemind").dht.routing.DHTID.generate(source="other.key")) is None
    assert any("ignored a DHT record" in line for line in swarm.logs["A"]), swarm.logs["A"]
    assert stored[0] is not True or seen[0].round != 1_000_000  # whatever the stranger was told, nothing changed


def test_records_must_be_signed_by_the_peer_they_name(tmp_path: Path) -> None:
    """The validator alone: a record naming another peer than its owner key, a far-future expiry, a round out of
    range, an extra field, an unsigned subkey and a non-allowlisted peer are all refused; the honest one passes."""
    from hivemind.dht.protocol import DHTProtocol
    from hivemind.dht.routing import DHTID
    from hivemind.dht.validation import CompositeValidator, DHTRecord
    from hivemind.utils import get_dht_time

    from declora.comm.swarm_records import make_validator, record_subkey, signature_validator, signing_key

    ka, kb = tmp_path / "a.key", tmp_path / "b.key"
    ida, idb = peer_id_of(ka), peer_id_of(kb)
    ska, skb = signing_key(ka), signing_key(kb)
    why: list[str] = []
    check = make_validator("k.peers", 4, 10, 20.0, Allowlist({ida: 0, idb: None}), why.append)
    ser = DHTProtocol.serializer
    key = DHTID.generate(source="k.peers").to_bytes()

    def record(sk, value: dict, ttl: float = 20.0, subkey=None) -> DHTRecord:
        sub = ser.dumps(record_subkey(sk) if subkey is None else subkey)
        raw = DHTRecord(key, sub, ser.dumps(value), get_dht_time() + ttl)
        signed = CompositeValidator([signature_validator(sk), check]).sign_value(raw)
        return DHTRecord(key, sub, signed, raw.expiration_time)

    full = CompositeValidator([signature_validator(ska), check])
    good = {"client": 0, "peer": ida, "round": 3, "maddrs": ["/ip4/1.2.3.4/tcp/1"], "fp": "f", "keys": {}, "t": 1.0}
    assert full.validate(record(ska, good))
    bad = [
        record(skb, good),  # B signs a record naming A
        record(ska, good, ttl=10**6),  # far future
        record(ska, good | {"round": 11}),  # beyond train.rounds
        record(ska, good | {"client": 4}),
        record(ska, good | {"extra": 1}),
        record(ska, good | {"round": 3.0}),  # no silent conversion
        record(ska, good, subkey=f"0/{ida}"),  # not an owner key
        record(skb, good | {"peer": idb, "client": 1}, subkey=b"x" + record_subkey(skb)),
    ]
    assert [full.validate(r) for r in bad] == [False] * len(bad)
    ka2 = tmp_path / "c.key"
    idc = peer_id_of(ka2)
    assert not full.validate(record(signing_key(ka2), good | {"peer": idc}))  # not on the allowlist
    assert any("not the owner" in w for w in why) and any("beyond its TTL" in w for w in why)


# -- requests --------------------------------------------------------------------------------------------------
def test_a_stranger_costs_no_memory_and_a_huge_round_is_refused(swarm: Swarm) -> None:
    """Allowlisted A and B; stranger C: a 100 MB request from C is refused before it is read; B (allowed) sends a
    100 MB exchange (not its message size) and a round 200,000 ahead: both refused at once, memory stays low."""
    ids = {n: peer_id_of(swarm.tmp / f"{n}.key") for n in "AB"}
    allow = Allowlist({ids["A"]: 1, ids["B"]: 0})
    a = swarm.start("A", 1, [0], allow)
    b = swarm.start("B", 0, [1], allow)
    c = swarm.start("C", 0, [1], None)
    a.set_finished(0)
    a.outbox[1] = (encode(_msg()), _msg())
    head = make_header(_msg(), 0, 1, a.run.digest, 1) | {"kind": "exchange"}
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        refused = _stranger_call(a, c, head, 100 << 20)
        assert refused is None or REFUSED in refused
        t0 = time.monotonic()
        big = _stranger_call(a, b, head, 100 << 20)
        huge = _stranger_call(a, b, head | {"round": 200_001}, 0)
        took = time.monotonic() - t0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 << 20, f"peak {peak / 2**20:.0f} MB while strangers sent 100 MB"
    assert big is not None and "a payload of 104857600 bytes where 56 are expected" in big[REFUSED], big
    assert huge is not None and "out of bounds" in huge[REFUSED] and took < 10
    assert len(a.failed_in) <= 1  # no per-round bookkeeping for 200,000 skipped rounds
    assert any(f"refused peer {c.peer_id}" in line for line in swarm.logs["A"])


def test_a_peer_of_another_experiment_is_refused_on_both_sides(swarm: Swarm) -> None:
    """peft.r=4 against peft.r=8: each peer names `peft.r`, once, and never mixes the other."""
    base = ["runtime=swarm", "train.clients=2"]
    r4, r8 = (Fingerprint.of(load_config(overrides=[*base, f"peft.r={r}"])) for r in (4, 8))
    a = swarm.start("A", 0, [1], run=r4)
    b = swarm.start("B", 1, [0], run=r8)
    a.set_finished(0), b.set_finished(0)
    t0 = time.monotonic()
    assert a.records() == {} and b.records() == {}
    (ra, fa), (rb, fb) = _exchange_all(1, [(a, _msg(1.0)), (b, _msg(2.0))])
    assert ra == {} and rb == {} and time.monotonic() - t0 < 4.0  # refused within a round, not at its deadline
    assert "another experiment" in fa[1] and "another experiment" in fb[0]
    for name in "AB":
        lines = [x for x in swarm.logs[name] if "runs another experiment" in x]
        assert len(lines) == 1 and "differs in peft.r;" in lines[0], swarm.logs[name]


def test_replayed_messages_are_dropped_and_named() -> None:
    m = _msg()
    header = make_header(m, 3, 7, run="run-a", receiver=1)
    assert torch.equal(receive(header, encode(m), m, 3, 7, run="run-a", receiver=1)["a"], m["a"])
    for kwargs, reason in [
        ({"run": "run-b", "receiver": 1}, "another run"),
        ({"run": "run-a", "receiver": 2}, "addressed to client 1, not 2"),
    ]:
        with pytest.raises(MessageRejected, match=f"client 3 in round 7: .*{reason}"):
            receive(header, encode(m), m, 3, 7, **kwargs)
    with pytest.raises(MessageRejected, match="stale or future round 7"):
        receive(header, encode(m), m, 3, 8, run="run-a", receiver=1)


# -- start-up ----------------------------------------------------------------------------------------------
def test_an_open_listener_needs_an_allowlist_or_swarm_open() -> None:
    with pytest.raises(ConfigError, match=r"swarm\.host=0\.0\.0\.0 .*swarm\.allowlist_file.*swarm\.open=true"):
        load_config(overrides=["runtime=swarm", "swarm.host=0.0.0.0"])
    assert load_config(overrides=["runtime=swarm", "swarm.host=0.0.0.0", "swarm.open=true"]).swarm.open
    assert load_config(overrides=["runtime=swarm"]).swarm.host == "127.0.0.1"  # loopback stays open for trials


def test_relay_service_is_off_unless_asked_for() -> None:
    assert "-relayService=0" in _p2p_class(False)._make_process_args("p2pd", relay=True)
    assert "-relayService=1" in _p2p_class(True)._make_process_args("p2pd", relay=True)


def test_tilde_in_the_identity_path_is_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    pid = peer_id_of("~/keys/peer.key")
    assert (tmp_path / "keys" / "peer.key").is_file() and not Path("~").exists()
    assert peer_id_of(tmp_path / "keys" / "peer.key") == pid


def test_a_peer_started_before_its_bootstrap_peer_retries(swarm: Swarm) -> None:
    """B is started with A's address while A is not up yet: it retries with backoff, naming why, and joins."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    id_a = peer_id_of(swarm.tmp / "A.key")
    logs: list[str] = []
    b = SwarmNode(0, [1], _opts([f"/ip4/127.0.0.1/tcp/{port}/p2p/{id_a}"]), swarm.tmp / "B.key", None, logs.append)
    started: list = []
    th = threading.Thread(target=lambda: started.append(b.start()))
    th.start()
    time.sleep(6)
    swarm.nodes.append(b)
    a = swarm.start("A", 1, [0], first=[], port=port)
    th.join(60)
    assert started and any("bootstrap peers not reachable yet" in x and "retrying in" in x for x in logs), logs
    a.set_finished(0), b.set_finished(0)
    assert a.records()[0].peer == b.peer_id


def test_a_skewed_clock_is_named_with_its_offset(swarm: Swarm) -> None:
    a = swarm.start("A", 0, [1])
    b = swarm.start("B", 1, [0])
    b.clock = lambda: time.time() + 120.0  # B's machine is two minutes ahead
    assert check_clocks(a)
    assert any("clock is 120 s behind peer" in x and "NTP" in x for x in swarm.logs["A"]), swarm.logs["A"]


def test_a_straggler_is_named_and_no_longer_waited_for_in_full(swarm: Swarm) -> None:
    """B is up but never enters a round: A waits round_timeout_s (4 s) in rounds 1-3, then names B and
    waits swarm.straggler_wait_s (0.5 s) from round 4 on."""
    a = swarm.start("A", 0, [1])
    swarm.start("B", 1, [0])
    times = []
    for t in range(1, 5):
        t0 = time.monotonic()
        got, failed = a.exchange(t, _msg(), [1])
        times.append(time.monotonic() - t0)
        assert got == {} and 1 in failed
    assert min(times[:3]) > 3.5 and times[3] < 2.0, times
    assert any("client 1 missed 3 of its last 3 rounds" in x for x in swarm.logs["A"]), swarm.logs["A"]


def test_print_id_gives_the_allowlist_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from declora.launch.swarm import print_peer_id

    monkeypatch.setenv("HOME", str(tmp_path))
    line = print_peer_id(None, ["swarm.client_id=2", "swarm.identity_path=~/p.key", "swarm.host=10.0.0.5"])
    assert line == f"{peer_id_of(tmp_path / 'p.key')} 2" and capsys.readouterr().out.strip() == line
    with pytest.raises(ConfigError, match="--print-id needs swarm.identity_path=FILE or out_dir=DIR"):
        print_peer_id(None, ["swarm.client_id=2"])


def test_declora_peer_print_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from declora.cli.app import main

    monkeypatch.setenv("HOME", str(tmp_path))
    assert main(["peer", "--print-id", "swarm.client_id=1", "swarm.identity_path=~/id.key"]) == 0
    assert capsys.readouterr().out.strip() == f"{peer_id_of(tmp_path / 'id.key')} 1"
