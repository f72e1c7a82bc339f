"""The attack suite (reference definitions), the adversary's view, and robust gossip under attack."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from declora.algorithms import build_algorithm
from declora.byzantine import attacks
from declora.byzantine.adversary import Adversary
from declora.comm import InProcessCommunicator
from declora.config import ByzantineConfig, ConfigError, TopologyConfig, load_config
from declora.config.byzantine import ATTACK_NAMES
from declora.mixing.kernel import average_states, squared_distance
from declora.mixing.topology import Topology

State = dict[str, torch.Tensor]


def states(n: int, seed: int = 0) -> dict[int, State]:
    g = torch.Generator().manual_seed(seed)
    return {i: {"A": torch.randn(3, 5, generator=g) * 0.1, "h": torch.randn(4, generator=g) * 0.1} for i in range(n)}


def test_config_names_match_the_suite() -> None:
    assert ATTACK_NAMES == attacks.ATTACKS and set(attacks.DEFAULT_STRENGTH) == set(ATTACK_NAMES)


def test_attack_formulas() -> None:
    s = states(3)
    own, honest = s[0], [s[0], s[1], s[2]]
    mean = {n: torch.stack([h[n] for h in honest]).mean(0) for n in own}
    flip = attacks.sign_flip(own, 2.0)
    torch.testing.assert_close(flip["A"], -2 * own["A"])
    scaled = attacks.scaled_update(own, honest, 10.0)
    torch.testing.assert_close(scaled["h"], own["h"] + 10 * (own["h"] - mean["h"]))
    alie = attacks.alie(honest, 1.5)
    std = torch.stack([h["A"] for h in honest]).std(0)
    torch.testing.assert_close(alie["A"], mean["A"] - 1.5 * std)
    torch.testing.assert_close(attacks.ipm(honest, 0.1)["h"], -0.1 * mean["h"])
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(attacks.gaussian(own, 1.0, g1)["A"], attacks.gaussian(own, 1.0, g2)["A"])
    assert torch.equal(attacks.flip_labels(torch.tensor([0, 1, 1]), 2), torch.tensor([1, 0, 0]))


def test_dissensus_reverses_the_targets_gossip_step() -> None:
    """With every Byzantine neighbour sending the dissensus message, t's step is (1 - eps) times its honest pull."""
    s = states(4)
    W = np.array([[0.4, 0.3, 0.2, 0.1], [0.3, 0.7, 0, 0], [0.2, 0, 0.8, 0], [0.1, 0, 0, 0.9]])  # t = 0, attacker 3
    eps = 1.5
    msg = attacks.dissensus(s[0], {1: s[1], 2: s[2]}, {1: 0.3, 2: 0.2}, 0.1, eps)
    after = {n: sum(W[0, j] * (msg if j == 3 else s[j])[n].double() for j in range(4)) for n in s[0]}
    honest_pull = {n: sum(W[0, j] * (s[j][n].double() - s[0][n].double()) for j in (1, 2)) for n in s[0]}
    for n in s[0]:
        torch.testing.assert_close(after[n], s[0][n].double() + (1 - eps) * honest_pull[n])


def test_adversary_view_simulation_and_previous_round() -> None:
    W = Topology.from_config(TopologyConfig("complete"), 4, 0).W
    s = states(4)
    adv = Adversary(ByzantineConfig(peers=[3], attack="ipm"))
    out = adv.outgoing(s, W, 1)  # simulation: everyone's current state, attackers' own included
    honest = [s[3], s[0], s[1], s[2]]
    torch.testing.assert_close(out[3]["A"], attacks.ipm(honest, 0.1)["A"])
    assert all(out[i] is s[i] for i in range(3))
    # a rank holding only the attacker: round 1 knows nothing but itself, later what it received
    alone = Adversary(ByzantineConfig(peers=[3], attack="ipm"))
    torch.testing.assert_close(alone.outgoing({3: s[3]}, W, 1)[3]["A"], -0.1 * s[3]["A"])
    alone.observe({3: {0: s[0], 1: s[1], 2: s[2]}})
    torch.testing.assert_close(alone.outgoing({3: s[3]}, W, 2)[3]["A"], out[3]["A"])
    label = Adversary(ByzantineConfig(peers=[3], attack="label_flip"))
    assert label.outgoing(s, W, 1) is s


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["byzantine.peers=[8]"], "ids must be < train.clients=8"),
        (["byzantine.peers=[0,1,2,3,4,5,6,7]"], "leave at least one honest peer"),
        (["comm.robust_radius=0"], "comm.robust_radius=0.0 must be a finite number > 0"),
        (["comm.robust_radius=-2"], "comm.robust_radius"),
        (["byzantine.peers=[1,1]"], "lists a peer twice"),
        (["byzantine.peers=[1]", "train.algorithm=fedavg"], "byzantine.peers attack gossip"),
        (["comm.robust=median", "train.algorithm=dec_decaf"], "comm.robust=median filters gossip"),
        (["byzantine.attack=krum"], "byzantine.attack='krum' is not one of"),
        (["comm.robust=krum"], "comm.robust='krum' is not one of"),
        (["comm.robust_trim=-1"], "comm.robust_trim=-1 must be an integer >= 0"),
    ],
)
def test_bad_values_are_one_line(overrides: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match) as err:
        load_config(overrides=["train.clients=8", *overrides])
    assert "\n" not in str(err.value)


def gossip_rounds(rule: str, attack: str | None, rounds: int = 6, n: int = 8, extra: list[str] | None = None):
    """Rounds of Dec-LoRA's communicate step alone (no training) on a dense graph, attacker = peer 5."""
    over = [f"train.clients={n}", "topology.kind=erdos_renyi", "topology.p=0.8", f"comm.robust={rule}", *(extra or [])]
    if attack:
        over += ["byzantine.peers=[5]", f"byzantine.attack={attack}"]
    cfg = load_config(overrides=over)
    algo = build_algorithm("dec_lora", cfg)
    W = Topology.from_config(cfg.topology, n, 0).W
    comm = InProcessCommunicator(n)
    s = states(n, seed=1)
    for r in range(1, rounds + 1):
        comm.round = r
        s, _ = algo.communicate(s, comm, W)
    return s, average_states([s[i] for i in range(n) if i != 5]), algo


def moved(rule: str, attack: str | None, rounds: int = 6, extra: list[str] | None = None) -> float:
    """Squared distance of the honest peers' mean from where plain gossip without an attacker leaves it."""
    _, reference, _ = gossip_rounds("none", None, rounds)
    _, mean, _ = gossip_rounds(rule, attack, rounds, extra=extra)
    return squared_distance(mean, reference)


def test_none_rule_without_attackers_is_todays_gossip_bit_for_bit() -> None:
    from declora.algorithms.gossip import exact_gossip

    s, _, algo = gossip_rounds("none", None, rounds=1)
    assert algo.byzantine is None  # the old code path, untouched
    cfg = load_config(overrides=["train.clients=8", "topology.kind=erdos_renyi", "topology.p=0.8"])
    W = Topology.from_config(cfg.topology, 8, 0).W
    want, _ = exact_gossip(InProcessCommunicator(8), states(8, seed=1), W)
    from declora.byzantine.defense import ByzantineGossip

    hooked, _ = exact_gossip(InProcessCommunicator(8), states(8, seed=1), W, ByzantineGossip("none"))
    for i in range(8):
        for n in want[i]:
            assert torch.equal(s[i][n], want[i][n]) and torch.equal(hooked[i][n], want[i][n])


def test_scaled_update_moves_plain_gossip_far_and_clipped_gossip_little() -> None:
    strong = ["byzantine.strength=100"]
    moved_plain = moved("none", "scaled_update", extra=strong)
    moved_clipped = moved("clipped_gossip", "scaled_update", extra=strong)
    moved_trimmed = moved("trimmed_mean", "scaled_update", extra=strong)
    assert moved_plain > 100 * max(moved_clipped, moved_trimmed)
    _, _, algo = gossip_rounds("clipped_gossip", "scaled_update")
    suspects = {j for i, js in algo.byzantine.suspects.flagged.items() if i != 5 for j in js}
    assert suspects == {5}  # named by its neighbours, nobody else is
    assert algo.excluded == frozenset({5})


def test_exclusion_stops_mixing_the_suspect() -> None:
    _, _, algo = gossip_rounds("clipped_gossip", "sign_flip", rounds=8, extra=["comm.robust_exclude=true"])
    excluded = moved("clipped_gossip", "sign_flip", rounds=8, extra=["comm.robust_exclude=true"])
    assert excluded < moved("clipped_gossip", "sign_flip", rounds=8)
    assert all(
        5 in algo.byzantine.suspects.of(i) for i in range(8) if i != 5 and algo.byzantine.suspects.seen.get((i, 5))
    )


@pytest.mark.parametrize("attack", [a for a in ATTACK_NAMES if a != "label_flip"])
def test_every_attack_runs_through_compressed_and_choco_gossip(attack: str) -> None:
    for extra in (["comm.bits=8"], ["comm.bits=8", "comm.error_feedback=true"]):
        s, mean, _ = gossip_rounds("clipped_gossip", attack, rounds=3, extra=extra)
        assert all(torch.isfinite(t).all() for st in s.values() for t in st.values())
