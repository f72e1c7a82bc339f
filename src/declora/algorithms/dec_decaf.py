"""DeCAF-style product mixing (Saadati et al., arXiv 2505.21382): mix ``B_j A_j``, re-factor to rank r.

What goes on the wire: each client sends its factors (A, B and the head), exactly the message of
Dec-LoRA, so the bytes are the same; the receiver forms the products. (Sending the product itself
would cost ``d_out * d_in`` instead of ``r * (d_out + d_in)`` per module, and give the same result.)
Client i then sets, for every LoRA module,

    M_i = sum_j W_ij B_j A_j           (d_out, d_in), float64
    M_i ~= U_r S_r V_r^T               truncated SVD
    B_i = U_r sqrt(S_r),  A_i = sqrt(S_r) V_r^T

and mixes every other tensor (the head) as Dec-LoRA does. Mixing products is what the averaged model
should be (the mean of the updates); separate factor mixing instead averages A and B and adds the
cross terms ``B_j A_k``. Two costs: the SVD per module per round, and the re-factoring changes the
basis of A and B, so each client's Adam moments then refer to rotated coordinates.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from declora.algorithms.base import Algorithm
from declora.algorithms.dec_ffa_lora import is_lora_A
from declora.comm.base import Communicator, State
from declora.mixing.kernel import weighted_sum


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


def mix_products(
    weights: Sequence[float], Bs: Sequence[torch.Tensor], As: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``refactor(sum_j w_j B_j A_j, r)`` for one LoRA module; B_j (d_out, r), A_j (r, d_in)."""
    product = weighted_sum(weights, [B.double() @ A.double() for B, A in zip(Bs, As, strict=True)], torch.float64)
    B, A = refactor(product, As[0].shape[0])
    return B.to(Bs[0].dtype), A.to(As[0].dtype)


def decaf_mix(weights: Sequence[float], states: Sequence[State]) -> State:
    """One client's new state from its neighbourhood: products for LoRA pairs, plain mixing otherwise.

    Args:
        weights: ``W[i, j]`` for the states given, in the same order (the client itself included).
        states: the states of i and its neighbours.
    """
    out: State = {}
    for name, own in states[0].items():
        if is_lora_A(name):
            continue
        a_name = name.replace(".lora_B.", ".lora_A.")
        if a_name != name and a_name in states[0]:
            out[name], out[a_name] = mix_products(weights, [s[name] for s in states], [s[a_name] for s in states])
        else:
            out[name] = weighted_sum(weights, [s[name] for s in states], own.dtype)
    missing = states[0].keys() - out.keys()
    if missing:
        raise ValueError(f"LoRA A tensors without a matching B: {sorted(missing)[:3]}")
    return {n: out[n] for n in states[0]}


class DecDeCAF(Algorithm):
    name = "dec_decaf"
    uses_graph = True

    def communicate(
        self,
        states: dict[int, State],
        comm: Communicator,
        W: np.ndarray,
        participants: Sequence[int] | None = None,
    ) -> tuple[dict[int, State], int]:
        received, sent = comm.send(states, W)
        mixed = {}
        for i, own in states.items():
            if not received[i]:  # offline or every link down this round: it keeps its factors untouched
                mixed[i] = own
                continue
            inbox = received[i] | {i: own}
            order = sorted(inbox)
            mixed[i] = decaf_mix([float(W[i, j]) for j in order], [inbox[j] for j in order])
        return mixed, sent
