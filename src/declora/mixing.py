"""Pure tensor maths of gossip: mixing with W, averaging, consensus error.

Nothing here knows about processes, files or models: states are ``dict[name, tensor]`` and a list of
them is one per client, in client order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

State = dict[str, torch.Tensor]


def mix_stacked(W: np.ndarray | torch.Tensor, stacked: torch.Tensor) -> torch.Tensor:
    """``X_i <- sum_j W_ij X_j`` for a stack of N client tensors.

    Args:
        W: (N, N) mixing matrix.
        stacked: (N, *shape) one tensor per client.

    Returns:
        (N, *shape) mixed tensors, in float64 accumulation cast back to ``stacked.dtype``.
    """
    w = torch.as_tensor(W, dtype=torch.float64, device=stacked.device)
    flat = stacked.reshape(stacked.shape[0], -1).to(torch.float64)
    return (w @ flat).reshape(stacked.shape).to(stacked.dtype)


def mix_states(W: np.ndarray, states: Sequence[State]) -> list[State]:
    """Mix every tensor of N client states with W, each tensor (each LoRA A, each B) separately."""
    names = list(states[0])
    mixed = {n: mix_stacked(W, torch.stack([s[n] for s in states])) for n in names}
    return [{n: mixed[n][i] for n in names} for i in range(len(states))]


def average_states(states: Sequence[State]) -> State:
    """The mean over clients of every tensor: the paper's evaluated ("averaged") model."""
    return {n: torch.stack([s[n].double() for s in states]).mean(0).to(states[0][n].dtype) for n in states[0]}


def consensus_error(states: Sequence[State]) -> float:
    """``(1/N) sum_i ||X_i - mean_j X_j||^2``, summed over all tensors (squared Frobenius norms)."""
    mean = average_states(states)
    return sum(squared_distance(s, mean) for s in states) / len(states)


def squared_distance(a: State, b: State) -> float:
    """``sum over tensors of ||a - b||^2`` (one client's term of the consensus error)."""
    return sum(float((a[n].double() - b[n].double()).pow(2).sum()) for n in a)
