"""runtime=swarm under attack (issue 25): 4 peers on loopback, client 3 sends a scaled update.

The three honest peers must finish, name the attacker in their logs (client id and peer ID), and their
averaged model (``declora swarm``'s ``adapters/average``, the attacker left out) must stay with a 3-peer honest
swarm's under clipped_gossip, while the same attack under plain gossip moves it. Every peer is given
``byzantine.peers=[3]``: the peer whose client id is listed attacks; ``declora swarm`` leaves it out of the average.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from ranks import run_swarm

from declora.mixing.kernel import average_states, squared_distance

pytest.importorskip("hivemind")
pytestmark = pytest.mark.distributed

ROUNDS = 5  # the attacker knows nobody's state in round 1; flagging needs 3 cut rounds: rounds 2-4 at the earliest
# strength 50, not the default 10: a swarm attacker only knows last round's states, and at 10 it moved the
# plain-gossip honest average only 2x the yardstick below (at 50: 200x)
ATTACK = ["byzantine.peers=[3]", "byzantine.attack=scaled_update", "byzantine.strength=50"]


def _honest_average(out: Path, honest: list[int]) -> dict[str, torch.Tensor]:
    """The mean of the honest peers' published final states (what ``adapters/average`` holds)."""
    states = [torch.load(out / f"peer_{i}" / "swarm" / "state.pt", weights_only=True)["state"] for i in honest]
    return average_states(states)


def test_honest_peers_name_the_attacker_and_keep_the_honest_model(tiny_overrides: list[str], tmp_path: Path) -> None:
    """Four swarms of 5 rounds on a complete graph (~13 s each): 3 honest peers (the issue's reference), 4 honest
    peers (how far the honest average moves just by having a 4th honest peer: the yardstick), and 3 honest +
    client 3 attacking, under clipped_gossip and under plain gossip.

    The tiny random BERT predicts one class whatever its adapters (every run here scores the same accuracy),
    so the issue's "within 3 pp" holds trivially; the states carry the test: under clipped_gossip the honest
    average is no farther from the 3-peer swarm's than a 4th honest peer puts it, under plain gossip it is
    thrown far away (measured: 1.16x and 201x that yardstick, in squared distance).
    """
    base = [o for o in tiny_overrides if not o.startswith(("out_dir=", "train.clients=", "train.rounds="))]
    base += [f"train.rounds={ROUNDS}", "topology.kind=complete", "swarm.round_timeout_s=30", "eval.clients=false"]
    base += ["checkpoint_every=0"]
    runs = {
        "honest3": (3, []),
        "honest4": (4, []),
        "robust": (4, [*ATTACK, "comm.robust=clipped_gossip"]),
        "plain": (4, ATTACK),
    }
    summaries = {}
    for name, (clients, extra) in runs.items():
        rc, log = run_swarm(tmp_path / name, clients, [*base, *extra], timeout=120)
        assert rc == 0, log[-3000:]
        summaries[name] = s = json.loads((tmp_path / name / "summary.json").read_text())
        assert s["exit_codes"] == {str(i): 0 for i in range(clients)}  # every peer, the attacker too, finished
        assert s["live_per_round"] == {str(t): list(range(clients)) for t in range(1, ROUNDS + 1)}, log[-3000:]
    robust = summaries["robust"]
    assert robust["byzantine_peers"] == [3] and robust["averaged_over"] == [0, 1, 2]

    # each honest peer names the attacker once, by client id and peer ID, and lists it in its summary
    attacker = robust["peers"]["3"]["peer"]
    for i in (0, 1, 2):
        text = (tmp_path / "robust" / f"peer_{i}" / "peer.log").read_text(errors="replace")
        assert text.count(f"client {i} suspects neighbour client 3 (peer {attacker})") == 1, text[-2000:]
        assert robust["peers"][str(i)]["suspects"] == [3]

    # the honest peers' averaged model against the 3-peer honest swarm's
    assert abs(robust["final_accuracy"] - summaries["honest3"]["final_accuracy"]) <= 0.03
    reference = _honest_average(tmp_path / "honest3", [0, 1, 2])
    moved = {n: squared_distance(_honest_average(tmp_path / n, [0, 1, 2]), reference) for n in runs if n != "honest3"}
    print(f"squared distance of the honest average to the 3-peer swarm's: {moved}")  # shown with -s
    assert moved["robust"] <= 2 * moved["honest4"], moved
    assert moved["plain"] >= 20 * moved["honest4"], moved  # the attack is real: plain gossip does not resist it
