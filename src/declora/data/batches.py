"""Minibatches: dynamic padding (:func:`collate`) and each client's seeded, resumable index stream."""

from __future__ import annotations

import numpy as np
import torch

from declora.config import ConfigError
from declora.data.grouping import grouped_order
from declora.data.tasks import TokenizedSplit


def collate(split: TokenizedSplit, indices: np.ndarray, pad_token_id: int, device: torch.device) -> dict:
    """Pad the examples ``indices`` of ``split`` to their longest member.

    Returns:
        ``input_ids``, ``attention_mask`` (and ``token_type_ids`` for pairs), each (batch, seq) int64,
        and ``labels`` (batch,) or, with ``lm_labels``, (batch, seq) token targets; on ``device``.
    """
    rows = [split.input_ids[i] for i in indices]
    width = max((len(r) for r in rows), default=0)  # an empty batch: a DP Poisson draw may pick no example
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for k, r in enumerate(rows):
        ids[k, : len(r)] = torch.tensor(r)
        mask[k, : len(r)] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.as_tensor(split.labels[indices])}
    if split.lm_labels is not None:  # causal LM: token targets, -100 (ignored) on prompt and padding
        batch["labels"] = torch.full((len(rows), width), -100, dtype=torch.long)
        for k, i in enumerate(indices):
            batch["labels"][k, : len(split.lm_labels[i])] = torch.tensor(split.lm_labels[i])
    if split.token_type_ids is not None:
        tt = torch.zeros((len(rows), width), dtype=torch.long)
        for k, i in enumerate(indices):
            tt[k, : len(split.token_type_ids[i])] = torch.tensor(split.token_type_ids[i])
        batch["token_type_ids"] = tt
    return {k: v.to(device) for k, v in batch.items()}


class BatchStream:
    """An endless, seeded, resumable stream of minibatch indices over one client's examples.

    Each epoch is a fresh permutation drawn from ``(seed, stream_id, epoch)``, so a stream's batches do
    not depend on what other clients did, and ``state()``/``load_state()`` make resume exact. Given
    ``lengths`` (``data.group_by_length``), each epoch is length-grouped
    (:func:`declora.data.grouping.grouped_order`) from the same seed.

    Example:
        >>> s = BatchStream(np.arange(5), batch_size=2, seed=0, stream_id=3)
        >>> [len(s.next()) for _ in range(3)]
        [2, 2, 2]
    """

    def __init__(
        self, indices: np.ndarray, batch_size: int, seed: int, stream_id: int, lengths: np.ndarray | None = None
    ) -> None:
        if len(indices) == 0:
            raise ConfigError(f"client {stream_id} has no training examples; lower train.clients")
        self.indices, self.batch_size, self.seed, self.stream_id = indices, batch_size, seed, stream_id
        self.lengths = lengths  # token count per example of the split; None = plain shuffling
        self.epoch, self.pos = 0, 0
        self._perm = self._permutation()

    def _permutation(self) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.stream_id, self.epoch])
        if self.lengths is not None:
            # Examples this epoch owes the batch that the previous epoch's last examples began.
            head = (-self.epoch * len(self.indices)) % self.batch_size
            return grouped_order(self.indices, self.lengths, self.batch_size, rng, head)
        return self.indices[rng.permutation(len(self.indices))]

    def next(self) -> np.ndarray:
        """The next ``batch_size`` indices, wrapping into a new epoch (a batch may span two epochs)."""
        out: list[np.ndarray] = []
        need = self.batch_size
        while need > 0:
            take = self._perm[self.pos : self.pos + need]
            out.append(take)
            need -= len(take)
            self.pos += len(take)
            if self.pos >= len(self._perm):
                self.epoch, self.pos = self.epoch + 1, 0
                self._perm = self._permutation()
        return np.concatenate(out)

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state(self, state: dict[str, int]) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._perm = self._permutation()
