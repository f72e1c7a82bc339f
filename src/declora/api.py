"""The Python API: :func:`train` and the :class:`RunResult` it returns.

``declora.train`` runs exactly what ``declora train`` runs (same config, same numbers); it also takes
in-memory datasets, a model and a tokenizer object, and callbacks. Nothing heavy is imported until
it is called.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from declora.errors import ConfigError
from declora.quiet import quiet_libraries

if TYPE_CHECKING:
    from declora.config import Config

from declora.training.result import Inputs, RunResult

__all__ = ["Inputs", "RunResult", "train", "resolve_config"]


def _dotted(values: list[str]) -> dict[str, Any]:
    """``["train.clients=4"]`` -> ``{"train.clients": 4}`` (values parsed as the CLI parses them)."""
    from omegaconf import OmegaConf

    for item in values:
        if not isinstance(item, str) or "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value, e.g. train.clients=10")
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix[:-1]] = node

    walk(OmegaConf.to_container(OmegaConf.from_dotlist(list(values))), "")
    return out


def resolve_config(config: Any = None, /, **overrides: Any) -> Config:
    """The validated :class:`~declora.config.Config` that :func:`train` would run.

    Args:
        config: None (defaults), a ``Config``, a YAML path, a dict (nested and/or dotted keys) or a list
            of ``key=value`` strings.
        overrides: on top of ``config``: sections as dicts (``train={"clients": 4}``), dotted keys
            (``**{"train.clients": 4}``) or top-level options (``out_dir="runs/x"``).
    """
    from declora.config import Config, load_config

    if "config" in overrides:  # config=... by keyword: no option is called that, so it is the config itself
        if config is not None:
            raise ConfigError("config is given twice (positionally and as config=): give it once")
        config = overrides.pop("config")
    if isinstance(config, (list, tuple)):
        config, overrides = None, _dotted(list(config)) | overrides
    elif config is not None and not isinstance(config, (str, Path, dict, Config)):
        raise ConfigError(f"config must be a Config, a YAML path, a dict or a list of key=value, not {type(config)}")
    return load_config(config, overrides)


def _is_section(value: Any, section: type) -> bool:
    """Whether ``value`` is a dict of ``section``'s options (``data={"task": "agnews"}``)."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(section)}
    return isinstance(value, dict) and bool(value) and all(isinstance(k, str) and k in names for k in value)


def _dataset(obj: Any, what: str) -> Any:
    """A ``datasets.Dataset`` from a Dataset, a pandas DataFrame, a list of rows or a dict of columns."""
    import datasets

    if isinstance(obj, datasets.Dataset):
        return obj
    if type(obj).__name__ == "DataFrame":
        return datasets.Dataset.from_pandas(obj, preserve_index=False)
    if isinstance(obj, list):
        return datasets.Dataset.from_list(obj)
    if isinstance(obj, dict) and all(isinstance(v, (list, tuple)) for v in obj.values()):
        return datasets.Dataset.from_dict(obj)
    raise ConfigError(f"{what}: expected a datasets.Dataset (or DataFrame, list of rows, dict of columns)")


def _splits(data: Any, eval_data: Any, cfg: Config) -> dict[str, Any] | None:
    """``{"train", "eval"}`` datasets from ``data`` (a Dataset or a DatasetDict / dict of splits)."""
    if data is None:
        if eval_data is not None:
            raise ConfigError("eval_data= needs data= (the training split)")
        return None
    if cfg.data.path is not None:
        raise ConfigError(f"data= and data.path={cfg.data.path} are alternatives: set data.path=null")
    if isinstance(data, dict) and not all(isinstance(v, (list, tuple)) for v in data.values()):  # DatasetDict too
        if cfg.data.train_split not in data:
            raise ConfigError(f"data has splits {list(data)}, no data.train_split={cfg.data.train_split!r}")
        train = data[cfg.data.train_split]
        if eval_data is None:
            names = [cfg.data.eval_split] if cfg.data.eval_split else ["test", "validation", "eval"]
            found = [n for n in names if n in data]
            if not found:
                raise ConfigError(f"data has splits {list(data)}: set data.eval_split or pass eval_data=")
            eval_data = data[found[0]]
    else:
        train = data
        if eval_data is None:
            raise ConfigError("data= is one split: pass eval_data= too, or a DatasetDict with a test split")
    return {"train": _dataset(train, "data"), "eval": _dataset(eval_data, "eval_data")}


def train(
    config: Any = None,
    /,
    *,
    data: Any = None,
    eval_data: Any = None,
    model: Any = None,
    tokenizer: Any = None,
    callbacks: list[Any] | None = None,
    quiet: bool = True,
    **overrides: Any,
) -> RunResult:
    """Train with a config, exactly as ``declora train`` does; returns a :class:`RunResult`.

    Example (a real MiniLM run of a few minutes, so not executed as a doctest)::

        import declora

        result = declora.train({"train.rounds": 3}, train={"clients": 4}, out_dir="runs/demo")
        print(result.final_accuracy, result.run_dir)

    Args:
        config: None (defaults), a ``Config``, a YAML path, a dict (nested and/or dotted keys) or a list
            of ``key=value`` strings (as on the command line).
        data: training data instead of ``data.path``: a ``datasets.DatasetDict`` (``data.train_split``
            and ``data.eval_split``, else its test/validation split, are used) or one ``Dataset`` (then
            give ``eval_data``); DataFrames, lists of rows and dicts of columns are converted. Columns
            are those of ``data.task`` or ``data.text_column``/``data.label_column``.
        eval_data: the held-out split, when ``data`` is one split.
        model: a transformers model object instead of ``model.name_or_path`` (wrapped with peft in
            place: pass a fresh one to each run). ``model.name_or_path`` records its ``name_or_path``.
        tokenizer: its tokenizer (default: loaded from ``model.name_or_path``).
        callbacks: :class:`declora.Callback` objects (or functions taken as ``on_round_end``).
        quiet: silence datasets/transformers progress bars and load reports during the run.
        overrides: options on top of ``config``, as in :func:`resolve_config`.

    Raises:
        ConfigError: a bad option, split, column or object, before any training.
    """
    from declora.config import DataConfig, ModelConfig
    from declora.training.trackers import check_trackers
    from declora.training.trainer import run

    if _is_section(data, DataConfig):  # data={"task": ...}: the config section, not a dataset
        data, overrides = None, {"data": data} | overrides
    if _is_section(model, ModelConfig):
        model, overrides = None, {"model": model} | overrides
    cfg = resolve_config(config, **overrides)
    splits = _splits(data, eval_data, cfg)
    if model is not None:
        if cfg.model.quantization != "none":
            raise ConfigError("model.quantization applies to models loaded from model.name_or_path: set it to none")
        from dataclasses import replace

        name = str(getattr(model, "name_or_path", "") or "")  # where from_pretrained loaded it
        if not name and tokenizer is None:
            raise ConfigError(f"model= ({type(model).__name__}) was built in memory: pass its tokenizer= too")
        cfg = replace(cfg, model=replace(cfg.model, name_or_path=name or f"<{type(model).__name__} object>"))
    check_trackers(cfg.report_to)
    with quiet_libraries() if quiet else contextlib.nullcontext():
        summary = run(cfg, inputs=Inputs(splits, model, tokenizer), callbacks=callbacks)
    from declora.rundir.layout import METRICS, read_metrics

    run_dir = Path(summary["run_dir"])
    history = read_metrics(run_dir) if (run_dir / METRICS).is_file() else []
    return RunResult(summary, history, run_dir, cfg)
