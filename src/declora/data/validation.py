"""Model selection on a validation split, reporting on the held-out (test) split.

``data.validation_split=auto`` (the default) uses the data's own dev split when it has one: a local
``dev``/``validation``/``val`` file other than the held-out and training ones (the shared SST-2 folder
has ``dev.tsv``: 6,735 sentences of the GLUE training split that ``train.tsv`` does not contain). Data
without one (AG News here, the hub's ``glue/sst2``) gets no validation split, and ``best_round`` is then
picked on the held-out split as before, which ``summary.json`` says (``best_round_selected_on: test``).
No slice of the training split is held out by default: that would change the training data, and with
it every number of a run.

Each round the averaged model is scored on at most ``data.max_validation_examples`` (500, a seeded
subset) validation examples: on the default SST-2 run that is ~1/3 of the held-out evaluation's cost.
Scoring changes nothing else (no RNG is drawn), so the per-round test accuracies stay bit-for-bit those
of a run without validation.

A split is loaded *as the run loaded its held-out split* (same columns, label map, tokenization,
subsample seed) by passing it through the run's own loader: :func:`load_split` is also what
``declora eval`` uses, so it reproduces the run's numbers exactly.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from declora.config import Config, ConfigError
from declora.data.sources import find_data_dir, load_hub, load_local
from declora.data.tasks import TASKS, TaskData

DEV_STEMS = ("dev", "validation", "val")  # file stems auto-detected as a validation split
_EXTENSIONS = (".tsv", ".csv", ".jsonl", ".json", ".parquet")


def _has_split(directory: Any, stem: str) -> bool:
    return any((directory / f"{stem}{ext}").is_file() for ext in _EXTENSIONS)


def validation_split_name(cfg: Config) -> str | None:
    """The split that selects the best round, or None (``data.validation_split`` resolved).

    Raises:
        ConfigError: a named split that the data does not have.
    """
    d = cfg.data
    if d.validation_split == "none":
        return None
    directory = find_data_dir(d)
    spec = TASKS.get(d.task)
    if directory is not None:  # as data.read_splits picks the held-out split
        eval_split = d.eval_split or (spec.local_eval_split if spec else "test")
    else:
        eval_split = d.eval_split or (spec.hub_eval_split if spec else None)
    if d.validation_split != "auto":
        if d.validation_split in (d.train_split, eval_split):
            raise ConfigError(
                f"data.validation_split={d.validation_split} is the training or held-out split; "
                "name a third split (e.g. dev) or set it to none"
            )
        if directory is not None and not _has_split(directory, d.validation_split):
            raise ConfigError(
                f"data.validation_split={d.validation_split}: no {d.validation_split}.tsv/.csv/.jsonl/.parquet "
                f"in {directory}; set data.validation_split=none or auto"
            )
        return d.validation_split
    if directory is None:  # the hub: glue/sst2's validation split is already the held-out (test) split
        return None
    return next((s for s in DEV_STEMS if s not in (d.train_split, eval_split) and _has_split(directory, s)), None)


def read_split(cfg: Config, split: str) -> tuple[Any, str]:
    """One raw split (a ``datasets.Dataset``) of the run's data and where it came from."""
    directory = find_data_dir(cfg.data)
    if directory is not None:
        return load_local(directory, split), str(directory)
    spec = TASKS.get(cfg.data.task)
    if spec is None:
        raise ConfigError("data.task=generic needs data.path=DIR")
    return load_hub(spec, split), "hub:" + "/".join(p for p in spec.hub_path if p)


def _label_carrier(raw: Any, cfg: Config, label_names: list[str]) -> Any:
    """A stand-in training split whose labels give the loader exactly ``label_names``.

    Generic data takes its label names from the training labels (sorted strings, or 0..max); one row
    per run label reproduces them without reading (or tokenizing) the real training split.
    """
    spec = TASKS.get(cfg.data.task)
    label_col = cfg.data.label_column or (spec.label_column if spec else None)
    if cfg.data.answer_column is not None or label_col is None or label_col not in raw.column_names:
        return raw.select([0] * min(1, len(raw)))
    integers = [str(i) for i in range(len(label_names))] == label_names or spec is not None
    values: list[Any] = list(range(len(label_names))) if integers else list(label_names)
    carrier = raw.select([0] * len(values)).remove_columns(label_col)
    return carrier.add_column(label_col, values)


def load_split(
    cfg: Config,
    raw: Any,
    source: str,
    tokenizer: Any,
    label_names: list[str],
    max_examples: int | None,
) -> TaskData:
    """``raw`` loaded as the run's held-out split would be: a TaskData whose ``eval`` is it.

    Args:
        max_examples: a seeded subset (the run's ``max_eval_examples`` draw: seed ``train.seed + 1``).
    """
    from declora.data.causal import load_causal_task
    from declora.data.loading import load_task

    data_cfg = replace(cfg.data, max_train_examples=None, max_eval_examples=max_examples)
    load = load_causal_task if cfg.model.task_type == "causal_lm" else load_task
    given = {"train": _label_carrier(raw, cfg, label_names), "eval": raw}
    data = load(data_cfg, tokenizer, cfg.model.max_length, seed=cfg.train.seed, given=given)
    if data.label_names != label_names:
        raise ConfigError(f"{source}: labels {data.label_names} differ from the run's {label_names}")
    data.source = source
    return data


def load_validation(cfg: Config, tokenizer: Any, label_names: list[str]) -> TaskData | None:
    """The run's validation split (``data.validation_split``), capped at ``data.max_validation_examples``."""
    split = validation_split_name(cfg)
    if split is None:
        return None
    raw, source = read_split(cfg, split)
    return load_split(cfg, raw, f"{source} ({split})", tokenizer, label_names, cfg.data.max_validation_examples)


def select_best(history: list[dict[str, Any]]) -> dict[str, Any]:
    """``summary.json``'s best-round fields from the metrics rows.

    With validation rows (``val_accuracy``), ``best_round`` is the first round of highest validation
    accuracy and ``best_accuracy`` the held-out accuracy at that round; without, both come from the
    held-out split (as before validation existed). ``test_best_round``/``test_best_accuracy`` are
    always the held-out maximum: an optimistic number, kept for comparison with older runs.
    """
    test_best = max(history, key=lambda r: r["accuracy"])
    out: dict[str, Any] = {"test_best_accuracy": test_best["accuracy"], "test_best_round": test_best["round"]}
    scored = [r for r in history if r.get("val_accuracy") is not None]
    if not scored:
        return (
            out
            | {"best_accuracy": test_best["accuracy"], "best_round": test_best["round"]}
            | {
                "best_round_selected_on": "test",
                "best_validation_accuracy": None,
            }
        )
    best = max(scored, key=lambda r: r["val_accuracy"])
    return out | {
        "best_accuracy": best["accuracy"],
        "best_round": best["round"],
        "best_round_selected_on": "validation",
        "best_validation_accuracy": best["val_accuracy"],
    }


def improves(history: list[dict[str, Any]], row: dict[str, Any]) -> bool:
    """Whether ``row`` (just appended to ``history``) is a new validation best (ties keep the earlier)."""
    if row.get("val_accuracy") is None:
        return False
    earlier = [r["val_accuracy"] for r in history if r is not row and r.get("val_accuracy") is not None]
    return not earlier or row["val_accuracy"] > max(earlier)


def check_validation_split(cfg: Any, given_splits: Any = None) -> None:
    """``data.validation_split`` must name a split the data has (checked before the data is read).

    Args:
        cfg: the run's config.
        given_splits: datasets passed in memory (``declora.train(data=...)``): they have no validation split.

    Raises:
        ConfigError: naming the option, the folder and the fix.
    """
    if not given_splits:
        validation_split_name(cfg)  # the same resolution load_validation makes after the model loads
