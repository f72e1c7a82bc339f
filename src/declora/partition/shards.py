"""Pathological non-IID partitioning with label-sorted shards (McMahan et al., FedAvg)."""

from __future__ import annotations

import numpy as np

from declora.partition.base import Partitioner, _is_int


class ShardPartitioner(Partitioner):
    """Sorts examples by label, cuts them into equal shards and deals random shards out.

    There are ``num_partitions * shards_per_client`` shards of
    ``len(labels) // (num_partitions * shards_per_client)`` consecutive label-sorted
    examples; each client gets ``shards_per_client`` of them at random (the FedAvg
    paper's pathological non-IID split). A client therefore sees at most
    ``shards_per_client`` labels, plus one for every shard that straddles a class
    boundary. Not every example is used: the ``len(labels) % (num_partitions *
    shards_per_client)`` examples at the end of the sorted order (from the last class)
    are dropped. Implemented with NumPy; it matches
    ``flwr_datasets.partitioner.ShardPartitioner(num_shards_per_partition=...)``, which
    needs a ``Dataset.sort`` round-trip for the same result.

    Args:
        num_partitions: Number of clients (``train.clients``), >= 1.
        shards_per_client: Shards per client (``partition.shards_per_client``), >= 1.
        seed: Seed of the shard assignment.

    Example:
        >>> import numpy as np
        >>> labels = np.repeat(np.arange(5), 20)
        >>> parts = ShardPartitioner(5, shards_per_client=2, seed=0).split(labels)
        >>> [len(p) for p in parts], all(len(set(labels[p])) <= 2 for p in parts)
        ([20, 20, 20, 20, 20], True)
    """

    options = ("shards_per_client",)

    def __init__(self, num_partitions: int, shards_per_client: int = 2, seed: int = 0) -> None:
        super().__init__(num_partitions, seed)
        if not _is_int(shards_per_client) or shards_per_client < 1:
            raise ValueError(f"partition.shards_per_client={shards_per_client!r} is invalid; set it to an integer >= 1")
        self.shards_per_client = int(shards_per_client)

    def split(self, labels: np.ndarray) -> list[np.ndarray]:
        """Splits ``labels``' indices into label-sorted shards; see the class docstring."""
        labels = self._check_labels(labels)
        num_shards = self.num_partitions * self.shards_per_client
        shard_size = labels.size // num_shards
        if shard_size == 0:
            raise ValueError(
                f"train.clients={self.num_partitions} x partition.shards_per_client={self.shards_per_client} "
                f"exceeds the {labels.size} training examples; lower partition.shards_per_client"
            )
        order = np.argsort(labels, kind="stable")[: num_shards * shard_size]
        shards = order.reshape(num_shards, shard_size)
        assignment = np.random.default_rng(self.seed).permutation(num_shards)
        assignment = assignment.reshape(self.num_partitions, self.shards_per_client)
        return self._finalize([shards[row].ravel() for row in assignment])
