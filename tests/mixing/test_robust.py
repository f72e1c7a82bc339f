"""Robust mixing rules: none is mix_row bit for bit; clipping bounds each pull; trimming ignores an outlier."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from declora.config import TopologyConfig
from declora.mixing.kernel import mix_row
from declora.mixing.robust import adaptive_radius, distances, exclude, robust_mix
from declora.mixing.topology import Topology

State = dict[str, torch.Tensor]


def states(n: int, seed: int = 0) -> dict[int, State]:
    g = torch.Generator().manual_seed(seed)
    return {
        i: {
            "A": torch.randn(4, 6, generator=g),
            "B": torch.randn(6, 4, generator=g) * 0.1,
            "b": torch.randn(3, generator=g),
        }
        for i in range(n)
    }


def dense_W(n: int) -> np.ndarray:
    return Topology.from_config(TopologyConfig("complete"), n, 0).W


@pytest.mark.parametrize("kind", ["ring", "complete", "erdos_renyi"])
def test_none_is_mix_row_bit_for_bit(kind: str) -> None:
    W = Topology.from_config(TopologyConfig(kind), 7, 0).W
    s = states(7)
    for i in range(7):
        inbox = {j: s[j] for j in np.flatnonzero(W[i] > 0).tolist()} | {i: s[i]}
        mixed, diag = robust_mix("none", W, i, inbox)
        want = mix_row(W, i, inbox)
        for n in want:
            assert torch.equal(mixed[n], want[n])
        assert set(diag.cut) == set(inbox) - {i} and not any(diag.cut.values())


def test_clipped_gossip_bounds_each_pull_by_W_tau() -> None:
    W, s = dense_W(6), states(6)
    s[5] = {n: t * 1000 for n, t in s[5].items()}  # an outlier far away
    tau = 0.7
    for i in range(5):
        inbox = dict(s)
        mixed, diag = robust_mix("clipped_gossip", W, i, inbox, radius=tau)
        step = float(sum((mixed[n].double() - s[i][n].double()).pow(2).sum() for n in s[i]) ** 0.5)
        assert step <= sum(W[i, j] for j in range(6) if j != i) * tau * (1 + 1e-5)  # triangle inequality bound
        assert diag.cut[5] > 0.99 and diag.radius == tau
        # each neighbour's contribution alone is bounded by W_ij * tau
        solo, _ = robust_mix("clipped_gossip", W, i, {i: s[i], 5: s[5]}, radius=tau)
        pull = float(sum((solo[n].double() - s[i][n].double()).pow(2).sum() for n in s[i]) ** 0.5)
        assert pull == pytest.approx(W[i, 5] * tau, rel=1e-5)  # float32 result


def test_clipped_gossip_without_clipping_is_plain_gossip() -> None:
    W, s = dense_W(5), states(5)
    mixed, diag = robust_mix("clipped_gossip", W, 0, dict(s), radius=1e9)
    want = mix_row(W, 0, dict(s))
    for n in want:
        torch.testing.assert_close(mixed[n], want[n], rtol=0, atol=1e-6)
    assert not any(diag.cut.values())


def test_adaptive_radius_is_second_largest_distance() -> None:
    assert adaptive_radius({1: 3.0, 2: 1.0, 3: 7.0}) == 3.0
    assert adaptive_radius({1: 2.5}) == 2.5
    W, s = dense_W(5), states(5)
    s[4] = {n: t * 100 for n, t in s[4].items()}
    _, diag = robust_mix("clipped_gossip", W, 0, dict(s), radius=None)
    d = distances(s[0], {j: s[j] for j in range(1, 5)})
    assert diag.radius == pytest.approx(sorted(d.values())[-2])
    assert diag.cut[4] > 0.9 and sum(c > 0 for c in diag.cut.values()) == 1  # only the farthest is clipped


@pytest.mark.parametrize("rule", ["trimmed_mean", "median"])
def test_trimmed_mean_and_median_ignore_one_outlier(rule: str) -> None:
    W, s = dense_W(5), states(5)
    honest, _ = robust_mix(rule, W, 0, {j: s[j] for j in range(4)}, trim=1)
    bad = dict(s)
    bad[4] = {n: t + 1e6 for n, t in s[4].items()}
    attacked, diag = robust_mix(rule, W, 0, bad, trim=1)
    for n in attacked:  # the result stays within the honest values' range, coordinate by coordinate
        stacked = torch.stack([s[j][n] for j in range(4)])
        assert torch.all(attacked[n] <= stacked.max(0).values + 1e-6)
        assert torch.all(attacked[n] >= stacked.min(0).values - 1e-6)
    assert diag.cut[4] == 1.0  # dropped on every coordinate
    assert honest.keys() == attacked.keys()


def test_trimmed_mean_values() -> None:
    W = np.full((3, 3), 1 / 3)
    inbox = {
        0: {"x": torch.tensor([1.0, 5.0])},
        1: {"x": torch.tensor([2.0, -1.0])},
        2: {"x": torch.tensor([100.0, 0.0])},
    }
    mixed, diag = robust_mix("trimmed_mean", W, 0, inbox, trim=1)
    assert mixed["x"].tolist() == [2.0, 0.0]
    assert diag.dropped == {1: 0.5, 2: 0.5}
    assert diag.cut == {1: 0.0, 2: 0.0}  # each dropped on 1 of 2 coordinates: less than chance (2 of 3 values)
    med, _ = robust_mix("median", W, 0, inbox)
    assert med["x"].tolist() == [2.0, 0.0]
    even = inbox | {3: {"x": torch.tensor([3.0, 1.0])}}
    med4, _ = robust_mix("median", np.full((4, 4), 0.25), 0, even)
    assert med4["x"].tolist() == [2.5, 0.5]  # the mean of the two middle values (the reference's DeCM)
    none_trimmed, _ = robust_mix("trimmed_mean", W, 0, inbox, trim=0)
    torch.testing.assert_close(none_trimmed["x"], torch.tensor([103 / 3, 4 / 3]))


@pytest.mark.parametrize("rule", ["trimmed_mean", "median"])
def test_honest_neighbours_are_not_cut_more_than_chance(rule: str) -> None:
    """A median over 9 honest values drops 8 of them per coordinate: that is chance, not a cut."""
    g = torch.Generator().manual_seed(1)
    W, s = dense_W(9), {j: {"A": torch.randn(40, 50, generator=g)} for j in range(9)}  # 2,000 coordinates
    _, diag = robust_mix(rule, W, 0, s, trim=2)
    assert set(diag.cut) == set(range(1, 9))
    assert max(diag.cut.values()) < 0.3, diag.cut  # same-distribution values: near 0
    if rule == "median":
        assert min(diag.dropped.values()) > 0.8  # the raw fraction dropped, which used to be the cut
    bad = dict(s)
    bad[8] = {n: -t * 50 for n, t in s[8].items()}  # one sign-flipped, scaled liar
    _, attacked = robust_mix(rule, W, 0, bad, trim=2)
    assert attacked.cut[8] > 0.8 and max(attacked.cut[j] for j in range(1, 8)) < 0.3


def test_exclude_moves_weight_to_the_diagonal() -> None:
    W = dense_W(4)
    Wt = exclude(W, 1, {3})
    assert Wt[1, 3] == 0 and Wt[1, 1] == pytest.approx(W[1, 1] + W[1, 3]) and Wt[1].sum() == pytest.approx(1)
    assert np.array_equal(Wt[[0, 2, 3]], W[[0, 2, 3]])
    assert exclude(W, 1, set()) is W


def test_unknown_rule_is_one_line() -> None:
    with pytest.raises(ValueError, match="unknown robust rule 'krum'"):
        robust_mix("krum", dense_W(2), 0, states(2))
