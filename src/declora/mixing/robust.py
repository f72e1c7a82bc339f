"""Byzantine-robust mixing rules: what client i makes of the states it received (pure tensor maths).

Each rule takes client i's own state ``x_i``, the states it received ``{x_j}`` and row i of W (or W_t) and
returns the mixed state plus, per neighbour, how much the rule cut that neighbour's message (the
diagnostics behind suspect naming, :mod:`declora.byzantine.suspects`). The definitions follow the
reference code of He, Karimireddy and Jaggi (2022), ``epfml/byzantine-robust-decentralized-optimizer``
(``codes/aggregator.py``):

- ``none``: exactly :func:`declora.mixing.kernel.mix_row`, i.e. today's gossip, bit for bit.
- ``clipped_gossip`` (self-centred clipping, the paper's ClippedGossip): ``x_i + sum_j W_ij clip(x_j - x_i, tau_i)``
  with ``clip(v, tau) = v * min(1, tau / ||v||)``; ``||v||`` is the norm of the **whole** state difference
  (every LoRA A, B and the head together), as in the paper. ``radius=None`` is the reference's adaptive
  rule: tau_i = the second-largest of the neighbours' distances ``||x_j - x_i||`` (the only one if i has
  one neighbour), so at least the farthest neighbour is cut down to the second farthest.
- ``trimmed_mean``: coordinate-wise over ``{i} ∪ N(i)``, drop the ``trim`` largest and ``trim`` smallest
  values, average the rest **uniformly** (the reference's DeTM; W's weights are not used: per coordinate
  a different set survives, and a weighted version has no reference). ``trim`` is lowered until at
  least one value survives.
- ``median``: coordinate-wise median over ``{i} ∪ N(i)``, the mean of the two middle values for an even
  count (the reference's DeCM).

Every rule sums in float64 and casts back to each tensor's dtype. A neighbour whose weight in the row is
zero (W_t: a failed or excluded link) is not part of the neighbourhood.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from declora.mixing.kernel import mix_row
from declora.types import State

RULES = ("none", "clipped_gossip", "trimmed_mean", "median")


@dataclass
class Diagnostics:
    """What a rule did to each neighbour's message in one mixing step of client i.

    Attributes:
        cut: per neighbour j, how much the rule cut its message, 0 (not at all) to 1: ``1 - tau / ||x_j - x_i||``
            when clipped (0 when not); for trimmed_mean/median, how much more often than chance its value was
            trimmed away, ``max(0, (f_j - e) / (1 - e))`` with ``f_j`` the fraction of its coordinates dropped
            and ``e = 2b / n`` the fraction an honest value of n is dropped by chance when b are trimmed at each
            end. (A median over 9 values drops 8 of them on every coordinate, so ``f_j`` alone would name every
            honest neighbour; an outlier dropped everywhere has ``cut`` 1.)
        distance: per neighbour j, ``||x_j - x_i||`` over the whole state.
        radius: the clipping radius tau_i used (clipped_gossip), else None.
        dropped: trimmed_mean/median only: per neighbour j, ``f_j``, the fraction of its coordinates dropped.
    """

    cut: dict[int, float] = field(default_factory=dict)
    distance: dict[int, float] = field(default_factory=dict)
    radius: float | None = None
    dropped: dict[int, float] = field(default_factory=dict)


def distances(own: State, others: Mapping[int, State]) -> dict[int, float]:
    """``||x_j - x_i||`` over all tensors jointly (the flattened full state), per neighbour j."""
    return {
        j: float(sum(float((s[n].double() - t.double()).pow(2).sum()) for n, t in own.items()) ** 0.5)
        for j, s in others.items()
    }


def adaptive_radius(dist: Mapping[int, float]) -> float:
    """The reference's tau_i: the second-largest neighbour distance, or the only one (0.0 without any)."""
    ordered = sorted(dist.values())
    if not ordered:
        return 0.0
    return ordered[-2] if len(ordered) >= 2 else ordered[-1]


def clipped_gossip(
    W: np.ndarray, i: int, inbox: Mapping[int, State], radius: float | None
) -> tuple[State, Diagnostics]:
    """``x_i + sum_{j != i} W_ij clip(x_j - x_i, tau_i)`` with the norm of the full state difference."""
    own = inbox[i]
    others = {j: inbox[j] for j in sorted(inbox) if j != i and W[i, j] > 0}
    dist = distances(own, others)
    tau = adaptive_radius(dist) if radius is None else float(radius)
    scale = {j: 1.0 if d <= tau or d == 0.0 else tau / d for j, d in dist.items()}
    mixed: State = {}
    for name, x in own.items():
        xi = x.double()
        pull = sum((float(W[i, j]) * scale[j] * (others[j][name].double() - xi) for j in others), torch.zeros_like(xi))
        mixed[name] = (xi + pull).to(x.dtype)
    return mixed, Diagnostics({j: 1.0 - s for j, s in scale.items()}, dist, tau)


def _stack(W: np.ndarray, i: int, inbox: Mapping[int, State], name: str) -> tuple[list[int], torch.Tensor]:
    """The neighbourhood ``{i} ∪ N(i)`` (ascending) and its tensors ``name`` stacked in float64 on dim 0."""
    order = [j for j in sorted(inbox) if j == i or W[i, j] > 0]
    return order, torch.stack([inbox[j][name].double() for j in order])


def trimmed_mean(W: np.ndarray, i: int, inbox: Mapping[int, State], trim: int) -> tuple[State, Diagnostics]:
    """Coordinate-wise: drop the ``trim`` largest and smallest over ``{i} ∪ N(i)``, average the rest uniformly."""
    mixed: State = {}
    dropped: dict[int, float] = {}
    total = 0
    order: list[int] = []
    for name, x in inbox[i].items():
        order, stacked = _stack(W, i, inbox, name)
        b = min(trim, (len(order) - 1) // 2)  # the reference lowers b until at least one value survives
        ranks = stacked.argsort(0).argsort(0)  # rank of each client's value per coordinate (ties: by order)
        keep = (ranks >= b) & (ranks < len(order) - b)
        mixed[name] = ((stacked * keep).sum(0) / (len(order) - 2 * b)).to(x.dtype)
        for k, j in enumerate(order):
            dropped[j] = dropped.get(j, 0.0) + float((~keep[k]).sum())
        total += x.numel()
    frac = {j: dropped[j] / max(total, 1) for j in order if j != i}
    chance = 2 * b / len(order)  # < 1, since 2b <= n - 1
    cut = {j: max(0.0, (f - chance) / (1 - chance)) for j, f in frac.items()}
    return mixed, Diagnostics(cut, distances(inbox[i], {j: inbox[j] for j in cut}), dropped=frac)


def median(W: np.ndarray, i: int, inbox: Mapping[int, State]) -> tuple[State, Diagnostics]:
    """Coordinate-wise median over ``{i} ∪ N(i)`` (mean of the two middle values for an even count).

    Diagnostics: the fraction of coordinates where neighbour j is not one of the middle value(s).
    """
    mixed: State = {}
    for name, x in inbox[i].items():
        order, stacked = _stack(W, i, inbox, name)
        low_middle = stacked.median(0).values  # torch.median returns the lower of two middle values
        high_middle = -(-stacked).median(0).values
        mixed[name] = ((low_middle + high_middle) / 2).to(x.dtype)
    n = len([j for j in inbox if j == i or W[i, j] > 0])
    trim = (n - 1) // 2  # what a median trims on each side
    _, diag = trimmed_mean(W, i, inbox, trim)
    return mixed, diag


def exclude(W: np.ndarray, i: int, excluded: set[int] | frozenset[int]) -> np.ndarray:
    """W with row i's weights of ``excluded`` neighbours moved onto its diagonal (a local W_t change).

    Exactly what a failed link does to that end (:func:`declora.mixing.live.local_row`): row i still sums
    to one, so peer i's step stays a convex combination; the other rows are untouched.
    """
    cut = [j for j in excluded if j != i and W[i, j] > 0]
    if not cut:
        return W
    Wt = np.array(W, dtype=float, copy=True)
    Wt[i, i] += Wt[i, cut].sum()
    Wt[i, cut] = 0.0
    return Wt


def robust_mix(
    rule: str, W: np.ndarray, i: int, inbox: Mapping[int, State], radius: float | None = None, trim: int = 1
) -> tuple[State, Diagnostics]:
    """Client i's mixing step under ``rule`` (one of :data:`RULES`); ``inbox[i]`` is its own state.

    Args:
        rule: none, clipped_gossip, trimmed_mean or median.
        W: (N, N) mixing matrix or this round's W_t; only row i is read.
        inbox: the states client i holds this round, its own included, by client id.
        radius: clipped_gossip's tau (> 0); None = the adaptive rule.
        trim: trimmed_mean's values dropped at each end per coordinate.

    Returns:
        The mixed state and what the rule cut from each neighbour.
    """
    if rule == "none":
        return mix_row(W, i, inbox), Diagnostics({j: 0.0 for j in inbox if j != i})
    if rule == "clipped_gossip":
        return clipped_gossip(W, i, inbox, radius)
    if rule == "trimmed_mean":
        return trimmed_mean(W, i, inbox, trim)
    if rule == "median":
        return median(W, i, inbox)
    raise ValueError(f"unknown robust rule {rule!r}; use one of {', '.join(RULES)}")
