"""``partition.*``: how the training set is split over clients (flwr-datasets vocabulary)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from declora.config.fields import _choice, _f, _int_at_least, _positive, _seed
from declora.errors import ConfigError


@dataclass
class PartitionConfig:
    kind: str = _f("iid", "How training data is split over clients: iid, dirichlet, label_proportions, shards.")
    alpha: float = _f(0.5, "Dirichlet concentration (small = skewed labels); kind=dirichlet.")
    min_partition_size: int = _f(10, "Dirichlet resamples until every client has this many examples.")
    proportions: list[list[float]] | None = _f(
        None, "Per-client class proportions (kind=label_proportions); a shorter list repeats cyclically."
    )
    shards_per_client: int = _f(2, "Label-sorted shards per client (kind=shards).")
    seed: int | None = _f(None, "Partition seed; null = train.seed.")

    def __post_init__(self) -> None:
        _choice("partition.kind", self.kind, ("iid", "dirichlet", "label_proportions", "shards"))
        _positive("partition.alpha", self.alpha)
        if self.kind == "label_proportions" and not self.proportions:
            raise ConfigError("partition.proportions is required for partition.kind=label_proportions")
        _int_at_least("partition.min_partition_size", self.min_partition_size, 0)
        _int_at_least("partition.shards_per_client", self.shards_per_client, 1)
        _seed("partition.seed", self.seed)
        for row in self.proportions or []:
            if not row or any(not math.isfinite(x) or x < 0 for x in row):
                raise ConfigError(
                    f"partition.proportions row {row} must hold finite numbers >= 0, e.g. [[0.15, 0.85], [0.85, 0.15]]"
                )
