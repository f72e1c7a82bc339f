"""Data problems found up front, each one :class:`~declora.errors.DataError` line naming the file and row.

Run while the data is read, before any model is loaded:

- an empty file, or a CSV/TSV file with a header and no rows;
- a file the dataset loader cannot parse (its first error line, with the file's name);
- a label column read as floats because a row is blank or lacks its label (the row is named); a
  float label column without gaps (``0.0``/``1.0``) is read as the integers it holds;
- ``partition.proportions`` rows longer than the number of classes the data has;
- a ``data.validation_split`` the data lacks (:func:`declora.data.validation.check_validation_split`),
  and a client left without examples by the split (:func:`check_partition`, before the model loads).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from declora.errors import ConfigError, DataError

_TEXT_TABLES = (".tsv", ".csv")


def check_file(file: Path) -> None:
    """An empty file, or a table with a header and no rows, stops here.

    Raises:
        DataError: naming the file.
    """
    empty = DataError(f"{file} is empty; give it a header line and one example per line")
    if file.stat().st_size == 0:
        raise empty
    if file.suffix in _TEXT_TABLES:
        rows = 0
        with file.open(encoding="utf-8", errors="replace") as f:
            for line in f:  # stops at the second non-blank line: cheap on any file size
                rows += bool(line.strip())
                if rows > 1:
                    return
        if rows == 0:
            raise empty
        raise DataError(f"{file} has a header line but no examples; add one example per line")


def check_rows(ds: Any, file: Path) -> None:
    """A loaded split with no examples (e.g. a JSON Lines file of blank lines) stops here."""
    if len(ds) == 0:
        raise DataError(f"{file} holds no examples; add one example per line")


def load_error(file: Path, err: Exception) -> DataError:
    """A loader's exception as one line naming the file (the loader's own message is multi-line)."""
    cause = err.__cause__ or err
    detail = " ".join((str(cause).splitlines() or [""])[0].split())[:200]
    return DataError(f"{file} cannot be read as a {file.suffix[1:]} table ({type(cause).__name__}: {detail})")


def _file_line(file: Path, row: int) -> str:
    """Where data row ``row`` (0-based) sits: a line number for CSV/TSV (blank lines skipped as the
    loader does), else the record number."""
    if file.suffix not in _TEXT_TABLES:
        return f"record {row + 1}"
    seen = -1  # the header is row -1
    with file.open(encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if line.strip("\r\n") == "":
                continue
            if seen == row:
                return f"line {number}"
            seen += 1
    return f"data row {row + 1}"


def check_label_column(ds: Any, label_column: str | None, file: Path) -> Any:
    """A float label column: name the first row without a label, else read it as integers.

    Returns:
        ``ds``, with an integral float label column cast to int64.

    Raises:
        DataError: naming the file, the line and the fix.
    """
    if label_column is None or label_column not in ds.column_names:
        return ds
    dtype = getattr(ds.features[label_column], "dtype", "")
    if not str(dtype).startswith("float"):
        return ds
    values = ds[label_column]
    for row, value in enumerate(values):
        if value is None or not math.isfinite(value):
            raise DataError(
                f"{file} {_file_line(file, row)} has no {label_column} (a blank or incomplete row makes the label "
                "column read as numbers); remove that row or fill in its label"
            )
        if value != int(value):
            raise DataError(
                f"{file} {_file_line(file, row)}: {label_column}={value} is not a class label; labels are "
                "integers 0..K-1 or names"
            )
    import datasets

    return ds.cast_column(label_column, datasets.Value("int64"))


def check_proportions(kind: str, proportions: list[list[float]] | None, names: list[str], source: str) -> None:
    """``partition.proportions`` rows must not be longer than the data's number of classes.

    Raises:
        DataError: naming the data, its classes and the option.
    """
    if kind != "label_proportions" or not proportions:
        return
    longest = max(len(row) for row in proportions)
    if longest > len(names):
        raise DataError(
            f"partition.proportions rows have {longest} entries but the training data in {source} has "
            f"{len(names)} classes ({', '.join(names)}); give {len(names)} proportions per row"
        )


def _empty_client_fix(partition: Any) -> str:
    """How to give every client data under ``partition.kind`` (named by option)."""
    if partition.kind == "dirichlet":
        return (
            f"set partition.min_partition_size >= 1 (now {partition.min_partition_size}; Dirichlet then resamples) "
            f"or raise partition.alpha (now {partition.alpha:g})"
        )
    if partition.kind == "shards":
        return f"lower partition.shards_per_client (now {partition.shards_per_client}) or train.clients"
    if partition.kind == "label_proportions":
        return "give that client a share of a class the data has in partition.proportions"
    return "lower train.clients or raise data.max_train_examples"


def check_partition(parts: list[Any], partition: Any) -> None:
    """Every client's share of the training data must hold an example (checked before the model loads).

    Args:
        parts: each worker's training indices (a pooled, centralized run has one).
        partition: the ``partition`` section, for the fix.

    Raises:
        ConfigError: naming the first empty client, how many are empty, and the option to change.
    """
    empty = [i for i, part in enumerate(parts) if len(part) == 0]
    if empty:
        raise ConfigError(
            f"partition.kind={partition.kind} leaves client {empty[0]} with no training examples "
            f"({len(empty)} of {len(parts)} clients empty); {_empty_client_fix(partition)}"
        )
