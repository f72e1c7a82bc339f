"""``byzantine.*``: which peers attack and how (the attack suite, :mod:`declora.byzantine`)."""

from __future__ import annotations

from dataclasses import dataclass

from declora.config.fields import _choice, _f, _positive
from declora.errors import ConfigError

# the names of declora.byzantine.attacks.ATTACKS (a test checks they agree; config must not import torch)
ATTACK_NAMES = ("sign_flip", "scaled_update", "gaussian", "alie", "ipm", "dissensus", "label_flip")


@dataclass
class ByzantineConfig:
    peers: list[int] = _f(
        [],
        "Client ids of the attacking peers, e.g. [5]; [] = none. They train and mix as usual but send "
        "byzantine.attack's message; the reported model, accuracy and consensus error are the honest peers'.",
    )
    attack: str = _f(
        "scaled_update",
        "sign_flip (-s x), scaled_update (x + s (x - honest mean)), gaussian (x + s N(0, I)), alie (mean - s std "
        "of the honest states), ipm (-s honest mean), dissensus (pull a neighbour away from its neighbours, "
        "eps = s), or label_flip (trains on flipped labels, sends honestly).",
    )
    strength: float | None = _f(
        None,
        "The attack's s (z for alie, eps for ipm/dissensus); null = its default: sign_flip 1, scaled_update 10, "
        "gaussian 1, alie 10, ipm 0.1, dissensus 1.5 (the reference implementation's).",
    )

    def __post_init__(self) -> None:
        _choice("byzantine.attack", self.attack, ATTACK_NAMES)
        if len(set(self.peers)) != len(self.peers):
            raise ConfigError(f"byzantine.peers={self.peers} lists a peer twice: give each attacker once")
        if any(p < 0 for p in self.peers):
            raise ConfigError(f"byzantine.peers={self.peers}: client ids are >= 0")
        if self.strength is not None:
            _positive("byzantine.strength", self.strength)  # 0 would be no attack: set byzantine.peers=[]


def check_byzantine(cfg: object) -> None:
    """Checks across sections (called from :class:`declora.config.root.Config`): ids against
    ``train.clients``, the algorithm, the task type and the robust options."""
    b, t, c = cfg.byzantine, cfg.train, cfg.comm  # type: ignore[attr-defined]
    gossip = ("dec_lora", "dec_ffa_lora")
    if c.robust != "none" and t.algorithm not in gossip:
        raise ConfigError(
            f"comm.robust={c.robust} filters gossip: set train.algorithm to dec_lora or dec_ffa_lora "
            f"(dec_decaf mixes products of factors, which the rules do not cover), or comm.robust=none"
        )
    if not b.peers:
        return
    if len(b.peers) >= t.clients:
        raise ConfigError(
            f"byzantine.peers lists {len(b.peers)} attackers for train.clients={t.clients}: "
            "leave at least one honest peer"
        )
    if max(b.peers) >= t.clients:
        raise ConfigError(f"byzantine.peers={b.peers}: ids must be < train.clients={t.clients}")
    if t.algorithm not in gossip:
        raise ConfigError(
            f"byzantine.peers attack gossip: set train.algorithm to dec_lora or dec_ffa_lora, not {t.algorithm}"
        )
    if b.attack == "label_flip" and cfg.model.task_type == "causal_lm":  # type: ignore[attr-defined]
        raise ConfigError("byzantine.attack=label_flip flips class labels; model.task_type=causal_lm has none")
    if b.attack == "label_flip" and t.batch_clients is not False:  # the batched path reads labels itself
        raise ConfigError("byzantine.attack=label_flip runs clients one at a time: set train.batch_clients=false")
