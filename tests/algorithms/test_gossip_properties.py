"""The real gossip path (InProcessCommunicator + the one kernel) on every graph kind and mixing rule.

Each property is checked through :func:`declora.algorithms.gossip.exact_gossip` over the simulation's
communicator, not through a reference formula, so the code that runs in training is the code tested;
the config's choice lists are checked against the registries they name.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from oracles import consensus_error, mix_states

from declora.algorithms import ALGORITHMS
from declora.algorithms.gossip import compressed_gossip, exact_gossip
from declora.comm import InProcessCommunicator
from declora.config import ConfigError, load_config
from declora.mixing.compress import Quantizer
from declora.mixing.kernel import average_states, mix_row
from declora.mixing.topology import MIXING_RULES, TOPOLOGIES, Topology
from declora.model.peft_methods import METHODS
from declora.partition import PARTITIONERS

N = 9


def states64(n: int, seed: int = 0) -> dict[int, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return {
        i: {
            "lora_A": torch.randn(3, 5, generator=g, dtype=torch.float64),
            "head": torch.randn(4, generator=g, dtype=torch.float64),
        }
        for i in range(n)
    }


def topology(kind: str, rule: str, tmp_path: Path) -> Topology:
    edges = tmp_path / "edges.txt"
    edges.write_text("".join(f"{i} {(i + 1) % N}\n{i} {(i + 3) % N}\n" for i in range(N)))
    return Topology.build(kind, N, mixing=rule, p=0.5, seed=2, rows=3, edges_file=str(edges))


@pytest.mark.parametrize("kind", TOPOLOGIES)
@pytest.mark.parametrize("rule", MIXING_RULES)
def test_exact_gossip_through_the_communicator(kind: str, rule: str, tmp_path: Path) -> None:
    topo = topology(kind, rule, tmp_path)
    comm = InProcessCommunicator(N)
    states = states64(N)
    mixed, sent = exact_gossip(comm, states, topo.W)
    # The kernel: the same bits as mix_row on each client's neighbourhood.
    reference = mix_states(topo.W, [states[i] for i in range(N)])
    for i in range(N):
        for name in states[i]:
            assert torch.equal(mixed[i][name], reference[i][name])
    # Bytes: each client's message once per neighbour.
    message = sum(t.numel() * t.element_size() for t in states[0].values())
    assert sent == sum(topo.degrees) * message
    # The mean is preserved (float64 tensors: to rounding).
    before, after = average_states(list(states.values())), average_states(list(mixed.values()))
    torch.testing.assert_close(after["lora_A"], before["lora_A"], rtol=0, atol=1e-13)
    # The disagreement contracts at least by the spectral gap, every round.
    factor = (1 - topo.spectral_gap) ** 2
    cur = states
    for _ in range(3):
        nxt, _ = exact_gossip(comm, cur, topo.W)
        assert consensus_error(list(nxt.values())) <= factor * consensus_error(list(cur.values())) * (1 + 1e-9) + 1e-12
        cur = nxt


def test_complete_graph_with_uniform_weights_is_averaging_through_the_communicator() -> None:
    topo = Topology.build("complete", N, mixing="max_degree")
    states = states64(N, seed=4)
    mixed, _ = exact_gossip(InProcessCommunicator(N), states, topo.W)
    mean = average_states(list(states.values()))
    for s in mixed.values():
        torch.testing.assert_close(s["lora_A"], mean["lora_A"], rtol=0, atol=1e-14)


@pytest.mark.parametrize("kind", ["ring", "erdos_renyi", "torus"])
def test_32_bit_compressed_gossip_is_exact_gossip_bit_for_bit(kind: str, tmp_path: Path) -> None:
    topo = topology(kind, "laplacian", tmp_path)
    states = {i: {n: t.float() for n, t in s.items()} for i, s in states64(N).items()}
    exact, exact_bytes = exact_gossip(InProcessCommunicator(N), states, topo.W)
    packed, packed_bytes = compressed_gossip(InProcessCommunicator(N), states, topo.W, Quantizer(32))
    assert exact_bytes == packed_bytes
    for i in range(N):
        assert all(torch.equal(exact[i][n], packed[i][n]) for n in states[i])


def test_mix_row_sums_in_float64_in_ascending_order() -> None:
    W = np.array([[0.5, 0.25, 0.25], [0.25, 0.5, 0.25], [0.25, 0.25, 0.5]])
    inbox = {2: {"x": torch.tensor([3.0])}, 0: {"x": torch.tensor([1.0])}, 1: {"x": torch.tensor([2.0])}}
    out = mix_row(W, 0, inbox)
    assert out["x"].dtype == torch.float32 and out["x"].item() == 0.5 * 1 + 0.25 * 2 + 0.25 * 3


def _choices(option: str) -> set[str]:
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[f"{option}=__not_a_choice__"])
    listed = re.search(r"one of:? (.*)$", str(err.value))
    assert listed, str(err.value)
    return {c.strip() for c in listed.group(1).split(",")}


@pytest.mark.parametrize(
    "option,registry",
    [
        ("topology.kind", set(TOPOLOGIES)),
        ("topology.mixing", set(MIXING_RULES)),
        ("partition.kind", set(PARTITIONERS)),
        ("train.algorithm", set(ALGORITHMS)),
        ("peft.method", set(METHODS)),
    ],
)
def test_config_choices_equal_the_registries(option: str, registry: set[str]) -> None:
    assert _choices(option) == registry
