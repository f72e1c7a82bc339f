"""Differential privacy for each peer's data: DP-SGD on the peer's trainable tensors, accounted per peer.

``privacy.mechanism=dp_sgd``: at every local step, peer i

1. draws its batch: **Poisson sampling** (``privacy.poisson=true``, the default: every example of the
   peer's n_i joins the step independently with probability ``q_i = train.batch_size / n_i``; a batch
   may be empty), or shuffled fixed-size batches (``poisson=false``: a permutation per epoch cut into
   batches of ``batch_size``, the last incomplete batch of an epoch dropped so that no example appears
   twice in a batch);
2. computes each example's own gradient of its own loss with respect to the trained tensors (LoRA A
   and B, the task head; under dec_ffa_lora B and the head only) in one batched pass with hooks on the
   trained ``nn.Linear`` layers where that applies, else ``torch.func``'s ``vmap`` over ``grad`` of the
   same ``functional_call`` that swaps the peer's tensors into the one shared base
   (declora.client.per_example);
3. clips it to L2 norm ``C = privacy.max_grad_norm`` over all trained tensors jointly (factor
   ``min(1, C / (||g_x|| + 1e-6))``, Opacus' formula; or head and adapters apart with
   ``privacy.clipping=per_group``, the same sensitivity C: declora.client.dp_clipping), sums, adds
   ``N(0, (sigma C)^2)`` to every coordinate, and divides by the expected batch size ``train.batch_size``.
   The optimizer (AdamW/SGD, its state, weight decay, the lr schedule) then only post-processes that noisy gradient.

**Physical batches** (``privacy.physical_batch_size``, Opacus' BatchMemoryManager): step 2-3 run on
chunks of at most that many examples of the drawn batch, and the clipped sums are added up; the noise
(3) is drawn once and the accountant steps once per *logical* batch, so memory is that of a chunk and
the privacy and the update are those of the whole batch. ``train.grad_accumulation > 1`` is refused
under DP (it would noise every micro-batch: sqrt(accumulation) times the noise per optimizer step);
a larger ``train.batch_size`` with a physical batch is the same memory at less noise.

**Accounting.** Every step is one Poisson-subsampled Gaussian mechanism with ``(sigma, q_i)``; Opacus'
``RDPAccountant`` or ``PRVAccountant`` (``privacy.accountant``) composes them. ``sigma`` is
``privacy.noise_multiplier``, or the smallest found by Opacus' ``get_noise_multiplier`` (tolerance
0.01) that keeps peer i's epsilon after its *planned* steps (rounds it takes part in x steps per round)
at or below ``privacy.target_epsilon``; peers of different sizes get
different sigmas. Stragglers and offline rounds only take fewer steps, so the final epsilon stays below.

**The guarantee** (``poisson=true``, ``secure_rng=true``): for each peer i, everything peer i sends over
the whole run (every gossip message, FedAvg upload or, with ``centralized``, the model) is
``(epsilon_i, delta)``-DP with respect to adding or removing one record of peer i's own data, with the
other peers' data fixed, against an adversary who sees every message of every peer and colludes with
all the other peers. The messages are a post-processing of peer i's noisy gradients and of what
peer i received, and what it received depends on peer i's data only through peer i's earlier
messages; so mixing (exact, compressed or CHOCO gossip, DeCAF's re-factoring) adds nothing to
epsilon, and a neighbour's messages consume none of peer i's budget. We claim no amplification from
decentralization (an adversary that sees only some edges would get a smaller epsilon; see
arXiv 2510.17480) nor from FedAvg's client sampling (seeded, so public). ``centralized`` is plain
DP-LoRA on the pooled data, record-level over the pool. Not covered: ``train_loss``, the clipping
statistics (``grad_norm_median``/``_p90``, ``clipped_fraction``) and anything else computed on the
training data and logged (under ``runtime=distributed`` the training losses are
gathered to rank 0 for ``metrics.jsonl``), the partition's label counts in ``summary.json``, and
floating-point side channels of the Gaussian sampler (Opacus' secure mode addresses these; we do not).
``n_i`` is treated as public.

**Approximations, stated.** ``poisson=false`` reports the Poisson accountant at ``q = B / n_i`` for
shuffled fixed-size batches, as Opacus' users, TF Privacy and most papers do; that number is not a
proven bound for shuffling (Chua et al., ICML 2024, show the true epsilon can be larger).
``secure_rng=false`` (default, reproducible) draws noise and batches from ``train.seed``: anyone who
knows the seed and the peer id can regenerate the noise, so such runs measure the *utility* of DP at
that epsilon, not a guarantee. ``secure_rng=true`` seeds every step from the OS's entropy.

With ``noise_multiplier=0``, ``poisson=false`` and a bound never reached (``max_grad_norm=1e9``: clip
factor exactly 1) the update is the non-private one up to float rounding (the per-example sum is
reduced in another order; tests/test_privacy.py).
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from declora.client.dp_accounting import accountant as _accountant
from declora.client.dp_accounting import calibrate, epsilon_of
from declora.client.dp_batches import PoissonStream, ShuffleStream, physical_chunks, rng_seed
from declora.client.dp_clipping import clip_and_sum, clip_groups, clip_groups_and_sum
from declora.client.per_example import per_example_grads
from declora.config import Config, ConfigError, PrivacyConfig

__all__ = [
    "PeerPrivacy",
    "attach",
    "calibrate",
    "clip_and_sum",
    "epsilon_of",
    "metrics",
    "per_example_grads",
    "summary",
]
from declora.types import State

_NOISE = 0xD9  # keeps the noise stream apart from other seeds


@dataclass
class PeerPrivacy:
    """One peer's DP-SGD: its clipping bound, noise multiplier, sampling rate and accountant."""

    cid: int
    cfg: PrivacyConfig
    sigma: float
    q: float  # sampling rate batch_size / n_i
    batch_size: int  # the divisor: the expected batch size
    examples: int
    planned_steps: int
    seed: int
    causal: bool = False
    steps: int = 0  # DP steps taken (= the accountant's steps; numbers the noise generator too)
    accountant: Any = field(init=False)
    norms: list[torch.Tensor] = field(init=False, default_factory=list)  # per-example norms since clip_stats()
    clipped: list[torch.Tensor] = field(init=False, default_factory=list)  # whether each of those was clipped

    def __post_init__(self) -> None:
        self.accountant = _accountant(self.cfg.accountant)

    def clipped_sum(
        self, model: nn.Module, params: State, batch: dict[str, torch.Tensor]
    ) -> tuple[State, torch.Tensor, torch.Tensor]:
        """The sum over the batch of the clipped per-example gradients, in physical chunks.

        Returns:
            ``(summed, losses, norms)``: name -> summed clipped gradient, and the (B,) per-example losses
            and gradient norms before clipping (in chunk order).
        """
        summed: State = {}
        losses, norms = [], []
        pc = self.cfg
        for chunk in physical_chunks(batch, pc.physical_batch_size):
            grads, chunk_losses = per_example_grads(model, params, chunk, self.causal)
            groups = clip_groups(list(grads), pc.max_grad_norm, pc.clipping, pc.head_clip_share)
            part, chunk_norms, chunk_clipped = clip_groups_and_sum(grads, groups)
            self.clipped.append(chunk_clipped.detach().cpu())
            del grads  # the (chunk, *shape) per-example gradients: the memory a physical batch bounds
            summed = part if not summed else {n: summed[n] + g for n, g in part.items()}
            losses.append(chunk_losses)
            norms.append(chunk_norms)
        return summed, torch.cat(losses), torch.cat(norms)

    def loss(self, model: nn.Module, params: State, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The batch's mean loss as a surrogate whose ``backward()`` sets every trained tensor's ``.grad``
        to the clipped, noised gradient (exactly: d/dp sum(p * g) = g), so the caller's backward, loss
        scaling and optimizer step run unchanged. One call = one logical batch = one noise draw and one
        accountant step, whatever ``privacy.physical_batch_size``. An empty Poisson batch has loss 0."""
        trained = {n: p for n, p in params.items() if p.requires_grad}
        device = next(iter(trained.values())).device
        if len(batch["input_ids"]):
            summed, losses, norms = self.clipped_sum(model, params, batch)
            value = losses.float().mean()
            self.norms.append(norms.detach().float().cpu())
        else:
            summed, value = {n: torch.zeros_like(p) for n, p in trained.items()}, torch.zeros((), device=device)
        std = self.sigma * self.cfg.max_grad_norm
        gen = torch.Generator(device=device)
        gen.manual_seed(rng_seed(self.cfg.secure_rng, self.seed, self.cid, self.steps, _NOISE))
        surrogate = torch.zeros((), device=device)
        for n, p in trained.items():
            g = summed[n].float()
            if std > 0:
                g = g + torch.normal(0.0, std, g.shape, generator=gen, device=device)
            surrogate = surrogate + (p * (g / self.batch_size).to(p.dtype)).sum()
        self.accountant.step(noise_multiplier=self.sigma, sample_rate=self.q)
        self.steps += 1
        return surrogate - surrogate.detach() + value

    def clip_stats(self) -> tuple[float, float, float]:
        """(median, 90th percentile) of the per-example gradient norms since the last call, and the
        fraction of those examples that were clipped (norm > C; per_group: any group over its bound); NaNs
        when no example was seen. Resets."""
        flags = torch.cat(self.clipped) if self.clipped and len(self.clipped) == len(self.norms) else None
        norms, self.norms, self.clipped = (torch.cat(self.norms) if self.norms else torch.zeros(0)), [], []
        clipped = flags if flags is not None else norms > self.cfg.max_grad_norm  # flat: norm over C
        if not len(norms):
            return math.nan, math.nan, math.nan
        median, p90 = torch.quantile(norms.double(), torch.tensor([0.5, 0.9], dtype=torch.float64)).tolist()
        return median, p90, float(clipped.double().mean())

    def epsilon(self) -> float:
        return epsilon_of(self.accountant, self.cfg.delta)

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "sigma": self.sigma, "accountant": self.accountant.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["sigma"] != self.sigma:
            raise ConfigError(
                f"resume: peer {self.cid} ran with noise multiplier {state['sigma']:.4g}, this config gives "
                f"{self.sigma:.4g} (privacy.target_epsilon over other train.rounds?): keep the run's train.rounds"
            )
        self.steps = int(state["steps"])
        self.accountant.load_state_dict(state["accountant"])


def planned_steps(cfg: Config, algorithm: Any, cid: int) -> int:
    """DP steps peer ``cid`` will take: rounds it takes part in x steps per round (one noised logical batch
    per optimizer step; train.grad_accumulation > 1 is refused under DP by the config)."""
    tc = cfg.train
    per_round = algorithm.steps_per_round(tc)
    return per_round * sum(cid in algorithm.participants(t, tc) for t in range(1, tc.rounds + 1))


def attach(cfg: Config, algorithm: Any, parts: list[np.ndarray], clients: dict[int, Any]) -> dict[int, Any]:
    """Give every client its :class:`PeerPrivacy` and a DP sampling stream (nothing under mechanism=none)."""
    pc, tc = cfg.privacy, cfg.train
    if pc.mechanism == "none":
        return clients
    if importlib.util.find_spec("opacus") is None:
        raise ConfigError("privacy.mechanism=dp_sgd needs Opacus for its accountant: pip install 'declora[privacy]'")
    for i, c in clients.items():
        n = len(parts[i])
        if tc.batch_size > n:
            raise ConfigError(
                f"privacy.mechanism=dp_sgd: peer {i} has {n} examples < train.batch_size={tc.batch_size}; lower it"
            )
        q, steps = tc.batch_size / n, planned_steps(cfg, algorithm, i)
        sigma = calibrate(pc, q, steps)
        causal = cfg.model.task_type == "causal_lm"
        c.privacy = PeerPrivacy(i, pc, sigma, q, tc.batch_size, n, steps, tc.seed, causal)
        c.stream = (
            PoissonStream(parts[i], q, tc.seed, i, pc.secure_rng)
            if pc.poisson
            else ShuffleStream(parts[i], tc.batch_size, tc.seed, i, pc.secure_rng)
        )
    return clients


CLIP_KEYS = ("grad_norm_median", "grad_norm_p90", "clipped_fraction")


def metrics(clients: dict[int, Any], comm: Any) -> dict[str, Any]:
    """A metrics row's privacy keys ({} without DP): ``epsilon`` (max over all peers), ``epsilon_per_peer``,
    and what clipping did since the previous row: each peer's median and 90th percentile of its per-example
    gradient norms and the fraction of its examples clipped (``<key>_per_peer``; null for a peer that saw
    no example), and their mean over the peers (``<key>``, the scalar that trackers plot)."""
    mine = {i: c.privacy for i, c in clients.items() if getattr(c, "privacy", None) is not None}
    if not mine:
        return {}
    every = comm.gather({i: p.epsilon() for i, p in mine.items()})
    row: dict[str, Any] = {"epsilon": max(every.values()), "epsilon_per_peer": [every[i] for i in sorted(every)]}
    stats = {i: p.clip_stats() for i, p in mine.items()}
    for k, key in enumerate(CLIP_KEYS):
        gathered = comm.gather({i: s[k] for i, s in stats.items()})
        values = [gathered[i] if math.isfinite(gathered[i]) else None for i in sorted(gathered)]
        seen = [v for v in values if v is not None]
        row[key] = float(np.mean(seen)) if seen else None
        row[f"{key}_per_peer"] = values
    return row


def summary(clients: dict[int, Any], comm: Any, cfg: Config) -> dict[str, Any]:
    """summary.json's privacy fields: the final (epsilon, delta) of every peer and how it was spent."""
    mine = {i: c.privacy for i, c in clients.items() if getattr(c, "privacy", None) is not None}
    if not mine:
        return {}
    fields = {
        "epsilon": {i: p.epsilon() for i, p in mine.items()},
        "noise_multiplier": {i: p.sigma for i, p in mine.items()},
        "sample_rate": {i: p.q for i, p in mine.items()},
        "steps": {i: float(p.steps) for i, p in mine.items()},
        "examples": {i: float(p.examples) for i, p in mine.items()},
    }
    every = {k: comm.gather(v) for k, v in fields.items()}
    peers = [
        {"peer": i, "delta": cfg.privacy.delta} | {k: every[k][i] for k in fields} for i in sorted(every["epsilon"])
    ]
    for p in peers:
        p["steps"], p["examples"] = int(p["steps"]), int(p["examples"])
    pc = cfg.privacy
    return {
        "epsilon": max(p["epsilon"] for p in peers),
        "delta": pc.delta,
        "noise_multiplier": max(p["noise_multiplier"] for p in peers),
        "privacy": {
            "mechanism": pc.mechanism,
            "accountant": pc.accountant,
            "poisson": pc.poisson,
            "secure_rng": pc.secure_rng,
            "max_grad_norm": pc.max_grad_norm,
            "clipping": pc.clipping,
            "head_clip_share": pc.head_clip_share if pc.clipping == "per_group" else None,
            "target_epsilon": pc.target_epsilon,
            "peers": peers,
        },
    }
