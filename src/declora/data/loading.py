"""Loading a task once and tokenizing it once (no padding), kept as lists of token ids.

Rows come from :mod:`declora.data.sources`; batches are padded dynamically by
:func:`declora.data.batches.collate`, so short SST-2 sentences cost ~15 tokens rather than ``max_length``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from declora.config import ConfigError, DataConfig
from declora.data.batches import BatchStream, collate
from declora.data.sources import find_data_dir, label_ids, load_hub, load_local, read_splits, subsample
from declora.data.tasks import TASKS, TaskData, TaskSpec, TokenizedSplit

__all__ = [  # BatchStream, collate and the task types are re-exported: callers import them from here too
    "TASKS",
    "BatchStream",
    "TaskData",
    "TaskSpec",
    "TokenizedSplit",
    "collate",
    "find_data_dir",
    "load_task",
    "load_train_labels",
    "read_splits",
    "tokenize_in_chunks",
]


TOKENIZE_CHUNK = 1000  # rows per tokenizer call: caps the fast tokenizer's per-call Encoding objects


def tokenize_in_chunks(
    tokenizer: Any, texts: list[str], pairs: list[str] | None = None, chunk: int | None = None, **kwargs: Any
) -> dict[str, list[list[int]]]:
    """``tokenizer(texts, pairs, **kwargs)``'s id lists, ``chunk`` (default :data:`TOKENIZE_CHUNK`) rows per
    call: the same ids, but the per-row Encoding objects of one call over a whole split (+200 MB of peak
    memory for SST-2's 60k training rows) are never all alive at once."""
    chunk = chunk or TOKENIZE_CHUNK
    out: dict[str, list[list[int]]] = {}
    for start in range(0, max(len(texts), 1), chunk):  # one call for an empty split, as before
        part = pairs[start : start + chunk] if pairs is not None else None
        enc = tokenizer(texts[start : start + chunk], part, **kwargs)
        for key, value in enc.items():
            out.setdefault(key, []).extend(value)
    return out


def load_task(
    cfg: DataConfig, tokenizer: Any, max_length: int, seed: int = 0, given: dict[str, Any] | None = None
) -> TaskData:
    """Load, label-map and tokenize the train and held-out splits of ``cfg.task`` (or ``given`` ones:
    see :func:`read_splits`).

    Raises:
        ConfigError: missing files or columns, unknown labels, unreachable hub.
    """
    spec = TASKS.get(cfg.task)
    text_col = cfg.text_column or (spec.text_column if spec else None)
    label_col = cfg.label_column or (spec.label_column if spec else None)
    if text_col is None or label_col is None:
        raise ConfigError("data.task=generic needs data.text_column and data.label_column")
    raw, source = read_splits(cfg, given)
    for part, ds in raw.items():
        for col in (text_col, label_col, cfg.text_pair_column):
            if col is not None and col not in ds.column_names:
                option = (
                    "data.text_pair_column"
                    if col == cfg.text_pair_column
                    else ("data.text_column" if col == text_col else "data.label_column")
                )
                raise ConfigError(f"{option}={col!r} is not a column of the {part} split {ds.column_names}")

    raw["train"] = subsample(raw["train"], cfg.max_train_examples, seed)
    raw["eval"] = subsample(raw["eval"], cfg.max_eval_examples, seed + 1)
    if spec is not None:
        names = list(spec.label_names)
    else:  # generic: string labels sorted, integer labels 0..max
        values = raw["train"][label_col]
        names = (
            [str(v) for v in sorted(set(values))]
            if isinstance(values[0], str)
            else [str(i) for i in range(int(max(values)) + 1)]
        )

    def tokenize(ds: Any, part: str) -> TokenizedSplit:
        texts = [str(t) if t is not None else "" for t in ds[text_col]]
        pairs = [str(t) for t in ds[cfg.text_pair_column]] if cfg.text_pair_column else None
        # No attention masks (collate builds them) and no token types for single texts: less peak memory.
        enc = tokenize_in_chunks(
            tokenizer,
            texts,
            pairs,
            truncation=True,
            max_length=max_length,
            return_attention_mask=False,
            return_token_type_ids=pairs is not None,
        )
        return TokenizedSplit(
            input_ids=enc["input_ids"],
            token_type_ids=enc.get("token_type_ids") if pairs is not None else None,
            labels=label_ids(ds[label_col], names, f"{part} split of {source}"),
        )

    return TaskData(
        train=tokenize(raw["train"], "train"),
        eval=tokenize(raw["eval"], "eval"),
        label_names=names,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
        source=source,
    )


def load_train_labels(cfg: DataConfig, seed: int = 0) -> tuple[np.ndarray, list[str], str]:
    """The training split's labels only (no tokenizer, no model): what a partitioner needs.

    The same file, subset (``data.max_train_examples`` drawn with ``seed``) and label map as
    :func:`load_task`, so a split drawn from these labels is the split a training run uses.

    Returns:
        ``(labels, label_names, source)``: int64 labels (n,), class names, where the data came from.
    """
    spec = TASKS.get(cfg.task)
    label_col = cfg.label_column or (spec.label_column if spec else None)
    if label_col is None:
        raise ConfigError("data.task=generic needs data.label_column")
    directory = find_data_dir(cfg)
    if directory is None and spec is None:
        raise ConfigError("data.task=generic needs data.path=DIR")
    if directory is not None:
        ds, source = load_local(directory, cfg.train_split, label_col), str(directory)
    else:
        assert spec is not None
        ds, source = load_hub(spec, cfg.train_split), "hub:" + "/".join(p for p in spec.hub_path if p)
    if label_col not in ds.column_names:
        raise ConfigError(f"data.label_column={label_col!r} is not a column of the train split {ds.column_names}")
    ds = subsample(ds, cfg.max_train_examples, seed)
    values = ds[label_col]
    if spec is not None:
        names = list(spec.label_names)
    elif isinstance(values[0], str):
        names = [str(v) for v in sorted(set(values))]
    else:
        names = [str(i) for i in range(int(max(values)) + 1)]
    return label_ids(values, names, f"train split of {source}"), names, source
