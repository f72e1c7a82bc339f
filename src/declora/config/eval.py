"""``eval.*``: what is evaluated each round and on how many examples."""

from __future__ import annotations

from dataclasses import dataclass

from declora.config.fields import _f, _int_at_least
from declora.errors import ConfigError


@dataclass
class EvalConfig:
    every: int = _f(1, "Evaluate every this many rounds (the last round is always evaluated).")
    clients: bool = _f(True, "Also evaluate every client's own model (mean/min/max accuracy).")
    client_max_examples: int | None = _f(
        100, "Evaluate clients on a fixed subset of the held-out set (speed); null = all of it."
    )
    batch_size: int = _f(128, "Examples per evaluation batch.")

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ConfigError(f"eval.every={self.every} must be >= 1")
        _int_at_least("eval.batch_size", self.batch_size, 1)
        _int_at_least("eval.client_max_examples", self.client_max_examples, 1, optional=True)
