"""Heterogeneous splits end to end: ``declora partition`` (labels only) and ``declora train partition.kind=...``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from declora.cli.app import main
from declora.config import load_config
from declora.data.loading import load_task, load_train_labels
from declora.model.loading import load_tokenizer
from declora.partition import build_partitioner, partition_counts
from declora.training.trainer import run

SKEW = "[[0.15,0.85],[0.85,0.15],[0.5,0.5]]"


def test_train_labels_alone_are_the_labels_training_uses(tiny_overrides: list[str]) -> None:
    cfg = load_config(overrides=[*tiny_overrides, "data.max_train_examples=250"])
    labels, names, _ = load_train_labels(cfg.data, seed=cfg.train.seed)
    data = load_task(cfg.data, load_tokenizer(cfg.model), cfg.model.max_length, seed=cfg.train.seed)
    assert names == data.label_names == ["negative", "positive"]
    assert np.array_equal(labels, data.train.labels) and len(labels) == 250


def test_partition_cli_prints_the_counts_of_the_split(
    sst2_small: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plot = tmp_path / "split.png"
    argv = ["partition", "label_proportions", "--clients", "3", "--proportions", SKEW]
    assert main([*argv, "--data-path", str(sst2_small), "--json", "--plot", str(plot)]) == 0
    lines = capsys.readouterr().out.splitlines()
    counts = np.array(json.loads(next(line for line in lines if line.startswith("{")))["partition_counts"])
    from declora.config import DataConfig

    labels, _, _ = load_train_labels(DataConfig(path=str(sst2_small)))
    expected = partition_counts(
        build_partitioner("label_proportions", 3, proportions=json.loads(SKEW)).split(labels), labels, 2
    )
    assert np.array_equal(counts, expected)
    shares = counts / counts.sum(1, keepdims=True)
    assert np.abs(shares - np.array(json.loads(SKEW))).max() < 0.01
    table = [line.split() for line in lines if line.split() and line.split()[0].isdigit()]
    assert [[int(x) for x in row[1:4]] for row in table] == [[sum(r), *r] for r in counts.tolist()]
    assert plot.stat().st_size > 5_000


def test_partition_cli_rejects_bad_options(sst2_small: Path) -> None:
    assert main(["partition", "dirichlet", "--clients", "3", "--alpha", "0", "--data-path", str(sst2_small)]) == 2
    assert main(["partition", "label_proportions", "--clients", "3", "--data-path", str(sst2_small)]) == 2


@pytest.mark.parametrize(
    "extra",
    [
        ["partition.kind=dirichlet", "partition.alpha=0.1"],
        ["partition.kind=label_proportions", "partition.proportions=[[0.15,0.85],[0.85,0.15]]"],
        ["partition.kind=shards", "partition.shards_per_client=1"],
    ],
)
def test_train_runs_on_each_heterogeneous_split(extra: list[str], tiny_overrides: list[str]) -> None:
    summary = run(load_config(overrides=[*tiny_overrides, "train.rounds=1", "plots=true", *extra]))
    counts = np.array(summary["partition_counts"])
    cfg = load_config(overrides=[*tiny_overrides, *extra])
    labels, _, _ = load_train_labels(cfg.data)
    p = cfg.partition
    parts = build_partitioner(
        p.kind, 4, alpha=p.alpha, proportions=p.proportions, shards_per_client=p.shards_per_client
    ).split(labels)
    assert np.array_equal(counts, partition_counts(parts, labels, 2))  # the split the CLI prints
    assert (Path(summary["run_dir"]) / "plots" / "partition.png").is_file()
    if p.kind == "shards":  # one label-sorted shard each: only the shard across the class boundary mixes
        assert ((counts > 0).sum(1) > 1).sum() <= 1


def test_centralized_pools_the_union_of_the_clients_split(tiny_overrides: list[str]) -> None:
    skew = ["partition.kind=label_proportions", "partition.proportions=[[0.15,0.85],[0.85,0.15]]"]
    cen = run(load_config(overrides=[*tiny_overrides, "train.rounds=1", "train.algorithm=centralized", *skew]))
    cfg = load_config(overrides=[*tiny_overrides, *skew])
    labels, _, _ = load_train_labels(cfg.data)
    parts = build_partitioner("label_proportions", 4, proportions=cfg.partition.proportions).split(labels)
    assert cen["partition_counts"] == [partition_counts(parts, labels, 2).sum(0).tolist()]
