"""runtime=swarm on hivemind, on loopback only (127.0.0.1), every process killed at the end.

The end-to-end tests run ``declora swarm`` (one launcher that forks one peer per client, each in its own
process group); the node tests start SwarmNodes (a p2p daemon each) inside this process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from ranks import run_swarm as _swarm

from declora.comm.messages import MessageRejected, encode, make_header, receive
from declora.config import ConfigError, load_config

pytest.importorskip("hivemind")
pytestmark = pytest.mark.distributed

from declora.comm.swarm_net import Allowlist, SwarmNode, peer_id_of  # noqa: E402


# -- message checks (no network) -----------------------------------------------------------------------------
def _msg(value: float = 1.0) -> dict[str, torch.Tensor]:
    return {"a": torch.full((2, 3), value), "b": torch.arange(4, dtype=torch.float64)}


def test_receive_accepts_a_good_message_bit_for_bit() -> None:
    m = _msg(0.5)
    got = receive(make_header(m, 3, 7), encode(m), _msg(), sender=3, round_=7)
    assert all(torch.equal(got[n], m[n]) and got[n].dtype == m[n].dtype for n in m)


@pytest.mark.parametrize(
    ("bad", "sender", "round_", "reason"),
    [
        ({"a": torch.full((3, 2), 1.0)}, 3, 7, "wrong tensor shapes"),
        ({"a": torch.full((2, 3), 1.0, dtype=torch.float16)}, 3, 7, "wrong tensor dtypes"),
        ({"c": torch.full((2, 3), 1.0)}, 3, 7, "wrong tensor names"),
        ({"a": torch.tensor([[1.0, float("nan"), 1.0], [1, 1, 1]])}, 3, 7, "non-finite values in a"),
        ({"b": torch.tensor([0.0, float("inf"), 0, 0], dtype=torch.float64)}, 3, 7, "non-finite values in b"),
        ({}, 3, 8, "stale or future round 7"),
        ({}, 2, 7, "claims to come from client 3"),
    ],
)
def test_receive_rejects_and_names_the_sender(bad: dict, sender: int, round_: int, reason: str) -> None:
    m = _msg() | bad
    with pytest.raises(MessageRejected, match=f"client {sender} in round {round_}: .*{reason}"):
        receive(make_header(m, 3, 7), encode(m), _msg(), sender=sender, round_=round_)


def test_receive_rejects_a_payload_that_disagrees_with_its_header() -> None:
    m = _msg()
    with pytest.raises(MessageRejected, match="payload of 55 bytes, the header describes 56"):
        receive(make_header(m, 3, 7), encode(m)[:-1], _msg(), sender=3, round_=7)


def test_swarm_options_are_checked() -> None:
    base = ["runtime=swarm", "train.clients=4"]
    for bad, option in [
        ("swarm.round_timeout_s=nan", "swarm.round_timeout_s"),
        ("swarm.record_ttl_s=0", "swarm.record_ttl_s"),
        ("swarm.client_id=4", "swarm.client_id"),
        ("swarm.port=70000", "swarm.port"),
        ("train.algorithm=fedavg", "runtime=swarm"),
        ("comm.error_feedback=true", "comm.error_feedback"),
    ]:
        with pytest.raises(ConfigError, match=option.replace(".", r"\.")):
            load_config(overrides=[*base, bad])


def test_allowlist_file(tmp_path: Path) -> None:
    f = tmp_path / "allow.txt"
    f.write_text("# peers\nQmA 0\nQmB\n")
    allow = Allowlist.load(f)
    assert allow.allows("QmA", 0) and not allow.allows("QmA", 1) and allow.allows("QmB", 5)
    assert not allow.allows("QmC")
    f.write_text("QmA zero\n")
    with pytest.raises(ConfigError, match="allow.txt:1"):
        Allowlist.load(f)


# -- nodes in this process ---------------------------------------------------------------------------------
def _opts(initial: list[str]) -> SimpleNamespace:
    return SimpleNamespace(
        host="127.0.0.1",
        port=0,
        initial_peers=initial,
        announce_maddrs=[],
        use_relay=False,
        use_auto_relay=False,
        round_timeout_s=4.0,
        startup_timeout_s=30.0,
        record_ttl_s=10.0,
        name="test",
    )


def test_allowlist_refuses_a_stranger_and_bad_messages_are_dropped(tmp_path: Path) -> None:
    """Client 0 (B) and client 1 (A) are allowed; a stranger C announcing itself as client 0 is refused by
    A and ignored in A's DHT view; B's wrong-shape and NaN messages are dropped by A, naming client 0."""
    keys = {n: tmp_path / f"{n}.key" for n in "ABC"}
    ids = {n: peer_id_of(k) for n, k in keys.items()}
    allow = Allowlist({ids["A"]: 1, ids["B"]: 0})
    logs: dict[str, list[str]] = {n: [] for n in "ABC"}
    nodes: list[SwarmNode] = []
    try:
        a = SwarmNode(1, [0], _opts([]), keys["A"], allow, logs["A"].append)
        nodes.append(a)
        first = a.start()
        b = SwarmNode(0, [1], _opts(first), keys["B"], allow, logs["B"].append)
        c = SwarmNode(0, [1], _opts(first), keys["C"], None, logs["C"].append)
        nodes += [b, c]
        b.start(), c.start()
        for n in (a, b, c):
            n.set_finished(0)
        assert a.records()[0].peer == ids["B"]  # C's record (same client id, not allowed) is ignored

        def both(t: int, msg_b: dict, msg_c: dict | None = None) -> dict:
            out: dict = {}
            runs = [("A", a, _msg(1.0)), ("B", b, msg_b)] + ([("C", c, msg_c)] if msg_c is not None else [])
            threads = [
                threading.Thread(target=lambda k=k, n=n, m=m: out.__setitem__(k, n.exchange(t, m, [1 - n.client])))
                for k, n, m in runs
            ]
            for th in threads:
                th.start()
            for th in threads:
                th.join(30)
            return out

        out = both(1, _msg(3.0), _msg(5.0))  # B and the stranger C both try to exchange with A
        assert torch.equal(out["A"][0][0]["a"], _msg(3.0)["a"]) and set(out["A"][0]) == {0}
        assert torch.equal(out["B"][0][1]["a"], _msg(1.0)["a"])
        assert out["C"][0] == {} and "not allowed" in out["C"][1][1]
        assert any(f"refused peer {ids['C']}" in line for line in logs["A"])

        wrong = {"a": torch.ones(3, 2), "b": _msg()["b"]}
        out = both(2, wrong)
        assert out["A"][0] == {} and out["B"][0] == {}
        assert any("client 0 in round 2: wrong tensor shapes" in line and ids["B"] in line for line in logs["A"])
        out = both(3, _msg(float("nan")))
        assert out["A"][0] == {} and out["B"][0] == {}
        assert any("client 0 in round 3: non-finite" in line for line in logs["A"])
        out = both(4, _msg(2.0))  # and the edge works again once the messages are good
        assert set(out["A"][0]) == {0} and set(out["B"][0]) == {1}
    finally:
        for n in nodes:
            n.shutdown()


# -- whole swarms ------------------------------------------------------------------------------------------
def _adapters(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def _max_diff(a: Path, b: Path) -> float:
    x, y = _adapters(a), _adapters(b)
    assert x.keys() == y.keys() and x
    return max(float((x[k] - y[k]).abs().max()) for k in x)


def test_four_peers_without_failure_equal_the_simulation(tiny_overrides: list[str], tmp_path: Path) -> None:
    from declora.training.trainer import run

    overrides = [o for o in tiny_overrides if not o.startswith(("out_dir=", "train.clients="))]
    sim = run(load_config(overrides=[*overrides, "train.clients=4", f"out_dir={tmp_path / 'sim'}"]))
    rc, log = _swarm(tmp_path / "swarm", 4, [*overrides, "swarm.round_timeout_s=60"])
    assert rc == 0, log[-3000:]
    summary = json.loads((tmp_path / "swarm" / "summary.json").read_text())
    assert summary["live_per_round"] == {"1": [0, 1, 2, 3], "2": [0, 1, 2, 3]}
    assert summary["edges_per_round"]["2"] == [[0, 1], [0, 3], [1, 2], [2, 3]]
    assert abs(summary["final_accuracy"] - sim["final_accuracy"]) <= 1e-5
    assert _max_diff(tmp_path / "sim/adapters/average", tmp_path / "swarm/adapters/average") <= 1e-5
    for i in range(4):
        assert (
            _max_diff(tmp_path / f"sim/adapters/client_{i}", tmp_path / f"swarm/peer_{i}/adapters/client_{i}") <= 1e-5
        )


def test_a_killed_peer_is_skipped_and_named_and_a_nan_sender_is_ignored(tiny_overrides: list[str], tmp_path) -> None:
    """Ring of 4, 4 rounds: client 2 hangs at the start of round 2 and is SIGKILLed there (with its p2p
    daemon); client 1 sends NaN in round 3. The others finish, name both, and stay finite."""
    overrides = [o for o in tiny_overrides if not o.startswith(("out_dir=", "train.clients=", "train.rounds="))]
    overrides += ["train.rounds=4", "swarm.round_timeout_s=4", "swarm.record_ttl_s=3", "checkpoint_cleanup=false"]
    killed: list[float] = []

    def kill_client_2_in_round_2(out: Path, deadline: float) -> None:
        log = out / "peer_2" / "peer.log"
        while time.monotonic() < deadline:
            if log.is_file() and "client 2 hangs at round 2" in log.read_text(errors="replace"):
                os.killpg(int((out / "peer_2" / "pid").read_text()), signal.SIGKILL)
                killed.append(time.monotonic())
                return
            time.sleep(0.05)

    env = {"DECLORA_FAULT": "2@2:hang", "DECLORA_POISON": "1@3:nan"}
    rc, log = _swarm(tmp_path / "s", 4, overrides, env, on_start=kill_client_2_in_round_2)
    assert killed, log[-3000:]
    s = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert s["exit_codes"] == {"0": 0, "1": 0, "2": -signal.SIGKILL, "3": 0}, log[-3000:]
    assert rc == 1  # the launcher reports that not every peer finished
    assert s["live_per_round"] == {"1": [0, 1, 2, 3], "2": [0, 1, 3], "3": [0, 1, 3], "4": [0, 1, 3]}
    assert s["edges_per_round"]["2"] == [[0, 1], [0, 3]] and s["edges_per_round"]["3"] == [[0, 3]]
    assert s["one_sided_edges"] == {} and s["averaged_over"] == [0, 1, 3]
    peer2 = s["peers"]["2"]["peer"]
    for i in (1, 3):  # each neighbour of the dead peer names it, once
        text = (tmp_path / "s" / f"peer_{i}" / "peer.log").read_text()
        assert text.count(f"neighbour client 2 (peer {peer2}) is absent from round 2 on") == 1, text[-2000:]
    text = (tmp_path / "s" / "peer_0" / "peer.log").read_text()  # client 1's live neighbour names it
    assert "dropped the message of client 1 in round 3: non-finite values" in text
    for i in (0, 1, 3):  # no state, published adapter or checkpoint became non-finite
        folder = tmp_path / "s" / f"peer_{i}"
        state = torch.load(folder / "swarm" / "state.pt", weights_only=True)["state"]
        assert all(torch.isfinite(t).all() for t in state.values())
        for ckpt in folder.glob("checkpoints/round_*/*.pt"):
            params = torch.load(ckpt, weights_only=True)["clients"][i]["params"]
            assert all(torch.isfinite(t).all() for t in params.values()), ckpt


def _peer_rows(folder: Path) -> list[dict]:
    live = folder / "swarm" / "live.jsonl"
    return [json.loads(x) for x in live.read_text().splitlines() if x.strip()]


def _finite_state(folder: Path) -> bool:
    state = torch.load(folder / "swarm" / "state.pt", weights_only=True)["state"]
    return all(bool(torch.isfinite(t).all()) for t in state.values())


def test_a_fifth_peer_joins_a_running_swarm_and_finishes(tiny_overrides: list[str], tmp_path: Path) -> None:
    """Ring of 5, 4 rounds of >= 2 s: peer 4 starts only once peer 0 finished round 1; it starts from the
    mean of its neighbours' adapters, exchanges with both in the rounds it runs, and everyone exits 0."""
    overrides = [o for o in tiny_overrides if not o.startswith(("out_dir=", "train.clients=", "train.rounds="))]
    # peers 0 and 3 wait swarm.startup_timeout_s for peer 4 at start, within the others' round-1 deadline;
    # every round starts with a 2 s sleep, so that the others are still running when peer 4 joins
    overrides += ["train.rounds=4", "swarm.round_timeout_s=15", "swarm.startup_timeout_s=10", "swarm.record_ttl_s=3"]
    overrides += ["eval.clients=false"]
    out = tmp_path / "s"
    full = [*overrides, "--late", "4@2"]
    rc, log = _swarm(out, 5, full, {"DECLORA_ROUND_DELAY": "2"}, timeout=110)
    assert rc == 0, log[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["exit_codes"] == {str(i): 0 for i in range(5)}
    assert 4 not in s["live_per_round"]["1"] and s["live_per_round"]["4"] == [0, 1, 2, 3, 4]
    assert [0, 4] in s["edges_per_round"]["4"] and [3, 4] in s["edges_per_round"]["4"]
    assert s["one_sided_edges"] == {} and s["averaged_over"] == [0, 1, 2, 3, 4]
    text = (out / "peer_4" / "peer.log").read_text()
    assert "starting from the adapters of clients [0, 3]" in text, text[-2000:]
    rows = _peer_rows(out / "peer_4")
    assert rows[0]["round"] >= 2 and rows[-1]["round"] == 4  # joined during the run, finished it
    assert all(r["exchanged"] == [0, 3] for r in rows), rows
    assert all(_finite_state(out / f"peer_{i}") for i in range(5))


def test_a_killed_peer_restarted_with_its_identity_resumes_from_its_checkpoint(
    tiny_overrides: list[str], tmp_path: Path
) -> None:
    """Ring of 4, 7 rounds of >= 2 s: client 2 hangs at round 3 and is SIGKILLed; `declora peer
    resume=<its run dir>` (same identity key, same allowlist) resumes from its round-2 checkpoint,
    rejoins at the swarm's round and finishes; its neighbours exchange with it again."""
    overrides = [o for o in tiny_overrides if not o.startswith(("out_dir=", "train.clients=", "train.rounds="))]
    overrides += ["train.rounds=7", "swarm.round_timeout_s=8", "swarm.record_ttl_s=3", "eval.clients=false"]
    out = tmp_path / "s"
    env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "DECLORA_ROUND_DELAY": "2"}
    warm = (  # imports done while the swarm starts: the restart then takes seconds, not a minute
        "import sys, torch, transformers, peft, hivemind, declora.training.trainer, declora.comm.swarm\n"
        "sys.stdin.readline()\nfrom declora.cli.app import main\nsys.exit(main(sys.argv[1:]))\n"
    )
    cmd = [sys.executable, "-c", warm, "peer", f"resume={out / 'peer_2'}"]
    restart_log = tmp_path / "restart.log"
    with restart_log.open("w") as logf:
        restart = subprocess.Popen(
            cmd, env=env, stdin=subprocess.PIPE, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True
        )
    killed: list[float] = []

    def kill_and_restart_client_2(out: Path, deadline: float) -> None:
        log = out / "peer_2" / "peer.log"
        while time.monotonic() < deadline:
            if log.is_file() and "client 2 hangs at round 3" in log.read_text(errors="replace"):
                os.killpg(int((out / "peer_2" / "pid").read_text()), signal.SIGKILL)
                killed.append(time.monotonic())
                restart.stdin.write(b"go\n")
                restart.stdin.flush()
                return
            time.sleep(0.05)

    try:
        env_swarm = {"DECLORA_FAULT": "2@3:hang", "DECLORA_ROUND_DELAY": "2"}
        rc, log = _swarm(out, 4, overrides, env_swarm, on_start=kill_and_restart_client_2, timeout=110)
        restart_rc = restart.wait(timeout=60)
    finally:
        try:
            os.killpg(restart.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        restart.wait()
    text = restart_log.read_text(errors="replace")
    assert killed and restart_rc == 0, text[-3000:]
    assert "resumed from its checkpoint of round 2; rejoins at round" in text, text[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["exit_codes"] == {"0": 0, "1": 0, "2": -signal.SIGKILL, "3": 0}, log[-3000:]
    rows = _peer_rows(out / "peer_2")
    assert [r["round"] for r in rows[:2]] == [1, 2] and rows[-1]["round"] == 7  # before the kill, after restart
    assert rows[-1]["exchanged"] == [1, 3] and [1, 2] in s["edges_per_round"]["7"]
    assert {r["peer"] for r in rows} == {s["peers"]["2"]["peer"]}  # one identity throughout
    assert _finite_state(out / "peer_2")
