"""Heterogeneous LoRA ranks (``peft.ranks``): every peer has its own rank r_i over one shared base.

Peers with different ranks cannot mix A and B entry-wise. Each peer sends its own factors (a rank-r_i
peer sends ``r_i * (d_in + d_out)`` values per module, plus the head, and that is what is counted);
the receiver forms the products and, as in DeCAF (:mod:`declora.algorithms.dec_decaf`), sets

    M_i = sum_j W_ij B_j A_j,   B_i A_i = best rank-r_i factorisation of M_i (truncated SVD).

**One model for all ranks.** The shared PEFT model is built at ``r_max = max(ranks) = peft.r``. A
rank-r_i peer holds ``(r_max, d_in)`` / ``(d_out, r_max)`` tensors whose rows / columns past r_i are
zero; those get exactly zero gradients (the matching column of B / row of A is zero), so under AdamW
(and SGD, with or without weight decay) they stay exactly zero.

**Scaling.** peft multiplies B A by ``lora_alpha / r_max`` in the shared model, while a rank-r_i
adapter of its own would use ``lora_alpha / r_i``. We fold the difference into the tensors: peer i's
factors are stored multiplied by ``c_i = sqrt(r_max / r_i)`` (its initial A too), so
``(alpha / r_max) B~ A~ = (alpha / r_i) B A``: every forward pass, the mixing of products and the
averaged model see each peer's true update. The saved adapter of peer i is divided back by c_i, cut to
r_i and written with ``r = r_i``, so ``PeftModel.from_pretrained`` gives the predictions of training.
One consequence: AdamW's step is per entry, so in its own coordinates a low-rank peer moves its
factors ``1 / c_i`` as far per step as a stand-alone rank-r_i peft model would (the update B A moves
about c_i times slower). With uniform ranks c_i = 1 and this path is dec_decaf exactly.

**The averaged model** (what is evaluated and saved as ``adapters/average``): the exact mean update
``(1/N) sum_j B~_j A~_j`` per module, a LoRA pair of rank ``min(sum_j r_j, d)`` (the head is averaged
entry-wise), as for dec_decaf (:class:`declora.algorithms.dec_decaf.ProductMean`); the consensus error
is measured on the products ``B~_j A~_j``, the update times ``r_max / alpha`` whatever r_j is.

Supported: ``dec_decaf`` (product mixing) and ``local`` (no mixing). Other algorithms mix A and B
separately (dec_lora), freeze a shared A (dec_ffa_lora) or average on a server entry-wise (fedavg):
the config refuses ``peft.ranks`` for them, and for ``runtime=distributed``, whose wire format needs
messages of one size.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from declora.algorithms.base import Algorithm
from declora.algorithms.dec_decaf import DecDeCAF, ProductMean
from declora.algorithms.dec_ffa_lora import is_lora_A
from declora.algorithms.local import LocalOnly
from declora.comm.base import Communicator, State
from declora.config import Config
from declora.mixing.kernel import weighted_sum
from declora.mixing.products import lora_pairs, refactor


def expand_ranks(ranks: Sequence[int], clients: int) -> list[int]:
    """One rank per peer: ``ranks`` repeated cyclically over ``clients`` peers."""
    return [int(ranks[i % len(ranks)]) for i in range(clients)]


def cut(state: State, rank: int) -> State:
    """The message of a rank-``rank`` peer: A's first ``rank`` rows, B's first ``rank`` columns, the rest."""
    out = {}
    for name, t in state.items():
        if is_lora_A(name):
            out[name] = t[:rank]
        elif ".lora_B." in name:
            out[name] = t[:, :rank]
        else:
            out[name] = t
    return out


def pad(B: torch.Tensor, A: torch.Tensor, r_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero columns of B / rows of A up to ``r_max`` (a no-op at r_max)."""
    extra = r_max - A.shape[0]
    if extra == 0:
        return B, A
    return torch.cat([B, B.new_zeros(B.shape[0], extra)], 1), torch.cat([A, A.new_zeros(extra, A.shape[1])], 0)


def mix_hetero(weights: Sequence[float], messages: Sequence[State], own: State, rank: int, r_max: int) -> State:
    """Peer state from its neighbourhood's messages: products mixed and re-factored to ``rank``, padded.

    Args:
        weights: ``W[i, j]`` of the messages, in their order (ascending j, the peer itself included).
        messages: the :func:`cut` states of i and its neighbours, ranks possibly different.
        own: peer i's full (r_max) state: names, dtypes, order.
    """
    out: State = {}
    for b_name, a_name in lora_pairs(own):
        products = [m[b_name].double() @ m[a_name].double() for m in messages]
        B, A = refactor(weighted_sum(weights, products, torch.float64), rank)  # as dec_decaf's mix_products
        out[b_name], out[a_name] = pad(B.to(own[b_name].dtype), A.to(own[a_name].dtype), r_max)
    for name, t in own.items():
        if name not in out:
            out[name] = weighted_sum(weights, [m[name] for m in messages], t.dtype)
    return {n: out[n] for n in own}


class HeteroRanks(ProductMean, Algorithm):
    """What every algorithm does under ``peft.ranks``: per-peer init, averaged model, saved adapters.

    Attributes:
        ranks: r_i of every peer; r_max: the shared model's rank.
    """

    ranks: list[int]
    r_max: int

    def configure(self, cfg: Config) -> None:
        super().configure(cfg)
        self.ranks = expand_ranks(cfg.peft.ranks or [cfg.peft.r], cfg.train.clients)
        self.r_max = cfg.peft.r

    def fold(self, client: int) -> float:
        """c_i = sqrt(r_max / r_i), the factor peer i's stored factors carry (1.0 at r_max)."""
        return math.sqrt(self.r_max / self.ranks[client])

    def client_init(self, client: int, init: State) -> State:
        r = self.ranks[client]
        if r == self.r_max:
            return init
        c, short = self.fold(client), cut(init, r)
        out = {}
        for b_name, a_name in lora_pairs(init):
            out[b_name], out[a_name] = pad(short[b_name] * c, short[a_name] * c, self.r_max)
        return {n: out.get(n, t) for n, t in init.items()}

    def member_ranks(self, members: Sequence[int], like: State) -> list[int]:
        return [self.ranks[i] for i in members]

    def finish_adapter(self, client: int, path: Path) -> None:
        """Cut the saved adapter to the peer's rank r_i, unfolded, with ``r = r_i`` in its config."""
        from safetensors.torch import load_file, save_file

        from declora.rundir.layout import PEFT_CONFIG, PEFT_WEIGHTS

        r = self.ranks[client]
        weights, config = path / PEFT_WEIGHTS, path / PEFT_CONFIG
        if r == self.r_max or not weights.is_file():
            return
        c = self.fold(client)
        tensors = {}
        for name, t in load_file(str(weights)).items():
            if ".lora_A." in name:
                t = (t[:r] / c).contiguous()
            elif ".lora_B." in name:
                t = (t[:, :r] / c).contiguous()
            tensors[name] = t
        save_file(tensors, str(weights), metadata={"format": "pt"})
        settings = json.loads(config.read_text())
        settings["r"] = r
        config.write_text(json.dumps(settings, indent=2, sort_keys=True))


class HeteroDeCAF(HeteroRanks, DecDeCAF):
    """dec_decaf with a rank per peer: messages at the sender's rank, products re-factored to the receiver's."""

    def communicate(
        self,
        states: dict[int, State],
        comm: Communicator,
        W: np.ndarray,
        participants: Sequence[int] | None = None,
    ) -> tuple[dict[int, State], int]:
        messages = {i: cut(s, self.ranks[i]) for i, s in states.items()}
        received, sent = comm.send(messages, W)  # bytes: each message at its own rank
        mixed = {}
        for i, own in states.items():
            if not received[i]:  # offline or isolated this round: keep the factors untouched
                mixed[i] = own
                continue
            inbox = received[i] | {i: messages[i]}
            order = sorted(inbox)
            weights = [float(W[i, j]) for j in order]
            mixed[i] = mix_hetero(weights, [inbox[j] for j in order], own, self.ranks[i], self.r_max)
        return mixed, sent


class HeteroLocal(HeteroRanks, LocalOnly):
    """local training with a rank per peer (nothing is mixed)."""


HETERO_ALGORITHMS: dict[str, type[Algorithm]] = {"dec_decaf": HeteroDeCAF, "local": HeteroLocal}
