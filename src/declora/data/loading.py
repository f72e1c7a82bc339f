"""Tasks, loading (local files or the Hugging Face hub), label maps and one-time tokenization.

A task is read once, tokenized once (no padding), and kept as lists of token ids; batches are padded
dynamically by :func:`collate`, so short SST-2 sentences cost ~15 tokens rather than ``max_length``.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from declora.config import ConfigError, DataConfig
from declora.data import checks as data_checks
from declora.data.grouping import grouped_order
from declora.errors import DataError


@dataclass(frozen=True)
class TaskSpec:
    """Where a task's data lives and what its columns mean."""

    text_column: str
    label_column: str
    label_names: tuple[str, ...]
    local_eval_split: str  # file stem of the held-out split in a local directory
    hub_path: tuple[str, str | None]  # load_dataset(*hub_path)
    hub_eval_split: str


TASKS: dict[str, TaskSpec] = {
    # The shared SST-2 test.tsv is the GLUE validation split: the set papers report SST-2 accuracy on.
    "sst2": TaskSpec("sentence", "label", ("negative", "positive"), "test", ("glue", "sst2"), "validation"),
    "agnews": TaskSpec("text", "label", ("World", "Sports", "Business", "Sci/Tech"), "test", ("ag_news", None), "test"),
}
_EXTENSIONS = {".tsv": "csv", ".csv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


@dataclass
class TokenizedSplit:
    """One split, tokenized: ``input_ids[i]`` is a list of token ids, ``labels`` an int64 array."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None
    labels: np.ndarray
    # causal_lm: per-token targets, -100 on prompt tokens (see declora.causal); collate passes them as labels
    lm_labels: list[list[int]] | None = None

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class TaskData:
    train: TokenizedSplit
    eval: TokenizedSplit
    label_names: list[str]
    pad_token_id: int
    source: str  # where the data came from, recorded in summary.json
    scoring: str = "classifier"  # how evaluate() scores it: classifier, verbalizer, answer_tokens
    verbalizer_ids: list[list[int]] | None = None  # scoring=verbalizer: each label's answer tokens

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


def find_data_dir(cfg: DataConfig) -> Path | None:
    """``data.path`` if given, else the first of ``$DECLORA_DATA/<task>``, ``./data/<task>``,
    ``../shared/data/<task>``."""
    if cfg.path is not None:
        path = Path(cfg.path).expanduser()
        if not path.is_dir():
            raise ConfigError(f"data.path={cfg.path}: no such directory")
        return path
    candidates = [Path("data") / cfg.task, Path("..") / "shared" / "data" / cfg.task]
    if os.environ.get("DECLORA_DATA"):
        candidates.insert(0, Path(os.environ["DECLORA_DATA"]) / cfg.task)
    return next((c for c in candidates if c.is_dir()), None)


def _split_file(directory: Path, split: str) -> Path:
    for ext in _EXTENSIONS:
        if (directory / f"{split}{ext}").is_file():
            return directory / f"{split}{ext}"
    raise ConfigError(
        f"data.path={directory}: no {split}.tsv/.csv/.jsonl/.parquet; set data.train_split/data.eval_split"
    )


def _load_local(directory: Path, split: str, label_column: str | None = None) -> Any:
    """One split file as a Dataset; empty, header-only or unparsable files and blank label rows are
    DataErrors naming the file (and row), see :mod:`declora.data.checks`."""
    import datasets

    file = _split_file(directory, split)
    data_checks.check_file(file)
    builder = _EXTENSIONS[file.suffix]
    kwargs: dict[str, Any] = {}
    if file.suffix == ".tsv":
        # QUOTE_NONE: SST-2 sentences contain bare quote characters that are not CSV quoting.
        kwargs = {"delimiter": "\t", "quoting": csv.QUOTE_NONE}
    try:
        ds = datasets.load_dataset(builder, data_files={split: str(file)}, split=split, **kwargs)
    except Exception as err:  # the loader's errors are long and do not name the file
        raise data_checks.load_error(file, err) from None
    data_checks.check_rows(ds, file)
    return data_checks.check_label_column(ds, label_column, file)


def _load_hub(spec: TaskSpec, split: str) -> Any:
    import datasets

    try:
        return datasets.load_dataset(*[p for p in spec.hub_path if p], split=split)
    except Exception as err:  # offline machines raise many different errors here
        raise ConfigError(
            f"data.path is not set, no local copy was found and the hub is unreachable ({type(err).__name__}); "
            f"pass data.path=DIR with {split}.tsv (e.g. data.path=../shared/data/sst2)"
        ) from None


def _labels(column: list[Any], names: list[str], where: str) -> np.ndarray:
    if all(isinstance(v, (int, np.integer)) for v in column):
        labels = np.asarray(column, dtype=np.int64)
        if labels.min() < 0 or labels.max() >= len(names):
            raise DataError(f"{where}: labels outside 0..{len(names) - 1}; check data.label_column")
        return labels
    index = {name: i for i, name in enumerate(names)}
    unknown = sorted({str(v) for v in column} - index.keys())
    if unknown:
        raise DataError(f"{where}: unknown labels {unknown[:5]}; expected {names}")
    return np.asarray([index[str(v)] for v in column], dtype=np.int64)


def _subsample(ds: Any, limit: int | None, seed: int) -> Any:
    if limit is None or limit >= len(ds):
        return ds
    idx = np.sort(np.random.default_rng(seed).choice(len(ds), size=limit, replace=False))
    return ds.select(idx.tolist())


def read_splits(cfg: DataConfig, given: dict[str, Any] | None = None) -> tuple[dict[str, Any], str]:
    """The raw train and held-out splits (local directory first, else the hub) and where they came from.

    Args:
        given: ``{"train": Dataset, "eval": Dataset}`` passed in memory (``declora.train(data=...)``);
            used instead of any file, then treated exactly as the files would be.
    """
    if given is not None:
        return dict(given), "in-memory datasets.Dataset"
    spec = TASKS.get(cfg.task)
    directory = find_data_dir(cfg)
    if directory is None and spec is None:
        raise ConfigError("data.task=generic needs data.path=DIR")
    if directory is not None:
        eval_split = cfg.eval_split or (spec.local_eval_split if spec else "test")
        label = cfg.label_column or (spec.label_column if spec else None)
        raw = {"train": _load_local(directory, cfg.train_split, label)}
        raw["eval"] = _load_local(directory, eval_split, label)
        return raw, str(directory)
    assert spec is not None
    eval_split = cfg.eval_split or spec.hub_eval_split
    raw = {"train": _load_hub(spec, cfg.train_split), "eval": _load_hub(spec, eval_split)}
    return raw, "hub:" + "/".join(p for p in spec.hub_path if p)


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

    raw["train"] = _subsample(raw["train"], cfg.max_train_examples, seed)
    raw["eval"] = _subsample(raw["eval"], cfg.max_eval_examples, seed + 1)
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
            labels=_labels(ds[label_col], names, f"{part} split of {source}"),
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
        ds, source = _load_local(directory, cfg.train_split, label_col), str(directory)
    else:
        assert spec is not None
        ds, source = _load_hub(spec, cfg.train_split), "hub:" + "/".join(p for p in spec.hub_path if p)
    if label_col not in ds.column_names:
        raise ConfigError(f"data.label_column={label_col!r} is not a column of the train split {ds.column_names}")
    ds = _subsample(ds, cfg.max_train_examples, seed)
    values = ds[label_col]
    if spec is not None:
        names = list(spec.label_names)
    elif isinstance(values[0], str):
        names = [str(v) for v in sorted(set(values))]
    else:
        names = [str(i) for i in range(int(max(values)) + 1)]
    return _labels(values, names, f"train split of {source}"), names, source


def collate(split: TokenizedSplit, indices: np.ndarray, pad_token_id: int, device: torch.device) -> dict:
    """Pad the examples ``indices`` of ``split`` to their longest member.

    Returns:
        ``input_ids``, ``attention_mask`` (and ``token_type_ids`` for pairs), each (batch, seq) int64,
        and ``labels`` (batch,) or, with ``lm_labels``, (batch, seq) token targets; on ``device``.
    """
    rows = [split.input_ids[i] for i in indices]
    width = max((len(r) for r in rows), default=0)  # an empty batch: a DP Poisson draw may pick no example
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for k, r in enumerate(rows):
        ids[k, : len(r)] = torch.tensor(r)
        mask[k, : len(r)] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.as_tensor(split.labels[indices])}
    if split.lm_labels is not None:  # causal LM: token targets, -100 (ignored) on prompt and padding
        batch["labels"] = torch.full((len(rows), width), -100, dtype=torch.long)
        for k, i in enumerate(indices):
            batch["labels"][k, : len(split.lm_labels[i])] = torch.tensor(split.lm_labels[i])
    if split.token_type_ids is not None:
        tt = torch.zeros((len(rows), width), dtype=torch.long)
        for k, i in enumerate(indices):
            tt[k, : len(split.token_type_ids[i])] = torch.tensor(split.token_type_ids[i])
        batch["token_type_ids"] = tt
    return {k: v.to(device) for k, v in batch.items()}


class BatchStream:
    """An endless, seeded, resumable stream of minibatch indices over one client's examples.

    Each epoch is a fresh permutation drawn from ``(seed, stream_id, epoch)``, so a stream's batches do
    not depend on what other clients did, and ``state()``/``load_state()`` make resume exact. Given
    ``lengths`` (``data.group_by_length``), each epoch is length-grouped
    (:func:`declora.data.grouping.grouped_order`) from the same seed.

    Example:
        >>> s = BatchStream(np.arange(5), batch_size=2, seed=0, stream_id=3)
        >>> [len(s.next()) for _ in range(3)]
        [2, 2, 2]
    """

    def __init__(
        self, indices: np.ndarray, batch_size: int, seed: int, stream_id: int, lengths: np.ndarray | None = None
    ) -> None:
        if len(indices) == 0:
            raise ConfigError(f"client {stream_id} has no training examples; lower train.clients")
        self.indices, self.batch_size, self.seed, self.stream_id = indices, batch_size, seed, stream_id
        self.lengths = lengths  # token count per example of the split; None = plain shuffling
        self.epoch, self.pos = 0, 0
        self._perm = self._permutation()

    def _permutation(self) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.stream_id, self.epoch])
        if self.lengths is not None:
            # Examples this epoch owes the batch that the previous epoch's last examples began.
            head = (-self.epoch * len(self.indices)) % self.batch_size
            return grouped_order(self.indices, self.lengths, self.batch_size, rng, head)
        return self.indices[rng.permutation(len(self.indices))]

    def next(self) -> np.ndarray:
        """The next ``batch_size`` indices, wrapping into a new epoch (a batch may span two epochs)."""
        out: list[np.ndarray] = []
        need = self.batch_size
        while need > 0:
            take = self._perm[self.pos : self.pos + need]
            out.append(take)
            need -= len(take)
            self.pos += len(take)
            if self.pos >= len(self._perm):
                self.epoch, self.pos = self.epoch + 1, 0
                self._perm = self._permutation()
        return np.concatenate(out)

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state(self, state: dict[str, int]) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._perm = self._permutation()
