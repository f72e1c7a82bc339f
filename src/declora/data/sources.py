"""Where a task's rows come from: local files (TSV/CSV/JSON/Parquet) or the Hugging Face hub, with label maps."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

import numpy as np

from declora.config import ConfigError, DataConfig
from declora.data import checks as data_checks
from declora.data.tasks import TASKS, TaskSpec
from declora.errors import DataError

_EXTENSIONS = {".tsv": "csv", ".csv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


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


def load_local(directory: Path, split: str, label_column: str | None = None) -> Any:
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


def load_hub(spec: TaskSpec, split: str) -> Any:
    import datasets

    try:
        return datasets.load_dataset(*[p for p in spec.hub_path if p], split=split)
    except Exception as err:  # offline machines raise many different errors here
        raise ConfigError(
            f"data.path is not set, no local copy was found and the hub is unreachable ({type(err).__name__}); "
            f"pass data.path=DIR with {split}.tsv (e.g. data.path=../shared/data/sst2)"
        ) from None


def label_ids(column: list[Any], names: list[str], where: str) -> np.ndarray:
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


def subsample(ds: Any, limit: int | None, seed: int) -> Any:
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
        raw = {"train": load_local(directory, cfg.train_split, label)}
        raw["eval"] = load_local(directory, eval_split, label)
        return raw, str(directory)
    assert spec is not None
    eval_split = cfg.eval_split or spec.hub_eval_split
    raw = {"train": load_hub(spec, cfg.train_split), "eval": load_hub(spec, eval_split)}
    return raw, "hub:" + "/".join(p for p in spec.hub_path if p)
