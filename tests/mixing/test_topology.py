"""Tests for declora.mixing.topology: graphs, mixing matrices, checks, spectral gap and drawing."""

from __future__ import annotations

import math

import networkx as nx
import numpy as np
import pytest

from declora.mixing.topology import (
    MIXING_RULES,
    TOPOLOGIES,
    Topology,
    build_graph,
    check_mixing_matrix,
    draw_topology,
    mixing_matrix,
    spectral_gap,
)

# (kind, N) pairs covering N=1,2 where the kind allows and a divisor-rich N for torus/grid.
CASES = [
    *[("ring", n) for n in (1, 2, 3, 4, 7)],
    *[("complete", n) for n in (1, 2, 5)],
    *[("star", n) for n in (1, 2, 6)],
    *[("erdos_renyi", n) for n in (1, 2, 8)],
    *[("torus", n) for n in (1, 2, 9, 12)],
    *[("grid", n) for n in (1, 2, 9, 12)],
]


def test_constants():
    assert TOPOLOGIES == ("ring", "erdos_renyi", "complete", "star", "torus", "grid", "edge_list")
    assert MIXING_RULES == ("laplacian", "metropolis", "max_degree")


def test_ring4_laplacian_hand_computed():
    W = mixing_matrix(build_graph("ring", 4), "laplacian")
    a, b = 2 / 3, 1 / 6
    expected = np.array(
        [
            [a, b, 0, b],
            [b, a, b, 0],
            [0, b, a, b],
            [b, 0, b, a],
        ]
    )
    assert W.dtype == np.float64
    np.testing.assert_allclose(W, expected, atol=1e-12)


def test_ring4_metropolis_hand_computed():
    W = mixing_matrix(build_graph("ring", 4), "metropolis")
    t = 1 / 3
    expected = np.array(
        [
            [t, t, 0, t],
            [t, t, t, 0],
            [0, t, t, t],
            [t, 0, t, t],
        ]
    )
    np.testing.assert_allclose(W, expected, atol=1e-12)


def test_star_max_degree_hand_computed():
    # star on 4 nodes: hub 0 has degree 3 -> edge weight 1/4; leaves keep 3/4, hub keeps 1/4.
    W = mixing_matrix(build_graph("star", 4), "max_degree")
    expected = np.array(
        [
            [0.25, 0.25, 0.25, 0.25],
            [0.25, 0.75, 0.0, 0.0],
            [0.25, 0.0, 0.75, 0.0],
            [0.25, 0.0, 0.0, 0.75],
        ]
    )
    np.testing.assert_allclose(W, expected, atol=1e-12)


@pytest.mark.parametrize("rule", MIXING_RULES)
@pytest.mark.parametrize(("kind", "n"), CASES)
def test_every_kind_and_rule_is_valid_gossip_matrix(kind, n, rule):
    g = build_graph(kind, n, seed=3)
    assert sorted(g.nodes()) == list(range(n))
    assert nx.number_of_selfloops(g) == 0
    assert nx.is_connected(g)
    W = mixing_matrix(g, rule)
    assert W.shape == (n, n) and W.dtype == np.float64
    np.testing.assert_allclose(W, W.T, atol=1e-12)
    assert W.min() >= -1e-12
    np.testing.assert_allclose(W.sum(axis=0), 1.0, atol=1e-10)
    np.testing.assert_allclose(W.sum(axis=1), 1.0, atol=1e-10)
    for i in range(n):
        for j in range(n):
            if i != j and not g.has_edge(i, j):
                assert W[i, j] == 0.0
            if g.has_edge(i, j):
                assert W[i, j] > 0.0
    check_mixing_matrix(W, g)
    assert 0.0 < spectral_gap(W) <= 1.0 + 1e-12


def test_graph_shapes():
    assert build_graph("ring", 1).number_of_edges() == 0
    assert build_graph("ring", 2).number_of_edges() == 1
    assert build_graph("ring", 6).number_of_edges() == 6
    assert build_graph("complete", 5).number_of_edges() == 10
    star = build_graph("star", 6)
    assert star.degree(0) == 5 and all(star.degree(i) == 1 for i in range(1, 6))
    torus = build_graph("torus", 12)  # default rows = 3 -> 3 x 4 torus, every node degree 4
    assert torus.graph["rows"] == 3
    assert all(d == 4 for _, d in torus.degree())
    grid = build_graph("grid", 12, rows=2)  # 2 x 6 grid, row-major ids
    assert grid.number_of_edges() == 2 * 5 + 6
    assert grid.has_edge(0, 1) and grid.has_edge(0, 6) and not grid.has_edge(5, 6)
    assert build_graph("torus", 7).graph["rows"] == 1  # prime N -> 1 x N torus, i.e. a ring
    assert nx.is_isomorphic(build_graph("torus", 7), nx.cycle_graph(7))


def test_complete_max_degree_is_fedavg_and_gap_one():
    W = mixing_matrix(build_graph("complete", 6), "max_degree")
    np.testing.assert_allclose(W, np.full((6, 6), 1 / 6), atol=1e-12)
    assert spectral_gap(W) == pytest.approx(1.0)
    assert spectral_gap(np.array([[1.0]])) == 1.0


@pytest.mark.parametrize("rule", ["laplacian", "metropolis"])
def test_ring_gap_decreases_with_n(rule):
    gaps = [spectral_gap(mixing_matrix(build_graph("ring", n), rule)) for n in range(3, 13)]
    assert all(a > b for a, b in zip(gaps[:-1], gaps[1:], strict=True))


def test_ring4_gaps_hand_computed():
    assert spectral_gap(mixing_matrix(build_graph("ring", 4), "laplacian")) == pytest.approx(1 / 3)
    assert spectral_gap(mixing_matrix(build_graph("ring", 4), "metropolis")) == pytest.approx(2 / 3)


def test_erdos_renyi_seeded_and_connected():
    g1 = build_graph("erdos_renyi", 12, p=0.3, seed=7)
    g2 = build_graph("erdos_renyi", 12, p=0.3, seed=7)
    assert sorted(g1.edges()) == sorted(g2.edges())
    assert nx.is_connected(g1)
    seeds = {tuple(sorted(build_graph("erdos_renyi", 12, p=0.3, seed=s).edges())) for s in range(5)}
    assert len(seeds) > 1


def test_erdos_renyi_tiny_p_raises():
    with pytest.raises(ValueError, match=r"topology\.p") as exc:
        build_graph("erdos_renyi", 10, p=0.01, max_tries=20)
    assert "\n" not in str(exc.value)
    assert f"{math.log(10) / 10:.2f}" in str(exc.value)
    with pytest.raises(ValueError, match=r"topology\.p"):
        build_graph("erdos_renyi", 10, p=1.5)


def test_edge_list_from_file(tmp_path):
    f = tmp_path / "edges.txt"
    f.write_text("# a path plus a chord\n0 1\n1 2\n2 3\n3 1\n")
    topo = Topology.build("edge_list", 4, edges_file=str(f), mixing="metropolis")
    assert sorted(topo.graph.edges()) == [(0, 1), (1, 2), (1, 3), (2, 3)]
    assert topo.degrees == [1, 3, 2, 2]
    assert topo.W[0, 1] == pytest.approx(1 / 4)
    assert topo.W[0, 0] == pytest.approx(3 / 4)


def test_edge_list_errors(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("0 1\n1 2\n2 7\n")
    with pytest.raises(ValueError, match=r"topology\.edges_file") as exc:
        build_graph("edge_list", 4, edges_file=str(bad))
    assert "7" in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(ValueError, match=r"topology\.edges_file"):
        build_graph("edge_list", 4, edges_file=None)
    with pytest.raises(ValueError, match=r"topology\.edges_file"):
        build_graph("edge_list", 4, edges_file=str(tmp_path / "missing.txt"))
    split = tmp_path / "split.txt"
    split.write_text("0 1\n2 3\n")
    with pytest.raises(ValueError, match=r"topology\.edges_file"):
        build_graph("edge_list", 4, edges_file=str(split))


def test_config_errors():
    with pytest.raises(ValueError, match=r"topology\.kind") as exc:
        build_graph("hypercube", 4)
    assert "ring" in str(exc.value) and "edge_list" in str(exc.value)
    with pytest.raises(ValueError, match=r"train\.clients"):
        build_graph("ring", 0)
    with pytest.raises(ValueError, match=r"topology\.rows"):
        build_graph("torus", 12, rows=5)
    with pytest.raises(ValueError, match=r"topology\.mixing"):
        mixing_matrix(build_graph("ring", 4), "uniform")
    with pytest.raises(ValueError, match=r"topology\.mixing"):
        Topology.build("ring", 4, mixing="uniform")


def test_check_mixing_matrix_rejects_bad_matrices():
    g = build_graph("ring", 4)
    W = mixing_matrix(g, "laplacian")
    check_mixing_matrix(W, g)

    asym = W.copy()
    asym[0, 1] += 0.05
    asym[0, 0] -= 0.05  # rows still sum to 1, but not symmetric
    with pytest.raises(ValueError, match="symmetric"):
        check_mixing_matrix(asym, g)

    neg = np.array([[1.2, -0.2, 0, 0], [-0.2, 1.2, 0, 0], [0, 0, 0.5, 0.5], [0, 0, 0.5, 0.5]])
    with pytest.raises(ValueError, match="negative"):
        check_mixing_matrix(neg, build_graph("complete", 4))

    off = W.copy()  # move weight onto the non-edge (0, 2), keeping symmetry and unit sums
    off[0, 2] = off[2, 0] = 0.1
    off[0, 0] -= 0.1
    off[2, 2] -= 0.1
    with pytest.raises(ValueError, match="not an edge"):
        check_mixing_matrix(off, g)

    with pytest.raises(ValueError, match="sum"):
        check_mixing_matrix(W * 0.9, g)
    with pytest.raises(ValueError, match="shape"):
        check_mixing_matrix(np.eye(3), g)

    disconnected = nx.Graph([(0, 1), (2, 3)])
    with pytest.raises(ValueError, match="not connected"):
        check_mixing_matrix(np.eye(4), disconnected)


def test_topology_dataclass_and_describe():
    topo = Topology.build("ring", 4)
    assert topo.num_nodes == 4 and topo.kind == "ring" and topo.mixing == "laplacian"
    assert topo.degrees == [2, 2, 2, 2]
    assert topo.neighbors(0) == [1, 3]
    assert topo.spectral_gap == pytest.approx(1 / 3)
    with pytest.raises(AttributeError):
        topo.kind = "star"  # frozen
    text = topo.describe(precision=2)
    assert "ring" in text and "edges: 4" in text and "0.67" in text and "0.17" in text
    assert "0.333" not in text and "spectral gap: 0.33" in text
    assert "rms contraction: 0.58" in text  # eigenvalues 2/3, 2/3, 1/3 besides 1: sqrt(1/3)
    assert len(text.splitlines()) >= 6
    single = Topology.build("complete", 1)
    assert single.W.tolist() == [[1.0]] and single.spectral_gap == 1.0 and single.neighbors(0) == []
    assert single.rms_contraction == 0.0


@pytest.mark.parametrize("kind", ["ring", "torus"])
def test_draw_topology_writes_png(tmp_path, kind):
    topo = Topology.build(kind, 9)
    out = tmp_path / "nested" / "dir" / f"{kind}.png"
    draw_topology(topo, str(out))
    data = out.read_bytes()
    assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"
