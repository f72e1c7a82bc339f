"""Gossip, every variant: exact (``X_i <- sum_j W_ij X_j``), compressed (``X_i <- W_ii X_i + sum_j W_ij Q(X_j)``)
and CHOCO-gossip with error feedback.

All go through :meth:`Communicator.send` only, so the in-process simulation and torch.distributed run
this very code, and all mix with the one kernel :func:`declora.mixing.kernel.mix_row`. In compressed gossip
neighbours receive what the sender quantized; a client's own copy stays exact.

CHOCO-gossip (Koloskova, Stich and Jaggi, 2019): every client keeps public copies ``x̂`` of itself and
of its neighbours. Each round client i sends ``q_i = Q(x_i - x̂_i)``; everyone who knows ``x̂_j`` adds
``q_j`` to it (the sender too, so all copies of ``x̂_j`` agree bit for bit); then
``x_i <- x_i + gamma * sum_j W_ij (x̂_j - x̂_i)``. The compression error is not thrown away but sent
again next round (it is what remains in ``x_i - x̂_i``), and with a doubly stochastic W the mean of the
``x_i`` is preserved exactly, whatever Q does.

Byzantine peers and robust rules (``byzantine.*``, ``comm.robust``): every variant takes an optional
:class:`~declora.byzantine.defense.ByzantineGossip`. Attackers' states are replaced by their attack
before encoding; each client mixes what it received with the robust rule instead of :func:`mix_row`
(CHOCO: the rule picks the target among the public copies, ``x_i += gamma (rule(x̂) - x̂_i)``, which for
clipped_gossip is ``gamma sum_j W_ij clip(x̂_j - x̂_i)``). Without it (the default) nothing changes.
"""

from __future__ import annotations

import numpy as np
import torch

from declora.byzantine.defense import ByzantineGossip
from declora.comm.base import Communicator, neighbors
from declora.mixing.compress import Quantizer, State
from declora.mixing.kernel import mix_row


def rounding_generator(seed: int, round_: int, client: int) -> torch.Generator:
    """The stochastic-rounding RNG of one client's message in one round (independent of process layout)."""
    value = int(np.random.SeedSequence([seed, 0xC0FFEE, round_, client]).generate_state(1)[0])
    return torch.Generator().manual_seed(value)


def exact_gossip(
    comm: Communicator, states: dict[int, State], W: np.ndarray, byzantine: ByzantineGossip | None = None
) -> tuple[dict[int, State], int]:
    """``X_i <- sum_j W_ij X_j`` for every local client and every tensor separately.

    Returns:
        The mixed local states and the bytes the local clients sent.
    """
    if byzantine is not None:
        return _robust_exact(comm, states, W, byzantine)
    received, sent = comm.send(states, W)
    # round_matrix is W itself unless an exchange can fail (runtime=swarm: W_t, see Communicator.round_matrix)
    mixed = {i: mix_row(comm.round_matrix(W, i, received[i]), i, received[i] | {i: own}) for i, own in states.items()}
    return mixed, sent


def _robust_exact(
    comm: Communicator, states: dict[int, State], W: np.ndarray, byzantine: ByzantineGossip
) -> tuple[dict[int, State], int]:
    """:func:`exact_gossip` with attackers' messages and the robust rule."""
    received, sent = comm.send(byzantine.outgoing(states, W, comm.round), W)
    byzantine.observe(received)
    mixed = {
        i: byzantine.mix(comm, comm.round_matrix(W, i, received[i]), i, received[i] | {i: own})
        for i, own in states.items()
    }
    return mixed, sent


def compressed_gossip(
    comm: Communicator,
    states: dict[int, State],
    W: np.ndarray,
    quantizer: Quantizer,
    generators: dict[int, torch.Generator] | None = None,
    byzantine: ByzantineGossip | None = None,
) -> tuple[dict[int, State], int]:
    """``X_i <- W_ii X_i + sum_{j != i} W_ij Q(X_j)`` for every local client and tensor.

    Sums in float64 over ascending j, self included, exactly as :meth:`Communicator.gossip`, so
    ``bits=32`` gives the same numbers bit for bit.

    Returns:
        The mixed local states and the bytes the local clients sent (packed payload).
    """
    generators = generators or {}
    outgoing = byzantine.outgoing(states, W, comm.round) if byzantine is not None else states
    messages = {i: quantizer.encode(s, generators.get(i)) for i, s in outgoing.items()}
    received, sent = comm.send(messages, W)
    decoded = {i: {j: quantizer.decode(m, states[i]) for j, m in received[i].items()} for i in states}
    if byzantine is not None:
        byzantine.observe(decoded)
    mixed: dict[int, State] = {}
    for i, own in states.items():
        Wi = comm.round_matrix(W, i, received[i])  # runtime=swarm: W_t (a failed edge's weight on the diagonal)
        inbox = decoded[i] | {i: own}
        mixed[i] = mix_row(Wi, i, inbox) if byzantine is None else byzantine.mix(comm, Wi, i, inbox)
    return mixed, sent


class QuantizedGossip:
    """Plain compressed gossip as a stateful strategy (the round counter seeds stochastic rounding)."""

    def __init__(self, quantizer: Quantizer, seed: int = 0) -> None:
        self.quantizer = quantizer
        self.seed = seed
        self.rounds = 0
        self.byzantine: ByzantineGossip | None = None  # comm.robust / byzantine.*: set by the algorithm

    def __call__(self, comm: Communicator, states: dict[int, State], W: np.ndarray) -> tuple[dict[int, State], int]:
        self.rounds += 1
        generators = {i: rounding_generator(self.seed, self.rounds, i) for i in states}
        return compressed_gossip(comm, states, W, self.quantizer, generators, self.byzantine)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"rounds": torch.tensor(self.rounds)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.rounds = int(state["rounds"])


class ChocoGossip:
    """CHOCO-gossip with per-client public copies; the copies are this object's (checkpointable) state.

    The public copies start at ``reference``, the initial state every client shares (the same seeded
    adapter and pretrained head), so the first message is already a small update ``Q(x_i - x_0)``;
    CHOCO's textbook start is zeros (``reference=None``), which costs 2-bit gossip several rounds of
    catching up with the pretrained head's full weights.

    Attributes:
        public: ``public[i][j]`` = local client i's copy of ``x̂_j`` for j in ``{i} ∪ neighbours(i)``.
        rounds: gossip steps taken (seeds the stochastic rounding).
    """

    def __init__(self, quantizer: Quantizer, gamma: float, seed: int = 0, reference: State | None = None) -> None:
        self.quantizer = quantizer
        self.gamma = gamma
        self.seed = seed
        self.reference = reference
        self.public: dict[int, dict[int, State]] = {}
        self.rounds = 0
        self.byzantine: ByzantineGossip | None = None  # comm.robust / byzantine.*: set by the algorithm

    def __call__(self, comm: Communicator, states: dict[int, State], W: np.ndarray) -> tuple[dict[int, State], int]:
        """One CHOCO step for every local client; returns the new states and the bytes sent."""
        self.rounds += 1
        for i, own in states.items():
            if i not in self.public:
                ref = self.reference or {}
                start = {n: ref[n].to(t) if n in ref else torch.zeros_like(t) for n, t in own.items()}
                self.public[i] = {j: {n: t.clone() for n, t in start.items()} for j in [i, *neighbors(W, i)]}
        sending = self.byzantine.outgoing(states, W, comm.round) if self.byzantine is not None else states
        messages = {
            i: self.quantizer.encode(
                {n: own[n] - self.public[i][i][n] for n in own},
                rounding_generator(self.seed, self.rounds, i),
            )
            for i, own in sending.items()
        }
        received, sent = comm.send(messages, W)
        mixed: dict[int, State] = {}
        for i, own in states.items():
            inbox = received[i] | {i: messages[i]}  # the sender applies its own q exactly as receivers do
            copies = self.public[i]
            for j, message in inbox.items():
                for name, q in self.quantizer.decode(message, own).items():
                    copies[j][name] += q
            if self.byzantine is not None:
                self.byzantine.observe({i: {j: c for j, c in copies.items() if j != i}})
                target = self.byzantine.mix(comm, W, i, copies)  # the rule's pick among the public copies
                mixed[i] = {
                    n: (x.double() + self.gamma * (target[n].double() - copies[i][n].double())).to(x.dtype)
                    for n, x in own.items()
                }
                continue
            mixed[i] = {}
            for name, x in own.items():
                mine = copies[i][name].double()
                pull = sum(W[i, j] * (copies[j][name].double() - mine) for j in sorted(copies) if j != i)
                mixed[i][name] = (x.double() + self.gamma * pull).to(x.dtype)
        return mixed, sent

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat tensors for a checkpoint: ``public/<i>/<j>/<name>`` and ``rounds``."""
        out = {"rounds": torch.tensor(self.rounds)}
        for i, copies in self.public.items():
            for j, state in copies.items():
                out |= {f"public/{i}/{j}/{name}": t.clone() for name, t in state.items()}
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.rounds = int(state["rounds"])
        self.public = {}
        for key, t in state.items():
            if key.startswith("public/"):
                _, i, j, name = key.split("/", 3)
                self.public.setdefault(int(i), {}).setdefault(int(j), {})[name] = t.clone()


def build_gossip(
    bits: int = 32,
    scale: str = "tensor",
    rounding: str = "nearest",
    error_feedback: bool = False,
    consensus_step: float = 1.0,
    seed: int = 0,
) -> QuantizedGossip | ChocoGossip | None:
    """The gossip strategy for the ``comm.*`` options; None = exact gossip (:func:`exact_gossip`)."""
    quantizer = Quantizer(bits, scale, rounding)
    if error_feedback:
        return ChocoGossip(quantizer, consensus_step, seed)
    return None if quantizer.exact else QuantizedGossip(quantizer, seed)
