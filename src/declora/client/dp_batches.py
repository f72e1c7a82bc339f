"""The batches of DP-SGD (declora.client.dp_sgd): Poisson sampling, or shuffled batches without repeats.

Both keep :class:`~declora.data.loading.BatchStream`'s interface (``next``, ``state``, ``load_state``), so a
client swaps its stream and resumes exactly. Seeds come from ``(train.seed, peer, draw)``, or from the
OS's entropy with ``privacy.secure_rng=true``. :func:`physical_chunks` cuts a drawn (logical) batch into
the physical chunks that one forward/backward pass holds (``privacy.physical_batch_size``).
"""

from __future__ import annotations

import secrets

import numpy as np
import torch

from declora.data.loading import BatchStream

_SAMPLE = 0x9015  # keeps the sampling stream apart from other seeds


def rng_seed(secure: bool, *words: int) -> int:
    """A 63-bit seed: from the OS's entropy, or derived from ``words`` (seed, peer, counter)."""
    if secure:
        return secrets.randbits(63)
    hi, lo = np.random.SeedSequence(list(words)).generate_state(2)
    return (int(hi) << 31 | int(lo)) & (2**63 - 1)


class PoissonStream:
    """Each draw includes every example independently with probability ``q`` (BatchStream's interface)."""

    def __init__(self, indices: np.ndarray, q: float, seed: int, stream_id: int, secure: bool = False) -> None:
        self.indices, self.q, self.seed, self.stream_id, self.secure = indices, q, seed, stream_id, secure
        self.draws = 0

    def next(self) -> np.ndarray:
        rng = np.random.default_rng(rng_seed(self.secure, self.seed, self.stream_id, self.draws, _SAMPLE))
        self.draws += 1
        return self.indices[rng.random(len(self.indices)) < self.q]

    def state(self) -> dict[str, int]:
        return {"draws": self.draws}

    def load_state(self, state: dict[str, int]) -> None:
        self.draws = int(state["draws"])


class ShuffleStream(BatchStream):
    """BatchStream without batches that span two epochs: an epoch's incomplete tail is dropped, so no
    example is twice in a batch. The same batches as BatchStream when ``batch_size`` divides n."""

    def __init__(self, indices: np.ndarray, batch_size: int, seed: int, stream_id: int, secure: bool) -> None:
        self.secure = secure
        super().__init__(indices, batch_size, seed, stream_id)

    def _permutation(self) -> np.ndarray:
        if self.secure:
            return self.indices[np.random.default_rng(rng_seed(True)).permutation(len(self.indices))]
        return super()._permutation()

    def next(self) -> np.ndarray:
        if self.pos + self.batch_size > len(self._perm):
            self.epoch, self.pos = self.epoch + 1, 0
            self._perm = self._permutation()
        return super().next()


def physical_chunks(batch: dict[str, torch.Tensor], size: int | None) -> list[dict[str, torch.Tensor]]:
    """A logical batch cut into physical chunks of at most ``size`` examples (Opacus' BatchMemoryManager).

    ``size=None`` returns the batch itself (one pass, today's arithmetic bit for bit). Otherwise the
    examples are ordered by length (longest first) before cutting, and each chunk keeps only its own
    longest example's columns (collate pads on the right), so short sentences stop paying for the
    batch's longest one. The order of examples in a logical batch changes nothing but float rounding:
    DP-SGD sums their clipped gradients, and the batch itself was drawn without looking at the data.
    """
    rows = len(batch["input_ids"])
    if size is None or rows == 0:
        return [batch]
    width = batch["input_ids"].shape[1]
    lengths = batch["attention_mask"].sum(1) if "attention_mask" in batch else torch.full((rows,), width)
    order = torch.argsort(lengths, descending=True, stable=True)
    chunks = []
    for start in range(0, rows, size):
        idx = order[start : start + size]
        keep = int(lengths[idx].max())
        chunks.append(
            {k: (v[idx, :keep] if v.dim() == 2 and v.shape[1] == width else v[idx]) for k, v in batch.items()}
        )
    return chunks
