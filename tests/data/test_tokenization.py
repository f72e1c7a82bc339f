"""Chunked tokenization gives the ids of one call over the whole split (declora.data.loading;
from test_throughput.py)."""

from __future__ import annotations

from pathlib import Path

from declora.config import DataConfig
from declora.data.loading import load_task, tokenize_in_chunks


def test_chunked_tokenization_is_identical(tiny_bert: Path, sst2_small: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_bert)
    rows = (sst2_small / "train.tsv").read_text(encoding="utf-8").splitlines()[1:]
    texts = [r.split("\t")[0] for r in rows]
    pairs = texts[::-1]
    for p in (None, pairs):
        whole = tok(texts, p, truncation=True, max_length=16)
        chunked = tokenize_in_chunks(tok, texts, p, chunk=37, truncation=True, max_length=16)
        assert set(chunked) == set(whole.keys())
        for key in chunked:
            assert chunked[key] == whole[key], key
    # load_task (chunked, no attention masks kept) holds the ids of one call over the whole split.
    data = load_task(DataConfig(path=str(sst2_small)), tok, max_length=16)
    assert data.train.input_ids == tok(texts, truncation=True, max_length=16)["input_ids"]
    assert data.train.token_type_ids is None
