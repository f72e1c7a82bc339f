"""Gossip maths: mean preservation, complete graph = averaging, contraction by the spectral gap."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from oracles import consensus_error, mix_states

from declora.algorithms.gossip import exact_gossip
from declora.comm import InProcessCommunicator
from declora.mixing.kernel import average_states
from declora.mixing.topology import Topology


def random_states(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "A": torch.randn(4, 6, generator=g),
            "B": torch.randn(6, 4, generator=g),
            "h": torch.randn(3, generator=g),
        }
        for _ in range(n)
    ]


@pytest.mark.parametrize("kind", ["ring", "erdos_renyi", "star", "torus", "complete"])
@pytest.mark.parametrize("mixing", ["laplacian", "metropolis"])
def test_gossip_preserves_the_mean_of_every_tensor(kind: str, mixing: str) -> None:
    topo = Topology.build(kind, 9, mixing=mixing, p=0.6, seed=1)
    states = random_states(9)
    mixed = mix_states(topo.W, states)
    before, after = average_states(states), average_states(mixed)
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=0, atol=1e-6)


def test_complete_graph_with_uniform_weights_is_exact_averaging() -> None:
    topo = Topology.build("complete", 5, mixing="max_degree")
    states = random_states(5)
    mean = average_states(states)
    for s in mix_states(topo.W, states):
        for name in s:
            torch.testing.assert_close(s[name], mean[name], rtol=0, atol=1e-6)
    assert consensus_error(mix_states(topo.W, states)) < 1e-10


@pytest.mark.parametrize("kind,n", [("ring", 10), ("ring", 20), ("erdos_renyi", 10), ("torus", 16), ("star", 8)])
def test_consensus_error_contracts_by_the_spectral_gap_each_round(kind: str, n: int) -> None:
    topo = Topology.build(kind, n, p=0.4, seed=3)
    factor = (1 - topo.spectral_gap) ** 2  # ||W X - X_bar|| <= |lambda_2| ||X - X_bar||
    states = random_states(n, seed=7)
    for _ in range(5):
        before = consensus_error(states)
        states = mix_states(topo.W, states)
        assert consensus_error(states) <= factor * before * (1 + 1e-9) + 1e-12


@pytest.mark.parametrize("kind", ["ring", "torus", "erdos_renyi", "complete"])
def test_rms_contraction_is_the_typical_shrink_and_lambda2_the_worst(kind: str) -> None:
    topo = Topology.build(kind, 10, p=0.6, seed=0, rows=2)
    rms = topo.rms_contraction
    assert rms <= 1 - topo.spectral_gap + 1e-12  # the mean of the squares is at most the largest
    # Monte-Carlo: isotropic disagreements (many random states) shrink by rms^2 in squared distance.
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(10, 20_000, generator=gen, dtype=torch.float64)
    x -= x.mean(0, keepdim=True)
    ratio = float((torch.as_tensor(topo.W) @ x).pow(2).sum() / x.pow(2).sum())
    assert ratio == pytest.approx(rms**2, rel=0.02)
    if kind == "complete":
        assert rms == pytest.approx(1 / 3)  # laplacian mixing on K_10: W = I - 2L/(3*10), eigenvalues 1/3


def test_consensus_error_matches_its_definition() -> None:
    states = random_states(3)
    flat = [torch.cat([t.flatten() for t in s.values()]).double() for s in states]
    mean = torch.stack(flat).mean(0)
    expected = sum(float((f - mean).pow(2).sum()) for f in flat) / 3
    assert consensus_error(states) == pytest.approx(expected, rel=1e-12)


def test_in_process_gossip_counts_one_message_per_edge_direction() -> None:
    topo = Topology.build("ring", 6)
    states = random_states(6)
    mixed, sent = exact_gossip(InProcessCommunicator(6), dict(enumerate(states)), topo.W)
    message = sum(t.numel() * 4 for t in states[0].values())
    assert sent == 6 * 2 * message
    expected = mix_states(topo.W, states)
    for i in range(6):
        for name in states[0]:
            torch.testing.assert_close(mixed[i][name], expected[i][name])
    assert np.isclose(topo.W.sum(), 6)
