"""The baselines: fedavg (and its client sampling), dec_ffa_lora, dec_decaf's product mixing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from oracles import mix_states
from safetensors.torch import load_file

from declora.algorithms.dec_decaf import DecDeCAF, decaf_mix, refactor
from declora.algorithms.fedavg import FedAvg, sample_clients
from declora.algorithms.gossip import exact_gossip
from declora.comm import InProcessCommunicator
from declora.config import ConfigError, load_config
from declora.mixing.kernel import average_states
from declora.mixing.topology import Topology
from declora.model.loading import build_model, trainable_state
from declora.rundir.layout import read_metrics
from declora.training.trainer import run

LORA_A, LORA_B = "m.lora_A.default.weight", "m.lora_B.default.weight"


def _run(overrides: list[str], *extra: str) -> dict:
    return run(load_config(overrides=[*overrides, *extra]))


def _adapter(run_dir: str, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(Path(run_dir) / "adapters" / name / "adapter_model.safetensors"))


# ---------------------------------------------------------------- fedavg


def test_fedavg_with_all_clients_equals_dec_lora_on_a_uniform_complete_graph(
    tiny_overrides: list[str], tmp_path: Path
) -> None:
    fed = _run(tiny_overrides, "train.algorithm=fedavg", f"out_dir={tmp_path / 'fed'}")
    dec = _run(tiny_overrides, "topology.kind=complete", "topology.mixing=max_degree", f"out_dir={tmp_path / 'dec'}")
    for i in range(4):
        a, b = _adapter(fed["run_dir"], f"client_{i}"), _adapter(dec["run_dir"], f"client_{i}")
        assert a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)
    fed_rows, dec_rows = read_metrics(fed["run_dir"]), read_metrics(dec["run_dir"])
    assert [r["accuracy"] for r in fed_rows] == [r["accuracy"] for r in dec_rows]
    assert [r["train_loss"] for r in fed_rows] == pytest.approx([r["train_loss"] for r in dec_rows], abs=1e-6)
    # a server: 4 uploads per round; the complete graph: 4 clients x 3 neighbours
    assert fed_rows[0]["bytes_sent"] == 4 * fed["message_bytes"]
    assert dec_rows[0]["bytes_sent"] == 4 * 3 * dec["message_bytes"]
    assert fed["topology"] is None and fed["final_consensus_error"] == 0.0


def test_client_sampling_is_seeded_per_round_and_covers_the_clients() -> None:
    rounds = [sample_clients(10, 3, seed=0, round_=t) for t in range(1, 41)]
    assert all(len(r) == 3 == len(set(r)) and r == sorted(r) for r in rounds)
    assert rounds == [sample_clients(10, 3, seed=0, round_=t) for t in range(1, 41)]  # reproducible
    assert len({tuple(r) for r in rounds}) > 10  # a new sample each round
    assert set().union(*rounds) == set(range(10))
    assert rounds != [sample_clients(10, 3, seed=1, round_=t) for t in range(1, 41)]
    assert sample_clients(5, None, 0, 1) == sample_clients(5, 5, 0, 1) == [0, 1, 2, 3, 4]


def test_fedavg_averages_only_the_participants_and_broadcasts() -> None:
    g = torch.Generator().manual_seed(0)
    states = {i: {"a": torch.randn(3, 4, generator=g), "h": torch.randn(2, generator=g)} for i in range(5)}
    new, sent = FedAvg().communicate(states, InProcessCommunicator(5), np.eye(5), participants=[1, 3, 4])
    expected = average_states([states[1], states[3], states[4]])
    for i in range(5):
        for name in expected:
            torch.testing.assert_close(new[i][name], expected[name], rtol=1e-6, atol=1e-6)
    assert sent == 3 * (12 + 2) * 4  # three uploads of 14 float32


def test_fedavg_sampling_end_to_end(tiny_overrides: list[str], tmp_path: Path) -> None:
    out = _run(tiny_overrides, "train.algorithm=fedavg", "train.clients_per_round=2", f"out_dir={tmp_path / 'f'}")
    rows = read_metrics(out["run_dir"])
    assert [r["bytes_sent"] for r in rows] == [2 * out["message_bytes"]] * 2
    assert all(r["consensus_error"] == 0.0 for r in rows)  # every client holds the global model
    clients = [_adapter(out["run_dir"], f"client_{i}") for i in range(4)]
    for c in clients[1:]:
        for name in c:
            assert torch.equal(c[name], clients[0][name])


def test_clients_per_round_is_checked_before_training(tiny_overrides: list[str]) -> None:
    with pytest.raises(ConfigError, match="train.clients_per_round"):
        load_config(overrides=[*tiny_overrides, "train.clients_per_round=2"])  # dec_lora
    with pytest.raises(ConfigError, match="train.clients_per_round=5"):
        load_config(overrides=[*tiny_overrides, "train.algorithm=fedavg", "train.clients_per_round=5"])
    with pytest.raises(ConfigError, match="peft.method=lora"):
        load_config(overrides=[*tiny_overrides, "train.algorithm=dec_ffa_lora", "peft.method=ia3"])


# ---------------------------------------------------------------- dec_ffa_lora


def test_dec_ffa_lora_leaves_every_A_bit_identical_and_sends_the_rest(
    tiny_overrides: list[str], tmp_path: Path
) -> None:
    out = _run(tiny_overrides, "train.algorithm=dec_ffa_lora", f"out_dir={tmp_path / 'ffa'}")
    cfg = load_config(overrides=tiny_overrides)
    init = {n.replace(".default", ""): t for n, t in trainable_state(build_model(cfg.model, cfg.peft, 2, 0)).items()}
    a_names = [n for n in init if ".lora_A." in n]
    assert len(a_names) == 4  # query and value of 2 layers
    for i in range(4):
        client = _adapter(out["run_dir"], f"client_{i}")
        for name in a_names:
            assert torch.equal(client[name], init[name]), name
        assert any(not torch.equal(client[n], init[n]) for n in client if ".lora_B." in n)  # B trained
    # ring of 4: 2 messages per client, each without the A tensors
    a_bytes = sum(init[n].numel() * 4 for n in a_names)
    assert out["message_bytes"] == sum(t.numel() * 4 for t in init.values()) - a_bytes
    assert read_metrics(out["run_dir"])[0]["bytes_sent"] == 4 * 2 * out["message_bytes"]


# ---------------------------------------------------------------- dec_decaf


def _product(state: dict[str, torch.Tensor]) -> torch.Tensor:
    return state[LORA_B].double() @ state[LORA_A].double()


def test_refactor_is_the_balanced_best_rank_r_approximation() -> None:
    g = torch.Generator().manual_seed(0)
    M = torch.randn(7, 5, generator=g, dtype=torch.float64)
    B, A = refactor(M, 2)
    assert B.shape == (7, 2) and A.shape == (2, 5)
    S = torch.linalg.svdvals(M)
    torch.testing.assert_close(torch.linalg.svdvals(B @ A)[:2], S[:2])
    assert float(torch.linalg.matrix_norm(M - B @ A) ** 2) == pytest.approx(float((S[2:] ** 2).sum()))
    torch.testing.assert_close(B.T @ B, A @ A.T)  # sqrt(S) on each side: both Gram matrices are diag(S)


def test_dec_decaf_leaves_a_shared_rank_r_product_unchanged() -> None:
    g = torch.Generator().manual_seed(1)
    B, A = torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randn(3, 8, generator=g, dtype=torch.float64)
    states = []
    for _ in range(4):  # the same product B A, factored differently on every client
        Q = torch.randn(3, 3, generator=g, dtype=torch.float64) + 3 * torch.eye(3, dtype=torch.float64)
        states.append({LORA_A: torch.linalg.solve(Q, A), LORA_B: B @ Q, "head": torch.randn(2, generator=g)})
    W = Topology.build("ring", 4).W
    for i in range(4):
        order = [j for j in range(4) if W[i, j] > 0]
        out = decaf_mix([W[i, j] for j in order], [states[j] for j in order])
        torch.testing.assert_close(_product(out), B @ A, rtol=1e-10, atol=1e-10)


def test_dec_decaf_mixes_products_where_dec_lora_mixes_factors() -> None:
    # two clients whose rank-1 updates point in different directions; r = 2 holds their mean exactly
    e = torch.eye(4, dtype=torch.float64)
    s0 = {LORA_A: torch.stack([e[0], 0 * e[0]]), LORA_B: torch.stack([e[1], 0 * e[1]], 1), "head": e[0]}
    s1 = {LORA_A: torch.stack([e[2], 0 * e[2]]), LORA_B: torch.stack([e[3], 0 * e[3]], 1), "head": e[1]}
    W = np.full((2, 2), 0.5)
    mean_product = (_product(s0) + _product(s1)) / 2
    decaf = decaf_mix([0.5, 0.5], [s0, s1])
    factor_mixed = mix_states(W, [s0, s1])[0]
    torch.testing.assert_close(_product(decaf), mean_product, rtol=0, atol=1e-12)
    # Dec-LoRA: (B0+B1)/2 (A0+A1)/2 = mean product + the cross terms B0 A1, B1 A0
    cross = _product({LORA_A: s1[LORA_A], LORA_B: s0[LORA_B]}) + _product({LORA_A: s0[LORA_A], LORA_B: s1[LORA_B]})
    torch.testing.assert_close(_product(factor_mixed), (mean_product + cross / 2) / 2, rtol=0, atol=1e-12)
    assert float((_product(factor_mixed) - mean_product).abs().max()) == pytest.approx(0.25)
    torch.testing.assert_close(decaf["head"], factor_mixed["head"])  # the head is mixed as usual


def test_dec_decaf_sends_the_factors_through_the_communicator() -> None:
    g = torch.Generator().manual_seed(2)
    states = {
        i: {LORA_A: torch.randn(2, 5, generator=g), LORA_B: torch.randn(4, 2, generator=g), "h": torch.randn(3)}
        for i in range(5)
    }
    W = Topology.build("ring", 5).W
    comm = InProcessCommunicator(5)
    mixed, sent = DecDeCAF().communicate(states, comm, W)
    _, gossip_sent = exact_gossip(comm, states, W)
    assert sent == gossip_sent == 5 * 2 * (10 + 8 + 3) * 4
    for i in range(5):
        expected = sum(W[i, j] * _product(states[j]) for j in range(5))
        best = refactor(expected, 2)
        torch.testing.assert_close(_product(mixed[i]), best[0] @ best[1], rtol=1e-5, atol=1e-5)
        assert mixed[i][LORA_A].dtype == torch.float32


def test_dec_decaf_end_to_end(tiny_overrides: list[str], tmp_path: Path) -> None:
    dec = _run(tiny_overrides, "train.algorithm=dec_decaf", f"out_dir={tmp_path / 'decaf'}")
    lora = _run(tiny_overrides, f"out_dir={tmp_path / 'lora'}")
    assert dec["total_bytes_sent"] == lora["total_bytes_sent"]  # same messages on the wire
    a, b = _adapter(dec["run_dir"], "client_0"), _adapter(lora["run_dir"], "client_0")
    assert any(not torch.allclose(a[n], b[n]) for n in a if ".lora_A." in n)
    for name in a:  # every client's A and B are balanced: ||B||_F == ||A||_F per module
        if ".lora_A." in name:
            B = a[name.replace("lora_A", "lora_B")]
            assert float(B.norm()) == pytest.approx(float(a[name].norm()), rel=1e-4)
