"""The averaged model of product-mixing algorithms (dec_decaf, peft.ranks) is the mean update, exactly;
evaluated, reported and saved as the same object (plain peft reproduces it)."""

from __future__ import annotations

import pytest
import torch

from declora.algorithms import build_algorithm
from declora.algorithms.dec_decaf import DecDeCAF
from declora.comm import InProcessCommunicator
from declora.config import load_config
from declora.mixing.kernel import average_states
from declora.mixing.products import product_distance, products

A0, B0 = "m0.lora_A.default.weight", "m0.lora_B.default.weight"
A1, B1 = "m1.lora_A.default.weight", "m1.lora_B.default.weight"


def _product(state: dict[str, torch.Tensor], b: str = B0, a: str = A0) -> torch.Tensor:
    return state[b].double() @ state[a].double()


def _peers(perturb: float, seed: int = 0) -> dict[int, dict[str, torch.Tensor]]:
    """Two peers with (nearly) the same updates, their factors related by sign flips and a rotation."""
    g = torch.Generator().manual_seed(seed)
    B, A = torch.randn(6, 3, generator=g), torch.randn(3, 8, generator=g)
    C, D = torch.randn(5, 3, generator=g), torch.randn(3, 4, generator=g)
    flip = torch.diag(torch.tensor([-1.0, 1.0, -1.0]))  # singular-vector signs, as two SVDs may pick them
    angle = torch.tensor(0.7)
    rot = torch.eye(3)
    rot[:2, :2] = torch.stack([torch.stack([angle.cos(), -angle.sin()]), torch.stack([angle.sin(), angle.cos()])])
    head = torch.randn(2, 4, generator=g)
    one = {A0: A, B0: B, A1: D, B1: C, "head.weight": head}
    two = {
        A0: flip @ A + perturb * torch.randn(3, 8, generator=g),
        B0: B @ flip,
        A1: rot.T @ D,
        B1: C @ rot + perturb * torch.randn(5, 3, generator=g),
        "head.weight": head + 1.0,
    }
    return {0: one, 1: two}


@pytest.mark.parametrize("perturb", [0.0, 1e-2, 0.3])
def test_averaged_model_is_the_mean_product_not_the_factor_mean(perturb: float) -> None:
    states = _peers(perturb)
    mean = DecDeCAF().averaged(InProcessCommunicator(2), states)
    old = average_states([states[0], states[1]])  # the factor mean the code used to report
    for b, a in ((B0, A0), (B1, A1)):
        want = (_product(states[0], b, a) + _product(states[1], b, a)) / 2
        torch.testing.assert_close(_product(mean, b, a), want, rtol=0, atol=1e-5)
        assert mean[a].shape[0] == 6 and mean[b].shape[1] == 6  # rank k = r_0 + r_1 = 6 <= min(d_out, d_in)
        assert float((_product(old, b, a) - want).abs().max()) > 0.1  # the old average misses it
    torch.testing.assert_close(mean["head.weight"], states[0]["head.weight"] + 0.5)
    assert list(mean) == list(states[0])  # names and order of the model's state


def test_mean_rank_is_capped_by_the_module_and_padded_with_zero_directions() -> None:
    g = torch.Generator().manual_seed(3)
    states = {i: {A0: torch.randn(3, 4, generator=g), B0: torch.randn(5, 3, generator=g)} for i in range(3)}
    mean = DecDeCAF().averaged(InProcessCommunicator(3), states)
    assert mean[A0].shape == (4, 4) and mean[B0].shape == (5, 4)  # min(3 * 3, min(5, 4)) = 4
    want = sum(_product(s) for s in states.values()) / 3
    torch.testing.assert_close(_product(mean), want, rtol=0, atol=1e-5)


def test_consensus_terms_are_on_products_and_vanish_for_refactored_copies() -> None:
    states = _peers(0.0)
    alg = DecDeCAF()
    mean = alg.averaged(InProcessCommunicator(2), states)
    no_head = {i: {n: t for n, t in s.items() if n != "head.weight"} for i, s in states.items()}
    mean_no_head = alg.averaged(InProcessCommunicator(2), no_head)
    assert all(alg.distance(s, mean_no_head) < 1e-9 for s in no_head.values())  # same updates: no disagreement
    assert alg.distance(states[0], mean) == pytest.approx(4 * 2 * 0.5**2, rel=1e-6)  # only the heads differ
    for i, s in states.items():
        means = {b: _product(mean, b, b.replace("lora_B", "lora_A")) for b in (B0, B1)}
        expected = sum(float((p - means[b]).pow(2).sum()) for b, p in products(s).items())
        assert product_distance(s, mean) == pytest.approx(expected + 2.0, rel=1e-9), i


def test_members_leave_the_product_mean() -> None:
    g = torch.Generator().manual_seed(4)
    states = {
        i: {A0: torch.randn(2, 6, generator=g), B0: torch.randn(6, 2, generator=g), "h": torch.randn(3, generator=g)}
        for i in range(4)
    }
    mean = DecDeCAF().averaged(InProcessCommunicator(4), states, members=[0, 2, 3])
    want = sum(_product(states[i]) for i in (0, 2, 3)) / 3
    torch.testing.assert_close(_product(mean), want, rtol=0, atol=1e-5)
    torch.testing.assert_close(mean["h"], (states[0]["h"] + states[2]["h"] + states[3]["h"]) / 3)
    assert mean[A0].shape[0] == 6  # 3 members of rank 2


def test_heterogeneous_ranks_average_the_folded_products() -> None:
    cfg = load_config(overrides=["train.algorithm=dec_decaf", "train.clients=2", "peft.ranks=[2,4]", "peft.r=4"])
    alg = build_algorithm("dec_decaf", cfg)
    g = torch.Generator().manual_seed(5)
    states = {i: {A0: torch.randn(4, 8, generator=g), B0: torch.randn(6, 4, generator=g)} for i in range(2)}
    states[0][A0][2:] = 0  # a rank-2 peer's extra rows / columns are zero
    states[0][B0][:, 2:] = 0
    mean = alg.averaged(InProcessCommunicator(2), states)
    assert mean[A0].shape[0] == 6  # r_0 + r_1
    torch.testing.assert_close(_product(mean), (_product(states[0]) + _product(states[1])) / 2, rtol=0, atol=1e-5)
