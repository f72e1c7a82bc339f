"""Compressed gossip and CHOCO-gossip: exactness at 32 bits, mean preservation, error feedback, bytes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from oracles import consensus_error, roundtrip

from declora.algorithms.gossip import ChocoGossip, QuantizedGossip, build_gossip, compressed_gossip, exact_gossip
from declora.comm import InProcessCommunicator
from declora.comm.base import Message, message_bytes, neighbors
from declora.mixing.compress import Quantizer
from declora.mixing.kernel import average_states
from declora.mixing.topology import Topology

State = dict[str, torch.Tensor]


class WireCommunicator(InProcessCommunicator):
    """Moves only what ``exchange`` is given, as copies (no aliasing), and forbids ``gossip``."""

    def __init__(self, num_clients: int) -> None:
        super().__init__(num_clients)
        self.exchanges = 0

    def exchange(self, messages: dict[int, Message], W: np.ndarray) -> dict[int, dict[int, Message]]:
        self.exchanges += 1
        names = {i: sorted(m) for i, m in messages.items()}
        assert len({tuple(v) for v in names.values()}) == 1, "all messages must share their names"
        return {i: {j: {k: t.clone() for k, t in messages[j].items()} for j in neighbors(W, i)} for i in messages}

    def gossip(self, states, W):  # type: ignore[override]
        raise AssertionError("compressed gossip must go through exchange() only")


def client_states(n: int, seed: int = 0) -> dict[int, State]:
    g = torch.Generator().manual_seed(seed)
    return {
        i: {
            "A": torch.rand(4, 40, generator=g) - 0.5,
            "B": torch.randn(40, 4, generator=g) * 0.05,
            "head": torch.randn(3, 40, generator=g),
            "bias": torch.randn(3, generator=g),
        }
        for i in range(n)
    }


def local_steps(states: dict[int, State], seed: int) -> dict[int, State]:
    """Stands in for K optimizer steps: every client moves its tensors by its own small amount."""
    g = torch.Generator().manual_seed(seed)
    return {i: {n: t + 0.01 * torch.randn(t.shape, generator=g) for n, t in s.items()} for i, s in states.items()}


def assert_same(a: dict[int, State], b: dict[int, State], atol: float = 0.0) -> None:
    for i in a:
        for name in a[i]:
            torch.testing.assert_close(a[i][name], b[i][name], rtol=0, atol=atol)


def test_compressed_gossip_at_32_bits_is_exact_gossip_bit_for_bit() -> None:
    topo = Topology.build("erdos_renyi", 7, p=0.5, seed=2)
    states = client_states(7)
    exact, exact_bytes = exact_gossip(InProcessCommunicator(7), states, topo.W)
    mixed, sent = compressed_gossip(WireCommunicator(7), states, topo.W, Quantizer(32))
    assert_same(mixed, exact)
    assert sent == exact_bytes


def test_neighbours_receive_the_quantized_message_and_the_own_copy_stays_exact() -> None:
    topo = Topology.build("ring", 5)
    W, states, q = topo.W, client_states(5), Quantizer(4, "row")
    comm = WireCommunicator(5)
    mixed, sent = compressed_gossip(comm, states, W, q)
    for i in range(5):
        inbox = {j: roundtrip(q, states[j]) for j in neighbors(W, i)} | {i: states[i]}
        for name in states[i]:
            expected = sum(W[i, j] * inbox[j][name].double() for j in sorted(inbox)).float()
            torch.testing.assert_close(mixed[i][name], expected, rtol=0, atol=0)
    assert comm.exchanges == 1
    assert sent == 5 * 2 * q.payload_bytes(states[0])  # ring: two neighbours, packed payload


@pytest.mark.parametrize("bits,rounding", [(8, "nearest"), (4, "nearest"), (2, "nearest"), (4, "stochastic")])
@pytest.mark.parametrize("kind", ["ring", "erdos_renyi", "torus"])
def test_choco_preserves_the_clients_mean_exactly(bits: int, rounding: str, kind: str) -> None:
    topo = Topology.build(kind, 9, mixing="metropolis", p=0.5, seed=1)
    assert np.allclose(topo.W.sum(0), 1) and np.allclose(topo.W.sum(1), 1)  # doubly stochastic
    choco, comm = ChocoGossip(Quantizer(bits, "tensor", rounding), gamma=0.8, seed=0), WireCommunicator(9)
    states = client_states(9)
    for round_ in range(6):
        states = local_steps(states, round_)  # the mean moves with training, not with gossip
        before = average_states(list(states.values()))
        states, _ = choco(comm, states, topo.W)
        after = average_states(list(states.values()))
        for name in before:
            torch.testing.assert_close(after[name], before[name], rtol=0, atol=2e-7)


def test_plain_compressed_gossip_moves_the_mean_choco_does_not() -> None:
    topo = Topology.build("ring", 8)
    states = client_states(8)
    mean = average_states(list(states.values()))
    plain, _ = QuantizedGossip(Quantizer(2))(InProcessCommunicator(8), states, topo.W)
    choco, _ = ChocoGossip(Quantizer(2), gamma=1.0)(InProcessCommunicator(8), states, topo.W)

    def drift(s: dict[int, State]) -> float:
        m = average_states(list(s.values()))
        return sum(float((m[n] - mean[n]).abs().max()) for n in m)

    assert drift(plain) > 1e-3
    assert drift(choco) < 1e-6


def test_choco_at_32_bits_with_unit_step_is_exact_gossip() -> None:
    topo = Topology.build("ring", 6)
    states = client_states(6)
    choco = ChocoGossip(Quantizer(32), gamma=1.0)
    exact = states
    for round_ in range(3):
        states, exact = local_steps(states, round_), local_steps(exact, round_)
        states, _ = choco(InProcessCommunicator(6), states, topo.W)
        exact, _ = exact_gossip(InProcessCommunicator(6), exact, topo.W)
        assert_same(states, exact, atol=1e-6)


@pytest.mark.parametrize("bits", [4, 2])
def test_error_feedback_reaches_consensus_where_plain_compression_stalls(bits: int) -> None:
    topo = Topology.build("ring", 8)
    start = client_states(8, seed=4)
    plain, choco = QuantizedGossip(Quantizer(bits)), ChocoGossip(Quantizer(bits), gamma=1.0)
    a = b = exact = start
    for _ in range(60):
        a, _ = plain(InProcessCommunicator(8), a, topo.W)
        b, _ = choco(InProcessCommunicator(8), b, topo.W)
        exact, _ = exact_gossip(InProcessCommunicator(8), exact, topo.W)
    c0 = consensus_error(list(start.values()))
    c_exact, c_plain, c_choco = (consensus_error(list(s.values())) for s in (exact, a, b))
    assert c_choco < 1e-3 * c0  # converges, like exact gossip does
    assert c_plain > 10 * c_choco  # quantization noise floor without error feedback
    assert c_exact < 1e-3 * c0


def test_choco_bytes_are_the_packed_payload_per_edge() -> None:
    topo = Topology.build("star", 5)
    states = client_states(5)
    choco = ChocoGossip(Quantizer(4, "row"), gamma=0.5)
    _, sent = choco(InProcessCommunicator(5), states, topo.W)
    payload = Quantizer(4, "row").payload_bytes(states[0])
    assert sent == sum(len(neighbors(topo.W, i)) for i in range(5)) * payload
    assert sent == 2 * 4 * payload  # a star has 4 edges, each used both ways


def test_choco_state_dict_resumes_bit_for_bit() -> None:
    topo = Topology.build("ring", 5)
    states = client_states(5)
    one = ChocoGossip(Quantizer(2, "tensor", "stochastic"), gamma=0.5, seed=3)
    for r in range(2):
        states, _ = one(InProcessCommunicator(5), local_steps(states, r), topo.W)
    saved = one.state_dict()
    assert all(isinstance(t, torch.Tensor) for t in saved.values())
    assert sum(k.startswith("public/0/") for k in saved) == 3 * 4  # itself + 2 neighbours, 4 tensors
    two = ChocoGossip(Quantizer(2, "tensor", "stochastic"), gamma=0.5, seed=3)
    two.load_state_dict(saved)
    nxt = local_steps(states, 2)
    a, _ = one(InProcessCommunicator(5), nxt, topo.W)
    b, _ = two(InProcessCommunicator(5), nxt, topo.W)
    assert_same(a, b)
    fresh, _ = ChocoGossip(Quantizer(2, "tensor", "stochastic"), gamma=0.5, seed=3)(
        InProcessCommunicator(5), nxt, topo.W
    )
    assert any(not torch.equal(a[0][n], fresh[0][n]) for n in a[0])  # the public copies matter


def test_stochastic_rounding_depends_on_seed_round_and_client_only() -> None:
    topo = Topology.build("ring", 4)
    states = client_states(4)
    a, _ = QuantizedGossip(Quantizer(2, rounding="stochastic"), seed=1)(InProcessCommunicator(4), states, topo.W)
    b, _ = QuantizedGossip(Quantizer(2, rounding="stochastic"), seed=1)(InProcessCommunicator(4), states, topo.W)
    c, _ = QuantizedGossip(Quantizer(2, rounding="stochastic"), seed=2)(InProcessCommunicator(4), states, topo.W)
    assert_same(a, b)
    assert any(not torch.equal(a[0][n], c[0][n]) for n in a[0])


def test_build_gossip_picks_the_strategy() -> None:
    assert build_gossip() is None  # 32 bits, no error feedback: the communicator's exact gossip
    assert isinstance(build_gossip(bits=4), QuantizedGossip)
    assert isinstance(build_gossip(bits=32, error_feedback=True), ChocoGossip)
    assert message_bytes(Quantizer(16).encode(client_states(1)[0])) == Quantizer(16).payload_bytes(client_states(1)[0])


def test_choco_public_copies_start_from_the_shared_initial_state() -> None:
    """Clients start equal (x0 = pretrained head + seeded adapter); only their small updates are sent."""
    topo = Topology.build("ring", 6)
    x0 = client_states(1, seed=9)[0]
    x0 = {n: 10 * t for n, t in x0.items()}  # large pretrained weights
    states = local_steps({i: dict(x0) for i in range(6)}, seed=1)
    from_zero = ChocoGossip(Quantizer(2), gamma=1.0)
    from_x0 = ChocoGossip(Quantizer(2), gamma=1.0, reference=x0)
    a, _ = from_zero(InProcessCommunicator(6), states, topo.W)
    b, _ = from_x0(InProcessCommunicator(6), states, topo.W)
    before = consensus_error(list(states.values()))
    assert consensus_error(list(b.values())) < before  # a 2-bit step already contracts
    assert consensus_error(list(a.values())) > 5 * before  # from zeros, the first step blows it up (9x)
    assert all(
        torch.equal(
            from_x0.public[0][0][n], x0[n] + roundtrip(from_x0.quantizer, {m: states[0][m] - x0[m] for m in x0})[n]
        )
        for n in x0
    )
