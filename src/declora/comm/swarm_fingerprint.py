"""One experiment per swarm: a fingerprint of the config keys every peer must agree on.

Peers that train with another LoRA rank, another client count or another graph would be mixed (or
dropped every round) while each believes the run is fine. Every peer announces, in its DHT record, a
digest of these keys (:data:`KEYS`, plus every ``comm.robust*`` option) and one short hash per key, so
that a neighbour whose digest differs is refused and both sides can name the keys that differ without
revealing their values. Messages carry the digest too (:func:`declora.comm.messages.make_header`), so a
message from another run is dropped and named.

Per-peer settings (``swarm.*``, ``out_dir``, ``model.device``, data paths) are not part of it; the model
is compared by ``model.name_or_path`` as written, so every machine must name it the same way.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

KEYS = (
    "model.name_or_path",
    "model.revision",
    "model.task_type",
    "model.quantization",
    "peft.*",
    "train.algorithm",
    "train.clients",
    "train.rounds",
    "train.local_steps",
    "train.batch_size",
    "train.seed",
    "topology.*",
    "privacy.*",
    "comm.robust*",
)


def _short(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:12]


def fingerprint_values(cfg: Any) -> dict[str, Any]:
    """The values the fingerprint covers, by dotted key (keys absent from this config are skipped)."""
    out: dict[str, Any] = {}
    for spec in KEYS:
        section, _, name = spec.partition(".")
        sub = getattr(cfg, section, None)
        if sub is None or not dataclasses.is_dataclass(sub):
            continue
        fields = [f.name for f in dataclasses.fields(sub)]
        if name.endswith("*"):
            chosen = [f for f in fields if f.startswith(name[:-1])]
        else:
            chosen = [name] if name in fields else []
        for f in chosen:
            out[f"{section}.{f}"] = getattr(sub, f)
    return out


@dataclasses.dataclass(frozen=True)
class Fingerprint:
    """``digest``: one hash of everything; ``keys``: one short hash per dotted key."""

    digest: str
    keys: dict[str, str]

    @classmethod
    def of(cls, cfg: Any) -> Fingerprint:
        values = fingerprint_values(cfg)
        keys = {k: _short(v) for k, v in sorted(values.items())}
        return cls(_short(keys), keys)

    def differing(self, other: dict[str, str] | tuple[tuple[str, str], ...]) -> list[str]:
        """The dotted keys whose hashes differ from ``other``'s (a key only one side has counts)."""
        theirs = dict(other)
        return sorted(k for k in set(self.keys) | set(theirs) if self.keys.get(k) != theirs.get(k))


def describe(keys: list[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "") if keys else "(unknown keys)"
