"""The batches of DP-SGD (declora.client.dp_sgd): Poisson sampling, or shuffled batches without repeats.

Both keep :class:`~declora.data.loading.BatchStream`'s interface (``next``, ``state``, ``load_state``), so a
client swaps its stream and resumes exactly. Seeds come from ``(train.seed, peer, draw)``, or from the
OS's entropy with ``privacy.secure_rng=true``.
"""

from __future__ import annotations

import secrets

import numpy as np

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
