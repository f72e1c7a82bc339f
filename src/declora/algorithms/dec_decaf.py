"""DeCAF-style product mixing (Saadati et al., arXiv 2505.21382): mix ``B_j A_j``, re-factor to rank r.

What goes on the wire: each client sends its factors (A, B and the head), exactly the message of
Dec-LoRA, so the bytes are the same; the receiver forms the products. (Sending the product itself
would cost ``d_out * d_in`` instead of ``r * (d_out + d_in)`` per module, and give the same result.)
Client i then sets, for every LoRA module,

    M_i = sum_j W_ij B_j A_j           (d_out, d_in), float64
    M_i ~= U_r S_r V_r^T               truncated SVD
    B_i = U_r sqrt(S_r),  A_i = sqrt(S_r) V_r^T

and mixes every other tensor (the head) as Dec-LoRA does. Separate factor mixing instead averages A
and B and adds the cross terms ``B_j A_k``. Two costs: the SVD per module per round, and the
re-factoring changes the basis of A and B, so each client's Adam moments then refer to rotated
coordinates.

**The averaged model is the mean update** ``(1/N) sum_i B_i A_i`` per module (plus the mean head),
exactly: each peer's factors come out of its own SVD, with arbitrary signs and rotations, so the mean
of the factors would not be the mean of the products (:class:`ProductMean`,
:mod:`declora.mixing.products`). ``consensus_error`` is measured on the products as well.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from declora.algorithms.base import Algorithm, member_average
from declora.algorithms.dec_ffa_lora import is_lora_A
from declora.comm.base import Communicator, State
from declora.mixing.kernel import weighted_sum
from declora.mixing.products import exact_factors, lora_pairs, mean_rank, product_distance, refactor

__all__ = ["DecDeCAF", "ProductMean", "decaf_mix", "mix_products", "product_average", "refactor"]


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


def product_average(
    comm: Communicator, states: dict[int, State], members: Sequence[int] | None, ranks: Sequence[int]
) -> State:
    """The mean update over ``members`` as one rank-k LoRA pair per module, plus the mean head.

    Every module's mean product ``M = mean_i B_i A_i`` goes through :func:`member_average` (so it is
    the same on every runtime), one module at a time (at most N float64 products of one module live at
    once), and is factored exactly at ``k = mean_rank(ranks)`` (:mod:`declora.mixing.products`).

    Args:
        ranks: r_i of each member (their sum bounds rank(M)).
    """
    like = next(iter(states.values()))
    pairs = lora_pairs(like)
    lora = {n for pair in pairs for n in pair}
    head: State = {}
    if len(lora) < len(like):  # the task head (and any other non-LoRA tensor): entry-wise
        rest = {i: {n: t for n, t in s.items() if n not in lora} for i, s in states.items()}
        head = member_average(comm, rest, members)
    mean_products = {
        b: member_average(comm, {i: {b: s[b].double() @ s[a].double()} for i, s in states.items()}, members)[b]
        for b, a in pairs
    }
    return exact_factors(mean_products, {n: head.get(n, t) for n, t in like.items()}, mean_rank(ranks, like))


class ProductMean:
    """The averaged model and consensus error of product-mixing algorithms: on the products ``B A``.

    ``averaged`` is the exact mean update, held as a LoRA pair of rank ``k = min(sum r_i, d)``, wider
    than the shared model's r (its tensors still run through it: :func:`declora.model.loading.forward_with`
    needs no fixed rank; ``adapters/average`` is saved at rank k). ``distance`` compares products.
    """

    def member_ranks(self, members: Sequence[int], like: State) -> list[int]:
        """r_i of each member: every peer has the shared model's rank (peft.ranks overrides this)."""
        pairs = lora_pairs(like)
        return [like[pairs[0][1]].shape[0] if pairs else 0] * len(members)

    def averaged(self, comm: Communicator, states: dict[int, State], members: Sequence[int] | None = None) -> State:
        chosen = list(range(comm.num_clients)) if members is None else list(members)
        return product_average(comm, states, members, self.member_ranks(chosen, next(iter(states.values()))))

    def distance(self, state: State, mean: State) -> float:
        return product_distance(state, mean)


class DecDeCAF(ProductMean, Algorithm):
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
