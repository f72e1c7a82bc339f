"""The attacks: pure functions from what an attacker knows to the message it sends instead of its state.

Definitions follow the reference code of He, Karimireddy and Jaggi (2022),
``epfml/byzantine-robust-decentralized-optimizer`` (``codes/attacks.py``), adapted to peers that gossip
their models and also train (the attacker's own, honestly trained state is one of the honest states it
knows). ``honest`` below is the list of honest states the attacker knows: its own and its honest
neighbours' (see :mod:`declora.byzantine.adversary` for where these come from in each runtime).

| attack | message | ``byzantine.strength`` (default) |
|---|---|---|
| sign_flip | ``-s x_a`` (the reference's bit flip at s = 1) | s (1.0) |
| scaled_update | ``x_a + s (x_a - mean(honest))``: its own deviation, amplified | s (10.0) |
| gaussian | ``x_a + s N(0, I)`` (seeded per round and attacker) | the noise std s (1.0) |
| alie | ``mu - z sigma``, per-coordinate mean and std over ``honest`` (ALIE) | z (10.0, the reference's ALIE10) |
| ipm | ``-eps mean(honest)`` (inner-product manipulation) | eps (0.1, the reference's) |
| dissensus | ``x_t - eps sum_j W_tj (x_j - x_t) / sum_b W_tb`` against honest neighbour t | eps (1.5, reference) |
| label_flip | its honest state, trained on labels ``C - 1 - y`` (data poisoning) | unused |

Every function returns new tensors of the inputs' dtypes; nothing is modified in place.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from declora.types import State

ATTACKS = ("sign_flip", "scaled_update", "gaussian", "alie", "ipm", "dissensus", "label_flip")
DEFAULT_STRENGTH = {
    "sign_flip": 1.0,
    "scaled_update": 10.0,
    "gaussian": 1.0,
    "alie": 10.0,
    "ipm": 0.1,
    "dissensus": 1.5,
    "label_flip": 0.0,
}


def _mean(states: Sequence[State], name: str) -> torch.Tensor:
    return torch.stack([s[name].double() for s in states]).mean(0)


def sign_flip(own: State, strength: float) -> State:
    """``-s x_a`` for every tensor."""
    return {n: (-strength * t.double()).to(t.dtype) for n, t in own.items()}


def scaled_update(own: State, honest: Sequence[State], strength: float) -> State:
    """``x_a + s (x_a - mean(honest))``: the attacker's deviation from the honest mean, s times larger."""
    return {n: (t.double() + strength * (t.double() - _mean(honest, n))).to(t.dtype) for n, t in own.items()}


def gaussian(own: State, strength: float, generator: torch.Generator) -> State:
    """``x_a + s N(0, I)``, the noise drawn from ``generator`` (tensor by tensor, in the state's order)."""
    return {
        n: (t.double() + strength * torch.randn(t.shape, generator=generator, dtype=torch.float64)).to(t.dtype)
        for n, t in own.items()
    }


def alie(honest: Sequence[State], z: float) -> State:
    """``mu - z sigma`` per coordinate over the honest states (sigma = 0 with a single one)."""
    out: State = {}
    for n, t in honest[0].items():
        stacked = torch.stack([s[n].double() for s in honest])
        std = stacked.std(0) if len(honest) > 1 else torch.zeros_like(stacked[0])
        out[n] = (stacked.mean(0) - z * std).to(t.dtype)
    return out


def ipm(honest: Sequence[State], epsilon: float) -> State:
    """``-eps mean(honest)``: points against the honest peers' average."""
    return {n: (-epsilon * _mean(honest, n)).to(t.dtype) for n, t in honest[0].items()}


def dissensus(
    target: State,
    neighbours: Mapping[int, State],
    weights: Mapping[int, float],
    byzantine_weight: float,
    epsilon: float,
) -> State:
    """The dissensus attack on one target t: pull t away from its honest neighbours.

    Args:
        target: ``x_t``.
        neighbours: the states of t's honest neighbours j (that the attacker knows).
        weights: ``W_tj`` for those neighbours.
        byzantine_weight: ``sum_b W_tb`` over t's Byzantine neighbours (> 0: the attacker is one).
        epsilon: eps; with every Byzantine neighbour sending this, t's gossip step becomes
            ``x_t + (1 - eps) sum_j W_tj (x_j - x_t)``, away from consensus for eps > 1.
    """
    out: State = {}
    for n, t in target.items():
        xt = t.double()
        pull = sum((weights[j] * (s[n].double() - xt) for j, s in neighbours.items()), torch.zeros_like(xt))
        out[n] = (xt - epsilon * pull / byzantine_weight).to(t.dtype)
    return out


def flip_labels(labels: torch.Tensor, num_labels: int) -> torch.Tensor:
    """label_flip's data poisoning: class ``y`` becomes ``C - 1 - y`` (the reference's ``9 - label``)."""
    return (num_labels - 1) - labels
