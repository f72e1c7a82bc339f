"""Length-grouped batches and the batch stream's epochs (declora.data.grouping, BatchStream; from
test_throughput.py)."""

from __future__ import annotations

import numpy as np

from declora.data.grouping import grouped_order, mega_batch_batches, token_lengths
from declora.data.loading import BatchStream


def _lengths(n: int, seed: int = 0) -> np.ndarray:
    """SST-2-like token counts: mostly short, a long tail (3..66)."""
    return np.clip(np.random.default_rng(seed).geometric(1 / 14, size=n) + 2, 3, 66)


def _stream(n: int, bs: int, lengths: np.ndarray | None, stream_id: int = 1) -> BatchStream:
    return BatchStream(np.arange(n), batch_size=bs, seed=0, stream_id=stream_id, lengths=lengths)


def test_grouped_epochs_hold_every_index_once() -> None:
    n, bs = 203, 8  # 203 % 8 != 0: batches straddle epochs
    s = _stream(n, bs, _lengths(n))
    drawn = np.concatenate([s.next() for _ in range(-(-4 * n // bs))])  # 4 epochs and a bit
    for e in range(4):
        assert sorted(drawn[e * n : (e + 1) * n].tolist()) == list(range(n))
    assert not np.array_equal(drawn[:n], drawn[n : 2 * n])


def test_batches_are_sorted_runs_of_their_mega_batch() -> None:
    n, bs, head = 1000, 4, 3
    lengths = np.random.default_rng(1).permutation(n)  # distinct lengths: a batch's run is unambiguous
    order = grouped_order(np.arange(n), lengths, bs, np.random.default_rng(7), head=head)
    # The spec, replayed: shuffle with the same rng, cut into mega-batches, sort each by length (descending).
    shuffled = np.random.default_rng(7).permutation(n)
    mega = mega_batch_batches(n, bs) * bs
    assert mega == 50 * bs
    runs = np.concatenate([b[np.argsort(-lengths[b])] for b in np.split(shuffled, range(mega, n, mega))])
    position = np.empty(n, dtype=np.int64)
    position[runs] = np.arange(n)
    assert order[:head].tolist() == runs[:head].tolist()  # the head completes the previous epoch's batch
    body = order[head : head + (n - head) // bs * bs].reshape(-1, bs)
    for batch in body:
        pos = np.sort(position[batch])
        assert np.array_equal(pos, np.arange(pos[0], pos[0] + bs))  # consecutive in the sorted order
        assert (pos[0] - head) % bs == 0  # aligned to the batch grid that starts after the head
    starts = [int(np.min(position[b])) for b in body]
    assert starts != sorted(starts)  # the batches themselves are shuffled


def test_grouping_cuts_padding_and_keeps_batches_aligned_across_epochs() -> None:
    n, bs = 6700 + 5, 32  # one default client's share of SST-2: 50-batch mega-batches
    lengths = _lengths(n)

    def padded(stream: BatchStream, batches: int) -> tuple[int, int]:
        rows = [stream.next() for _ in range(batches)]
        return sum(len(b) * lengths[b].max() for b in rows), sum(lengths[b].sum() for b in rows)

    pad_g, real_g = padded(_stream(n, bs, lengths), 4 * n // bs)
    pad_u, real_u = padded(_stream(n, bs, None), 4 * n // bs)
    assert pad_u / real_u > 3.0  # random batches: mostly padding
    assert pad_g / real_g < 1.12  # grouped, over 4 epochs with straddling batches


def test_grouped_stream_is_deterministic_and_resumable() -> None:
    n, bs, lengths = 150, 16, _lengths(150)
    a, b = _stream(n, bs, lengths), _stream(n, bs, lengths)
    for _ in range(13):  # past an epoch boundary (150 / 16 = 9.4 batches)
        assert np.array_equal(a.next(), b.next())
    resumed = _stream(n, bs, lengths)
    resumed.load_state(a.state())
    for _ in range(20):
        assert np.array_equal(a.next(), resumed.next())
    assert not np.array_equal(_stream(n, bs, lengths, 2).next(), _stream(n, bs, lengths, 1).next())


def test_ungrouped_stream_is_todays_permutation() -> None:
    idx = np.arange(30, 47)
    s = BatchStream(idx, batch_size=5, seed=3, stream_id=2)
    drawn = np.concatenate([s.next() for _ in range(7)])
    expect = np.concatenate([idx[np.random.default_rng([3, 2, e]).permutation(len(idx))] for e in range(3)])
    assert np.array_equal(drawn, expect[:35])


def test_token_lengths() -> None:
    assert token_lengths([[1, 2, 3], [4], []]).tolist() == [3, 1, 0]
