"""Live graphs and W_t (declora.mixing.live), schedules (declora.config.availability), churn config checks.

Pure tests: no model. Every W_t of every graph kind and many seeds is symmetric, non-negative, doubly
stochastic and on live edges; gossip with W_t through the real in-process communicator preserves the
online peers' mean and leaves offline peers untouched; a peer that is never online is never mixed in.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from oracles import check_dynamic_matrix

from declora.algorithms import build_algorithm
from declora.algorithms.gossip import exact_gossip
from declora.comm import InProcessCommunicator
from declora.config import ConfigError, load_config
from declora.config.availability import load_schedule
from declora.mixing.live import LiveRound, draw_live_round, dynamic_mixing_matrix, local_row
from declora.mixing.topology import build_graph, mixing_matrix

GRAPHS = [("ring", 6), ("complete", 5), ("star", 6), ("torus", 9), ("grid", 6), ("erdos_renyi", 8)]


def base_W(kind: str, n: int, rule: str = "laplacian", seed: int = 0) -> np.ndarray:
    return mixing_matrix(build_graph(kind, n, p=0.4, seed=seed), rule)


def assert_valid(W_t: np.ndarray, live: LiveRound) -> None:
    check_dynamic_matrix(W_t, live)
    n = W_t.shape[0]
    assert np.array_equal(W_t, W_t.T)  # symmetric bit for bit (both ends compute the same weights)
    assert (W_t >= 0).all()
    np.testing.assert_allclose(W_t.sum(0), 1.0, atol=1e-12)
    np.testing.assert_allclose(W_t.sum(1), 1.0, atol=1e-12)
    for i in set(range(n)) - set(live.online):
        assert np.array_equal(W_t[i], np.eye(n)[i])  # an offline peer keeps its state


@pytest.mark.parametrize("kind,n", GRAPHS)
@pytest.mark.parametrize("rule", ["diagonal", "metropolis"])
@pytest.mark.parametrize("mixing", ["laplacian", "metropolis", "max_degree"])
def test_every_W_t_is_symmetric_doubly_stochastic_and_on_live_edges(kind: str, n: int, rule: str, mixing: str) -> None:
    W = base_W(kind, n, mixing)
    for seed in range(12):
        for link_drop, peer_dropout in [(0.0, 0.0), (0.3, 0.0), (0.5, 0.3), (0.9, 0.5), (1.0, 0.0)]:
            live = draw_live_round(W, 1 + seed % 4, seed, link_drop=link_drop, peer_dropout=peer_dropout)
            W_t = dynamic_mixing_matrix(W, live, rule)
            assert_valid(W_t, live)
            # each row is what that peer computes alone from the neighbours it exchanged with
            degrees = {i: len(live.neighbours(i)) for i in range(n)}
            for i in range(n):
                assert np.array_equal(local_row(W, i, live.neighbours(i), rule, degrees), W_t[i])


def test_a_peer_with_all_links_down_keeps_its_state_and_the_others_stay_stochastic() -> None:
    W = base_W("torus", 9)
    full = draw_live_round(W, 1, 0)
    live = LiveRound(1, full.online, tuple(e for e in full.edges if 4 not in e), full.steps)
    for rule in ("diagonal", "metropolis"):
        W_t = dynamic_mixing_matrix(W, live, rule)
        assert_valid(W_t, live)
        assert np.array_equal(W_t[4], np.eye(9)[4])


def test_without_failures_W_t_is_W_bit_for_bit() -> None:
    for kind, n in GRAPHS:
        W = base_W(kind, n)
        live = draw_live_round(W, 3, 7)  # every option at its default
        assert live.online == tuple(range(n)) and len(live.edges) == int((W > 0).sum() - n) // 2
        assert np.array_equal(dynamic_mixing_matrix(W, live), W)


def test_draws_are_pure_and_one_option_does_not_shift_another() -> None:
    W = base_W("erdos_renyi", 10)
    a = draw_live_round(W, 5, 3, link_drop=0.3, peer_dropout=0.2, stragglers=0.4, local_steps=5)
    assert a == draw_live_round(W, 5, 3, link_drop=0.3, peer_dropout=0.2, stragglers=0.4, local_steps=5)
    b = draw_live_round(W, 5, 3, link_drop=0.6, peer_dropout=0.2, stragglers=0.4, local_steps=5)
    assert a.online == b.online and set(b.edges) <= set(a.edges)  # more link failures, same peers
    assert a.steps == b.steps
    assert {s for s in a.steps.values()} <= {2, 5}  # stragglers: floor(0.5 * 5) steps
    assert draw_live_round(W, 6, 3, peer_dropout=0.5).online != draw_live_round(W, 7, 3, peer_dropout=0.5).online


def _states(n: int, gen: torch.Generator) -> dict[int, dict[str, torch.Tensor]]:
    return {
        i: {"a": torch.randn(3, 4, generator=gen, dtype=torch.float64), "b": torch.randn(5, generator=gen)}
        for i in range(n)
    }


class Recorder(InProcessCommunicator):
    """The real in-process communicator, recording who received from whom."""

    def exchange(self, messages, W):  # type: ignore[no-untyped-def]
        self.last = super().exchange(messages, W)
        return self.last


@pytest.mark.parametrize("rule", ["diagonal", "metropolis"])
def test_gossip_with_W_t_keeps_the_online_mean_exchanges_on_live_edges_only_and_spares_offline_peers(rule: str) -> None:
    n = 8
    W = base_W("erdos_renyi", n)
    gen = torch.Generator().manual_seed(0)
    comm = Recorder(n)
    for round_ in range(1, 30):
        live = draw_live_round(W, round_, 1, link_drop=0.4, peer_dropout=0.3)
        W_t = dynamic_mixing_matrix(W, live, rule)
        states = _states(n, gen)
        mixed, sent = exact_gossip(comm, states, W_t)
        for i in range(n):
            assert set(comm.last[i]) == set(live.neighbours(i))  # only live edges carry messages
        offline = set(range(n)) - set(live.online)
        for i in offline:
            assert comm.last[i] == {} and all(i not in comm.last[j] for j in range(n))
            assert all(torch.equal(mixed[i][k], states[i][k]) for k in states[i])  # untouched
        on = list(live.online)
        if on:
            before = torch.stack([states[i]["a"] for i in on]).mean(0)
            after = torch.stack([mixed[i]["a"] for i in on]).mean(0)
            torch.testing.assert_close(after, before, rtol=0, atol=1e-14)  # float64: the mean is kept
        per_message = sum(t.numel() * t.element_size() for t in states[0].values())
        assert sent == 2 * len(live.edges) * per_message


@pytest.mark.parametrize("algorithm", ["dec_lora", "dec_ffa_lora", "dec_decaf"])
def test_a_peer_offline_in_every_round_is_never_mixed_in(algorithm: str) -> None:
    """Peer 3 holds NaNs and is always offline: the others equal gossip among themselves alone."""
    n, gone = 5, 3
    W = base_W("ring", n)
    cfg = load_config(overrides=[f"train.algorithm={algorithm}", f"train.clients={n}"])
    alg = build_algorithm(algorithm, cfg)
    gen = torch.Generator().manual_seed(1)
    names = ["m.lora_A.default.weight", "m.lora_B.default.weight", "head.weight"]
    shapes = [(2, 6), (4, 2), (3,)]
    states = {i: {k: torch.randn(*sh, generator=gen) for k, sh in zip(names, shapes, strict=True)} for i in range(n)}
    states[gone] = {k: torch.full_like(v, float("nan")) for k, v in states[gone].items()}
    others = [i for i in range(n) if i != gone]
    for round_ in range(1, 6):
        live = draw_live_round(W, round_, 0, offline={gone}, link_drop=0.2)
        W_t = dynamic_mixing_matrix(W, live)
        mixed, _ = alg.communicate(states, InProcessCommunicator(n), W_t)
        # reference: the same gossip on the 4 others only, with W_t restricted to them (still stochastic)
        sub = W_t[np.ix_(others, others)]
        np.testing.assert_allclose(sub.sum(1), 1.0, atol=1e-12)
        ref, _ = alg.communicate({k: states[i] for k, i in enumerate(others)}, InProcessCommunicator(n - 1), sub)
        for k, i in enumerate(others):
            for name in names:
                assert torch.isfinite(mixed[i][name]).all()
                torch.testing.assert_close(mixed[i][name], ref[k][name], rtol=0, atol=0)
        assert all(torch.equal(mixed[gone][k].isnan(), states[gone][k].isnan()) for k in names)
        states = mixed


def test_schedule_yaml_and_csv_ranges_and_leaving_for_good(tmp_path) -> None:  # type: ignore[no-untyped-def]
    y = tmp_path / "s.yaml"
    y.write_text("- {rounds: 5-8, offline: 0-4}\n- {rounds: 4-, offline: 9}\n- {rounds: 2, offline: [6, 7]}\n")
    c = tmp_path / "s.csv"
    c.write_text('rounds,offline\n5-8,0-4\n4-,9\n2,"6,7"\n')
    for path in (y, c):
        s = load_schedule(path, 10)
        assert s.offline(1) == set()
        assert s.offline(2) == {6, 7}
        assert s.offline(4) == {9}
        assert s.offline(5) == {0, 1, 2, 3, 4, 9} == s.offline(8)
        assert s.offline(9) == {9} == s.offline(1000)


@pytest.mark.parametrize(
    "text,match",
    [
        ("- {rounds: 1, offline: 12}\n", "peer 12 does not exist: the run has train.clients=10"),
        ("- {rounds: 0-3, offline: 1}\n", "rounds start at 1"),
        ("- {rounds: 5-2, offline: 1}\n", "ends before it starts"),
        ("- {rounds: x, offline: 1}\n", "rounds 'x'"),
        ("- {rounds: 1, offline: 1, extra: 2}\n", "exactly the keys"),
        ("rounds: 1\n", "list of"),
    ],
)
def test_bad_schedules_stop_at_config_load_naming_the_option(tmp_path, text: str, match: str) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "s.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match) as err:
        load_config(overrides=[f"train.availability_file={path}"])
    assert str(err.value).startswith("train.availability_file=") and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "overrides,option",
    [
        (["topology.link_drop=1.5"], "topology.link_drop"),
        (["topology.link_drop=nan"], "topology.link_drop"),
        (["train.peer_dropout=1.0"], "train.peer_dropout"),
        (["train.peer_dropout=-0.1"], "train.peer_dropout"),
        (["train.stragglers=inf"], "train.stragglers"),
        (["train.straggler_steps=0"], "train.straggler_steps"),
        (["topology.dynamic_mixing=max"], "topology.dynamic_mixing"),
        (["train.availability_file=/nonexistent.yaml"], "train.availability_file"),
        (["train.algorithm=dec_decaf", "peft.ranks=[2,4,8,16,2]", "train.clients=4"], "peft.ranks"),
        (["train.algorithm=dec_decaf", "peft.ranks=[0,4]", "peft.r=4"], "peft.ranks"),
        (["train.algorithm=dec_decaf", "peft.ranks=[2,4]"], "peft.r=4"),
        (["peft.ranks=[2,4]", "peft.r=4"], "peft.ranks"),  # dec_lora mixes A and B separately
        (["train.algorithm=fedavg", "topology.link_drop=0.1"], "topology.link_drop"),
        (["train.algorithm=centralized", "train.peer_dropout=0.1"], "train.peer_dropout"),
        (["comm.error_feedback=true", "comm.bits=4", "train.peer_dropout=0.1"], "comm.error_feedback"),
    ],
)
def test_bad_churn_and_rank_values_stop_before_any_model_with_one_line(overrides: list[str], option: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(overrides=overrides)
    assert option in str(err.value) and "\n" not in str(err.value)
