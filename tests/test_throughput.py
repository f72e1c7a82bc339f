"""Throughput features: length-grouped batches, chunked tokenization, mixed precision."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from declora.client.precision import autocast, check_mixed_precision, cpu_has_native_bf16, grad_scaler
from declora.config import ConfigError, DataConfig, load_config
from declora.data.grouping import grouped_order, mega_batch_batches, token_lengths
from declora.data.loading import BatchStream, load_task, tokenize_in_chunks
from declora.rundir.layout import read_metrics
from declora.training.trainer import run


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


def test_mixed_precision_refusals(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match=r"^train\.mixed_precision=fp16 needs a CUDA GPU"):
        check_mixed_precision("fp16", torch.device("cpu"))
    with pytest.raises(ConfigError, match="train.mixed_precision='fp8' is not one of no, bf16, fp16"):
        load_config(overrides=["train.mixed_precision=fp8"])
    monkeypatch.setattr("declora.client.precision.cpu_has_native_bf16", lambda: False)
    with pytest.raises(ConfigError, match="AVX512-BF16/AMX") as err:
        check_mixed_precision("bf16", torch.device("cpu"))
    assert "\n" not in str(err.value)
    check_mixed_precision("no", torch.device("cpu"))


def test_refusal_comes_before_the_model_loads(tiny_overrides: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    def no_model(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the mixed-precision check")

    monkeypatch.setattr("declora.training.trainer.build_model", no_model)
    monkeypatch.setattr("declora.training.trainer.load_tokenizer", no_model)
    with pytest.raises(ConfigError, match="fp16"):
        run(load_config(overrides=[*tiny_overrides, "train.mixed_precision=fp16", "model.device=cpu"]))


def test_autocast_and_scaler_pass_through_when_off() -> None:
    lin = torch.nn.Linear(4, 4)
    with autocast("no", torch.device("cpu")):
        assert lin(torch.ones(1, 4)).dtype == torch.float32
    with autocast("bf16", torch.device("cpu")):
        assert lin(torch.ones(1, 4)).dtype == torch.bfloat16
    scaler = grad_scaler("no")
    loss = torch.tensor(2.0)
    assert scaler.scale(loss) is loss and scaler.state_dict() == {}


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no native bfloat16")
def test_bf16_and_grouped_runs_on_the_tiny_model(tiny_overrides: list[str], tmp_path: Path) -> None:
    base = [o for o in tiny_overrides if not o.startswith("out_dir")] + ["eval.clients=false", "save_adapters=false"]
    rows = {}
    for name, extra in {
        "fp32": [],
        "bf16": ["train.mixed_precision=bf16"],
        "grouped": ["data.group_by_length=true"],
    }.items():
        summary = run(load_config(overrides=[*base, *extra, f"out_dir={tmp_path / name}"]))
        rows[name] = read_metrics(Path(summary["run_dir"]))
    loss = {k: [r["train_loss"] for r in v] for k, v in rows.items()}
    assert all(np.isfinite(v).all() for v in loss.values())
    assert loss["bf16"] != loss["fp32"]  # autocast is on: bf16 matmuls round differently ...
    assert np.allclose(loss["bf16"], loss["fp32"], atol=0.05)  # ... but train the same model
    assert loss["grouped"] != loss["fp32"]  # other batches


def test_average_of_many_clients_is_blocked_but_equal() -> None:
    from declora.mixing.kernel import AVERAGE_BLOCK, average_states

    g = torch.Generator().manual_seed(0)
    states = [
        {"a": torch.randn(6, 5, generator=g), "b": torch.randn(3, generator=g)} for _ in range(3 * AVERAGE_BLOCK + 7)
    ]
    mean = average_states(states)
    for name in ("a", "b"):
        reference = torch.stack([s[name].double() for s in states]).mean(0).float()
        assert torch.allclose(mean[name], reference, atol=1e-7, rtol=0)
        assert mean[name].dtype == torch.float32
