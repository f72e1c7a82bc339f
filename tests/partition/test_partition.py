"""Tests for declora.partition (synthetic labels, fast)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from declora.partition import (
    PARTITIONERS,
    DirichletPartitioner,
    IidPartitioner,
    LabelProportionsPartitioner,
    ShardPartitioner,
    build_partitioner,
    partition_counts,
    plot_partition,
)

PAPER_SKEW = [[0.15, 0.85], [0.85, 0.15], [0.5, 0.5]]


def make_labels(n: int = 2000, num_classes: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, num_classes, size=n)


def assert_disjoint_sorted(parts: list[np.ndarray], n: int, all_used: bool) -> None:
    for p in parts:
        assert p.dtype == np.int64
        assert np.all(np.diff(p) > 0)
    flat = np.concatenate(parts)
    assert len(np.unique(flat)) == len(flat)
    assert flat.min() >= 0 and flat.max() < n
    if all_used:
        assert len(flat) == n


def test_iid_uses_every_index_once_and_balanced() -> None:
    labels = make_labels(2003, 3)
    parts = IidPartitioner(7, seed=1).split(labels)
    assert len(parts) == 7
    assert_disjoint_sorted(parts, labels.size, all_used=True)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


def test_iid_seeded() -> None:
    labels = make_labels()
    a = IidPartitioner(5, seed=3).split(labels)
    b = IidPartitioner(5, seed=3).split(labels)
    c = IidPartitioner(5, seed=4).split(labels)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_num_partitions_validated(bad: object) -> None:
    with pytest.raises(ValueError, match="train.clients"):
        IidPartitioner(bad)  # type: ignore[arg-type]


def test_fewer_examples_than_clients() -> None:
    with pytest.raises(ValueError, match="train.clients"):
        IidPartitioner(10).split(np.zeros(5, dtype=int))


def test_dirichlet_large_alpha_is_near_iid() -> None:
    labels = make_labels(2000, 3)
    parts = DirichletPartitioner(5, alpha=1e4, seed=0).split(labels)
    assert_disjoint_sorted(parts, labels.size, all_used=True)
    counts = partition_counts(parts, labels, 3)
    global_share = np.bincount(labels, minlength=3) / labels.size
    shares = counts / counts.sum(axis=1, keepdims=True)
    assert np.abs(shares - global_share).max() < 0.05


def test_dirichlet_small_alpha_is_skewed() -> None:
    labels = make_labels(2000, 2)
    parts = DirichletPartitioner(10, alpha=0.1, min_partition_size=1, seed=0).split(labels)
    assert_disjoint_sorted(parts, labels.size, all_used=True)
    counts = partition_counts(parts, labels, 2)
    assert counts.sum(axis=1).min() >= 1
    max_share = (counts.max(axis=1) / counts.sum(axis=1)).mean()
    assert max_share > 0.85  # alpha=1 gives ~0.79 here, alpha=1e4 ~0.52
    near_iid = DirichletPartitioner(10, alpha=1e4, seed=0).split(labels)
    iid_counts = partition_counts(near_iid, labels, 2)
    assert (iid_counts.max(axis=1) / iid_counts.sum(axis=1)).mean() < 0.6


def test_dirichlet_seeded() -> None:
    labels = make_labels()
    a = DirichletPartitioner(4, alpha=0.5, seed=2).split(labels)
    b = DirichletPartitioner(4, alpha=0.5, seed=2).split(labels)
    c = DirichletPartitioner(4, alpha=0.5, seed=3).split(labels)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_dirichlet_min_partition_size_unreachable() -> None:
    labels = make_labels()
    with pytest.raises(ValueError, match=r"partition\.min_partition_size"):
        DirichletPartitioner(4, alpha=0.5, min_partition_size=600).split(labels)
    # Feasible on paper but not reachable with such a skewed alpha: flwr's retries run out.
    with pytest.raises(ValueError, match=r"partition\.alpha") as err:
        DirichletPartitioner(20, alpha=0.01, min_partition_size=90, max_tries=2).split(labels)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("alpha", [0, -1.0, float("nan")])
def test_dirichlet_bad_alpha(alpha: float) -> None:
    with pytest.raises(ValueError, match=r"partition\.alpha"):
        DirichletPartitioner(4, alpha=alpha)


def test_label_proportions_paper_skew() -> None:
    labels = make_labels(2000, 2)
    p = LabelProportionsPartitioner(3, PAPER_SKEW, seed=0)
    parts = p.split(labels)
    assert_disjoint_sorted(parts, labels.size, all_used=False)
    counts = partition_counts(parts, labels, 2)
    n = int(counts.sum(axis=1)[0])
    assert (counts.sum(axis=1) == n).all()
    assert np.abs(counts - n * np.array(PAPER_SKEW)).max() <= 1
    # n is as large as the scarcer class allows (its 1.5 * n examples), up to rounding.
    scarce = np.bincount(labels).min()
    assert scarce / 1.5 - 3 <= n <= scarce / 1.5 + 3
    assert (counts.sum(axis=0) <= np.bincount(labels)).all()


def test_label_proportions_repeat_shorthand() -> None:
    labels = make_labels(2000, 2)
    parts = LabelProportionsPartitioner(6, PAPER_SKEW, seed=0).split(labels)
    assert len(parts) == 6
    assert_disjoint_sorted(parts, labels.size, all_used=False)
    counts = partition_counts(parts, labels, 2)
    n = int(counts.sum(axis=1)[0])
    assert (counts.sum(axis=1) == n).all()
    assert np.abs(counts - n * np.array(PAPER_SKEW * 2)).max() <= 1
    with pytest.raises(ValueError, match=r"partition\.proportions"):
        LabelProportionsPartitioner(5, PAPER_SKEW)


@pytest.mark.parametrize(
    "bad",
    [
        [[0.2, 0.7], [0.5, 0.5]],  # row does not sum to 1
        [[1.5, -0.5], [0.5, 0.5]],  # negative entry
        [[0.5, 0.5], [1.0]],  # ragged
        [],
    ],
)
def test_label_proportions_invalid(bad: list[list[float]]) -> None:
    with pytest.raises(ValueError, match=r"partition\.proportions"):
        LabelProportionsPartitioner(2, bad)


def test_label_proportions_wrong_class_count() -> None:
    with pytest.raises(ValueError, match=r"partition\.proportions"):
        LabelProportionsPartitioner(3, PAPER_SKEW).split(make_labels(2000, 3))


@pytest.mark.parametrize("labels", [np.repeat(np.arange(4), 500), make_labels(2000, 4)])
def test_shards_label_limit_and_disjoint(labels: np.ndarray) -> None:
    spc = 2
    parts = ShardPartitioner(10, shards_per_client=spc, seed=0).split(labels)
    assert_disjoint_sorted(parts, labels.size, all_used=False)
    assert len({len(p) for p in parts}) == 1
    shard_size = labels.size // (10 * spc)
    sorted_labels = np.sort(labels)[: 10 * spc * shard_size].reshape(10 * spc, shard_size)
    straddling = int((sorted_labels[:, 0] != sorted_labels[:, -1]).sum())
    for p in parts:
        assert len(np.unique(labels[p])) <= spc + min(straddling, spc)
    if straddling == 0:  # balanced classes: shards never mix labels
        assert all(len(np.unique(labels[p])) <= spc for p in parts)


def test_shards_match_flwr_datasets() -> None:
    import datasets
    from flwr_datasets.partitioner import ShardPartitioner as FlwrShards

    labels = make_labels(1003, 4, seed=5)
    flwr = FlwrShards(num_partitions=7, partition_by="label", num_shards_per_partition=3, seed=5)
    flwr.dataset = datasets.Dataset.from_dict({"label": labels, "_idx": np.arange(labels.size)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        expected = [np.sort(np.asarray(flwr.load_partition(i)["_idx"])) for i in range(7)]
    got = ShardPartitioner(7, shards_per_client=3, seed=5).split(labels)
    assert all(np.array_equal(a, b) for a, b in zip(expected, got, strict=True))


def test_shards_too_many() -> None:
    with pytest.raises(ValueError, match=r"partition\.shards_per_client"):
        ShardPartitioner(10, shards_per_client=30).split(make_labels(200))


def test_build_partitioner() -> None:
    assert set(PARTITIONERS) == {"iid", "dirichlet", "label_proportions", "shards"}
    for kind in PARTITIONERS:
        part = build_partitioner(kind, 3, seed=1, proportions=PAPER_SKEW)
        assert isinstance(part, PARTITIONERS[kind])
        assert len(part.split(make_labels(600))) == 3
    with pytest.raises(ValueError, match=r"partition\.kind"):
        build_partitioner("nope", 3)
    with pytest.raises(ValueError, match=r"partition\.proportions"):
        build_partitioner("label_proportions", 3)


def test_partition_counts() -> None:
    labels = np.array([0, 1, 1, 2])
    counts = partition_counts([np.array([0, 1]), np.array([2, 3])], labels, 3)
    assert counts.tolist() == [[1, 1, 0], [0, 1, 1]]


def test_plot_partition_writes_png(tmp_path) -> None:
    labels = make_labels(600, 3)
    parts = IidPartitioner(4).split(labels)
    out = tmp_path / "nested" / "dir" / "partition.png"
    plot_partition(partition_counts(parts, labels), str(out), ["a", "b", "c"], title="iid")
    data = out.read_bytes()
    assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"
