"""Pure tensor maths of gossip: the one mixing kernel, averaging, distances, message size.

Nothing here knows about processes, files or models: states are ``dict[name, tensor]`` and a list of
them is one per client, in client order.

:func:`mix_row` is the single place where ``X_i <- sum_j W_ij X_j`` is computed. Exact gossip, compressed
gossip, DeCAF's product mixing (through :func:`weighted_sum`) and the tests all call it, so every runtime
(in-process simulation, torch.distributed, a time-varying W_t) sums the same terms in the same order
(float64, ascending j, self included) and gets the same bits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from declora.types import State


def weighted_sum(weights: Sequence[float], tensors: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """``sum_k weights[k] * tensors[k]`` accumulated in float64, in the order given, cast to ``dtype``."""
    return sum(w * t.double() for w, t in zip(weights, tensors, strict=True)).to(dtype)  # type: ignore[union-attr]


def mix_row(W: np.ndarray, i: int, inbox: Mapping[int, State]) -> State:
    """Client i's gossip step: ``X_i <- sum_j W_ij X_j`` for every tensor separately (each A, each B).

    Args:
        W: (N, N) mixing matrix (or this round's W_t).
        i: the mixing client; ``inbox[i]`` is its own state and sets the names and dtypes.
        inbox: the states client i holds this round, its own included, keyed by client id.

    Returns:
        The mixed state, summed in float64 over ascending j and cast back to each tensor's dtype.

    Example:
        >>> W = np.array([[0.5, 0.5], [0.5, 0.5]])
        >>> mix_row(W, 0, {0: {"a": torch.tensor([0.0])}, 1: {"a": torch.tensor([2.0])}})["a"]
        tensor([1.])
    """
    order = sorted(inbox)
    weights = [W[i, j] for j in order]
    return {name: weighted_sum(weights, [inbox[j][name] for j in order], own.dtype) for name, own in inbox[i].items()}


AVERAGE_BLOCK = 64  # clients stacked at once by average_states: bounds its float64 temporary


def average_states(states: Sequence[State]) -> State:
    """The mean over clients of every tensor: the paper's evaluated ("averaged") model.

    Up to :data:`AVERAGE_BLOCK` clients are stacked in float64 at once; more are summed block by block,
    so averaging 1,000 clients does not hold 1,000 float64 copies of the largest tensor (1.2 GB for
    MiniLM's pooler).
    """
    if len(states) <= AVERAGE_BLOCK:
        return {n: torch.stack([s[n].double() for s in states]).mean(0).to(states[0][n].dtype) for n in states[0]}
    blocks = range(0, len(states), AVERAGE_BLOCK)
    return {
        n: (
            sum(torch.stack([s[n].double() for s in states[k : k + AVERAGE_BLOCK]]).sum(0) for k in blocks)
            / len(states)
        ).to(states[0][n].dtype)
        for n in states[0]
    }


def squared_distance(a: State, b: State) -> float:
    """``sum over tensors of ||a - b||^2``: one client's term of the consensus error
    ``(1/N) sum_i ||X_i - mean_j X_j||^2`` the trainer reports."""
    return sum(float((a[n].double() - b[n].double()).pow(2).sum()) for n in a)


def state_bytes(state: State) -> int:
    """Bytes a state (or an encoded message) occupies on the wire: the one byte-count formula."""
    return sum(t.numel() * t.element_size() for t in state.values())
