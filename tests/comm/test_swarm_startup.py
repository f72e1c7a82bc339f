"""runtime=swarm start-up on loopback: a neighbour that never starts, and peers whose clocks are minutes off.

Whole swarms run through ``declora swarm`` (see ``_swarm`` in test_swarm.py); every process is killed at the end.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from declora.config import ConfigError, load_config

pytest.importorskip("hivemind")
pytestmark = pytest.mark.distributed

from test_swarm import _max_diff, _peer_rows, _swarm  # noqa: E402 - tests/comm is on sys.path (rootdir-less tests)


def test_neighbour_wait_is_checked() -> None:
    base = ["runtime=swarm", "train.clients=3"]
    assert load_config(overrides=[*base, "swarm.neighbour_wait_s=0"]).swarm.neighbour_wait_s == 0
    for bad in ("-1", "nan", "inf"):
        with pytest.raises(ConfigError, match=r"swarm\.neighbour_wait_s=.* must be a finite number >= 0"):
            load_config(overrides=[*base, f"swarm.neighbour_wait_s={bad}"])


def test_the_clock_hook_reaches_every_hivemind_module() -> None:
    """In a child process (it patches the clock): a skew reaches hivemind's by-name copies of get_dht_time,
    and set_offset(-skew) brings every one of them back to the true time."""
    code = (
        "import os, sys, time\n"
        "true = time.time\n"
        "import hivemind.dht.node, hivemind.dht.protocol, hivemind.dht.routing, hivemind.utils.timed_storage as ts\n"
        "from declora.fault_injection import skew_clock\n"
        "from declora.comm import swarm_clock\n"
        "mods = [hivemind.dht.node, hivemind.dht.protocol, hivemind.dht.routing, ts, hivemind.utils]\n"
        "assert skew_clock(0) == 0 and skew_clock(1) == 300\n"
        "print([round(m.get_dht_time() - true()) for m in mods])\n"
        "swarm_clock.set_offset(-300)\n"
        "print([round(m.get_dht_time() - true()) for m in mods], round(swarm_clock.now() - true()))\n"
    )
    env = {"DECLORA_FAULT_CLOCK_SKEW_S": "1:300,2:-300", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[:2] == ["[300, 300, 300, 300, 300]", "[0, 0, 0, 0, 0] 0"], out.stdout
    bad = subprocess.run(
        [sys.executable, "-c", "from declora.fault_injection import skew_clock; skew_clock(1)"],
        env={"DECLORA_FAULT_CLOCK_SKEW_S": "1=300"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode != 0 and "DECLORA_FAULT_CLOCK_SKEW_S='1=300'" in bad.stderr


def _base(tiny_overrides: list[str]) -> list[str]:
    """The tiny run's overrides without out_dir and train.clients (``declora swarm --clients`` sets those)."""
    return [o for o in tiny_overrides if not o.startswith(("out_dir=", "train.clients="))]


def test_a_neighbour_that_never_starts_delays_round_1_by_neighbour_wait_only(
    tiny_overrides: list[str], tmp_path: Path
) -> None:
    """Ring of 3, peer 2 never starts (``--late 2@99``, past the last round): peers 0 and 1 find each other,
    wait swarm.neighbour_wait_s=3 for peer 2 (not startup_timeout_s=400), run both rounds together, name
    peer 2 once as absent, and exit 0."""
    overrides = _base(tiny_overrides)
    overrides += ["swarm.startup_timeout_s=400", "swarm.neighbour_wait_s=3", "swarm.round_timeout_s=20"]
    t0 = time.monotonic()
    rc, log = _swarm(tmp_path / "s", 3, [*overrides, "--late", "2@99"], timeout=200)
    took = time.monotonic() - t0
    s = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert s["exit_codes"]["0"] == 0 and s["exit_codes"]["1"] == 0, log[-3000:]
    assert rc == 1  # peer 2 never ran
    assert took < 200  # waiting swarm.startup_timeout_s for peer 2 would take 400 s
    for i in (0, 1):
        text = (tmp_path / "s" / f"peer_{i}" / "peer.log").read_text()
        line = f"starts round 1 with neighbours [{1 - i}]: neighbours [2] not in the swarm 3 s after the first"
        assert text.count(line) == 1 and "(swarm.neighbour_wait_s)" in text, text[-3000:]
        assert len(re.findall(r"neighbour client 2 \(.*\) is absent from round 1 on", text)) == 1, text[-3000:]
        assert "is absent from round 2" not in text
        rows = _peer_rows(tmp_path / "s" / f"peer_{i}")
        assert [r["round"] for r in rows] == [1, 2] and all(r["exchanged"] == [1 - i] for r in rows), rows
    assert s["live_per_round"] == {"1": [0, 1], "2": [0, 1]}


def test_peers_whose_clocks_are_minutes_off_equal_the_simulation(tiny_overrides: list[str], tmp_path: Path) -> None:
    """Ring of 3: client 1's clock is 300 s ahead, client 2's 300 s behind (DECLORA_FAULT_CLOCK_SKEW_S);
    each corrects its DHT clock against peer 0 (one line each), and the run equals the simulation's."""
    from declora.training.trainer import run

    overrides = _base(tiny_overrides)
    sim = run(load_config(overrides=[*overrides, "train.clients=3", f"out_dir={tmp_path / 'sim'}"]))
    swarm_overrides = [*overrides, "swarm.round_timeout_s=60"]
    env = {"DECLORA_FAULT_CLOCK_SKEW_S": "1:300,2:-300"}
    rc, log = _swarm(tmp_path / "swarm", 3, swarm_overrides, env, timeout=200)
    assert rc == 0, log[-3000:]
    summary = json.loads((tmp_path / "swarm" / "summary.json").read_text())
    assert summary["live_per_round"] == {"1": [0, 1, 2], "2": [0, 1, 2]}
    assert abs(summary["final_accuracy"] - sim["final_accuracy"]) <= 1e-5
    assert _max_diff(tmp_path / "sim/adapters/average", tmp_path / "swarm/adapters/average") <= 1e-5
    for i in range(3):
        assert (
            _max_diff(tmp_path / f"sim/adapters/client_{i}", tmp_path / f"swarm/peer_{i}/adapters/client_{i}") <= 1e-5
        )
    pattern = r"clock is [\d.]+ s (?:behind|ahead of) the swarm's .*corrected its clock by ([+-][\d.]+) s"
    for i, expected in ((0, None), (1, -300.0), (2, 300.0)):
        text = (tmp_path / "swarm" / f"peer_{i}" / "peer.log").read_text()
        found = [float(x) for x in re.findall(pattern, text)]
        if expected is None:  # peer 0 started the swarm: its clock is the swarm's
            assert found == [], text[-3000:]
        else:
            assert len(found) == 1 and abs(found[0] - expected) < 2, text[-3000:]


def test_clocks_stepped_after_joining_change_nothing(tiny_overrides: list[str], tmp_path: Path) -> None:
    """Ring of 3 on true clocks: client 1's wall clock steps 60 s ahead when round 2 starts, client 2's 60 s
    back when round 3 starts (DECLORA_FAULT_CLOCK_SKEW_S with @round). The swarm's time runs on the monotonic
    clock once set, so every edge is kept and the run equals the simulation; before, the stepped peers' records
    looked forged or expired and they were cut off."""
    from declora.training.trainer import run

    overrides = [o for o in _base(tiny_overrides) if not o.startswith("train.rounds=")] + ["train.rounds=4"]
    sim = run(load_config(overrides=[*overrides, "train.clients=3", f"out_dir={tmp_path / 'sim'}"]))
    env = {"DECLORA_FAULT_CLOCK_SKEW_S": "1:60@2,2:-60@3", "DECLORA_ROUND_DELAY": "1"}
    rc, log = _swarm(
        tmp_path / "swarm", 3, [*overrides, "swarm.round_timeout_s=60", "swarm.record_ttl_s=4"], env, timeout=240
    )
    assert rc == 0, log[-3000:]
    assert "the clock jumps to +60 s at round 2" in (tmp_path / "swarm/peer_1/peer.log").read_text()
    assert "the clock jumps to -60 s at round 3" in (tmp_path / "swarm/peer_2/peer.log").read_text()
    summary = json.loads((tmp_path / "swarm" / "summary.json").read_text())
    assert summary["live_per_round"] == {str(t): [0, 1, 2] for t in range(1, 5)}, summary["live_per_round"]
    edges = summary["edges_per_round"]
    assert all(edges[str(t)] == [[0, 1], [0, 2], [1, 2]] for t in range(1, 5)), edges
    assert abs(summary["final_accuracy"] - sim["final_accuracy"]) <= 1e-5
    assert _max_diff(tmp_path / "sim/adapters/average", tmp_path / "swarm/adapters/average") <= 1e-5
