"""Data: local loading, label maps, one-time tokenization, batch streams."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA, _head, require_shared_data

from declora.config import DataConfig, ModelConfig
from declora.data.loading import BatchStream, collate, load_task
from declora.errors import DataError
from declora.model.loading import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():  # noqa: ANN201
    return load_tokenizer(ModelConfig(name_or_path="minilm"))


def test_sst2_local_files_load_with_quotes_intact(sst2_small: Path, tokenizer) -> None:  # noqa: ANN001
    data = load_task(DataConfig(task="sst2", path=str(sst2_small)), tokenizer, max_length=64)
    assert (len(data.train), len(data.eval)) == (600, 120)
    assert data.label_names == ["negative", "positive"]
    assert set(np.unique(data.train.labels)) == {0, 1}
    assert max(len(x) for x in data.train.input_ids) <= 64
    raw = (sst2_small / "train.tsv").read_text().splitlines()[1:]
    assert data.train.labels.tolist() == [int(line.rsplit("\t", 1)[1]) for line in raw]


def test_agnews_string_labels_map_to_the_four_classes(tmp_path: Path, tokenizer) -> None:  # noqa: ANN001
    require_shared_data("agnews")
    for split in ("train", "test"):
        _head(SHARED_DATA / "agnews" / f"{split}.tsv", tmp_path / f"{split}.tsv", 200)
    data = load_task(DataConfig(task="agnews", path=str(tmp_path)), tokenizer, max_length=128)
    assert data.label_names == ["World", "Sports", "Business", "Sci/Tech"]
    assert data.num_labels == 4 and set(np.unique(data.train.labels)) <= {0, 1, 2, 3}
    assert len(np.unique(data.eval.labels)) >= 2


def test_generic_task_with_csv_and_pairs(tmp_path: Path, tokenizer) -> None:  # noqa: ANN001
    rows = "premise,hypothesis,gold\n" + "".join(f"a cat {i},a dog {i},{'yes' if i % 2 else 'no'}\n" for i in range(20))
    (tmp_path / "train.csv").write_text(rows)
    (tmp_path / "test.csv").write_text(rows)
    cfg = DataConfig(
        task="generic",
        path=str(tmp_path),
        text_column="premise",
        text_pair_column="hypothesis",
        label_column="gold",
    )
    data = load_task(cfg, tokenizer, max_length=32)
    assert data.label_names == ["no", "yes"]
    assert data.train.token_type_ids is not None
    batch = collate(data.train, np.array([0, 1]), data.pad_token_id, torch.device("cpu"))
    assert batch["token_type_ids"].max() == 1  # the second segment is marked


def test_unknown_label_values_are_named(tmp_path: Path, tokenizer) -> None:  # noqa: ANN001
    (tmp_path / "train.tsv").write_text("sentence\tlabel\ngood\t1\nbad\tmaybe\n")
    (tmp_path / "test.tsv").write_text("sentence\tlabel\ngood\t1\n")
    with pytest.raises(DataError, match="unknown labels"):
        load_task(DataConfig(task="sst2", path=str(tmp_path)), tokenizer, max_length=16)


def test_collate_pads_dynamically() -> None:
    from declora.data.loading import TokenizedSplit

    split = TokenizedSplit(input_ids=[[101, 5, 102], [101, 102]], token_type_ids=None, labels=np.array([1, 0]))
    batch = collate(split, np.array([1, 0]), pad_token_id=0, device=torch.device("cpu"))
    assert batch["input_ids"].tolist() == [[101, 102, 0], [101, 5, 102]]
    assert batch["attention_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]
    assert batch["labels"].tolist() == [0, 1]


def test_batch_stream_is_seeded_epoch_complete_and_resumable() -> None:
    idx = np.arange(10, 20)
    a = BatchStream(idx, batch_size=4, seed=0, stream_id=1)
    first = np.concatenate([a.next() for _ in range(5)])  # 20 = two epochs
    assert sorted(first[:10].tolist()) == list(range(10, 20))
    assert sorted(first[10:].tolist()) == list(range(10, 20))
    assert not np.array_equal(first[:10], first[10:])  # a fresh permutation each epoch
    b = BatchStream(idx, batch_size=4, seed=0, stream_id=1)
    b.next()
    state = b.state()
    c = BatchStream(idx, batch_size=4, seed=0, stream_id=1)
    c.load_state(state)
    assert np.array_equal(b.next(), c.next())
    assert not np.array_equal(BatchStream(idx, 4, 0, 2).next(), BatchStream(idx, 4, 0, 1).next())
