"""Pure maths of product mixing (``dec_decaf``, ``peft.ranks``): LoRA pairs, re-factoring, the mean update.

A LoRA module's update is ``(alpha / r) B A``. Algorithms that mix the products ``B A`` give each peer
factors from its own SVD, whose signs and rotations are arbitrary, so the entry-wise mean of the
factors is not the mean of the updates: matching components can cancel. Their averaged model is the
mean product instead,

    M = (1/N) sum_i B_i A_i          (d_out, d_in), float64, per LoRA module,

held as one LoRA pair of rank ``k = min(sum_i r_i, d)`` (:func:`exact_factors`). ``rank(M) <= sum_i r_i``
and ``rank(M) <= min(d_out, d_in)``, so the SVD cut at k drops only singular values that are zero in
exact arithmetic: ``B A == M`` to float64 round-off, then float32. (Here ``B_i A_i`` is peer i's product
in the shared model's scale ``alpha / peft.r``; under ``peft.ranks`` that is its update times
``peft.r / alpha`` for every rank, see :mod:`declora.algorithms.hetero_ranks`.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from declora.types import State


def is_lora_A(name: str) -> bool:
    """Whether ``name`` is a LoRA A matrix (peft: ``...lora_A.<adapter>.weight``)."""
    return ".lora_A." in name


def lora_pairs(state: State) -> list[tuple[str, str]]:
    """``(B name, A name)`` of every LoRA module in ``state``, in the state's order."""
    return [(n.replace(".lora_A.", ".lora_B."), n) for n in state if is_lora_A(n)]


def refactor(product: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factors of ``product`` with the singular values split evenly.

    Args:
        product: (d_out, d_in) matrix.
        rank: r, the number of rows of A.

    Returns:
        B (d_out, r) = U_r sqrt(S_r) and A (r, d_in) = sqrt(S_r) V_r^T, in ``product``'s dtype. Singular
        directions beyond the product's rank come back as zero rows/columns.
    """
    U, S, Vh = torch.linalg.svd(product.double(), full_matrices=False)
    root = S[:rank].sqrt()
    B, A = U[:, :rank] * root, root[:, None] * Vh[:rank]
    if B.shape[1] < rank:  # rank > min(d_out, d_in): pad with zero directions
        B = torch.cat([B, B.new_zeros(B.shape[0], rank - B.shape[1])], 1)
        A = torch.cat([A, A.new_zeros(rank - A.shape[0], A.shape[1])], 0)
    return B.to(product.dtype), A.to(product.dtype)


def products(state: State) -> State:
    """``B A`` in float64 for every LoRA module of ``state``, keyed by the B name."""
    return {b: state[b].double() @ state[a].double() for b, a in lora_pairs(state)}


def mean_rank(ranks: Sequence[int], state: State) -> int:
    """k, the rank that holds the mean of peers of ``ranks`` exactly in every module of ``state``.

    ``min(sum(ranks), largest min(d_out, d_in) over the modules)``: smaller modules are exact at their
    own ``min(d_out, d_in)`` and padded with zero directions (one ``r`` for the whole adapter).
    """
    widest = max((min(state[b].shape[0], state[a].shape[1]) for b, a in lora_pairs(state)), default=0)
    return min(int(sum(ranks)), widest)


def exact_factors(mean_products: State, like: State, rank: int) -> State:
    """``like`` with every LoRA pair replaced by rank-``rank`` factors of its module's mean product.

    Args:
        mean_products: M per module, keyed by the B name (:func:`products`, averaged).
        like: a state with the mean of every other tensor (the head); sets names, order and dtypes.
        rank: k from :func:`mean_rank`.
    """
    out = dict(like)
    for b, a in lora_pairs(like):
        B, A = refactor(mean_products[b], rank)
        out[b], out[a] = B.to(like[b].dtype), A.to(like[a].dtype)
    return {n: out[n] for n in like}


def product_distance(state: State, mean: State) -> float:
    """One peer's consensus term on products: ``sum_modules ||B A - B_m A_m||_F^2`` + the rest entry-wise.

    ``mean`` may hold factors of another rank than ``state`` (the rank-k mean of :func:`exact_factors`).
    """
    pairs = lora_pairs(state)
    lora = {n for pair in pairs for n in pair}
    total = sum(float((state[n].double() - mean[n].double()).pow(2).sum()) for n in state if n not in lora)
    for b, a in pairs:
        diff = state[b].double() @ state[a].double() - mean[b].double() @ mean[a].double()
        total += float(diff.pow(2).sum())
    return total
