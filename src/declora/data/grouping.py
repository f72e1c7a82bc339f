"""Length-grouped epoch orders (``data.group_by_length``): batches of similar length, less padding.

Batches are padded to their longest member, and SST-2 sentences range from 3 to 66 tokens, so a
random batch of 32 is about two thirds padding. HF Trainer's ``group_by_length`` fixes that while
keeping the order random: shuffle the epoch, cut it into mega-batches of ``m`` batches
(``m = min(n // (4 * batch_size), 50)``, at least 1), sort each mega-batch by length, cut it into
batches, and (here) shuffle the order of those batches, so long and short batches alternate instead of
every 50 steps running from long to short.

A :class:`declora.data.loading.BatchStream` draws batches that may straddle two epochs; ``head`` lets an
epoch start with the few examples that complete the previous epoch's last batch, so the batches after
it stay aligned with the sorted runs.
"""

from __future__ import annotations

import numpy as np

MAX_MEGA_BATCH = 50  # batches per mega-batch, as in transformers' get_length_grouped_indices


def mega_batch_batches(n: int, batch_size: int) -> int:
    """Batches per mega-batch for ``n`` examples (HF's rule: at most 50, at least 1, n / 4 batches)."""
    return max(1, min(n // (batch_size * 4), MAX_MEGA_BATCH))


def grouped_order(
    indices: np.ndarray, lengths: np.ndarray, batch_size: int, rng: np.random.Generator, head: int = 0
) -> np.ndarray:
    """One epoch of ``indices`` in length-grouped order.

    Args:
        indices: the examples of the epoch (global ids into ``lengths``).
        lengths: token count of every example of the split (indexed by global id).
        batch_size: examples per batch.
        rng: draws the shuffle and the batch order (seeded by the caller per epoch).
        head: how many examples the epoch's first batch contributes to a batch begun in the previous
            epoch (0 when the epochs are aligned); those come first, then the full batches in random
            order, then the remainder (which the next epoch's head completes).

    Returns:
        A permutation of ``indices``.
    """
    n = len(indices)
    shuffled = indices[rng.permutation(n)]
    mega = mega_batch_batches(n, batch_size) * batch_size
    # Descending length inside each mega-batch (stable: ties keep the shuffled order).
    ordered = np.concatenate(
        [block[np.argsort(-lengths[block], kind="stable")] for block in np.split(shuffled, range(mega, n, mega))]
    )
    head = min(head, n)
    full = (n - head) // batch_size
    body = ordered[head : head + full * batch_size].reshape(full, batch_size)
    return np.concatenate(
        [ordered[:head], body[rng.permutation(full)].reshape(-1), ordered[head + full * batch_size :]]
    )


def token_lengths(input_ids: list[list[int]]) -> np.ndarray:
    """Token count of every example (what a padded batch's width is the maximum of)."""
    return np.fromiter((len(row) for row in input_ids), dtype=np.int64, count=len(input_ids))
