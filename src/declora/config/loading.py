"""Loading a :class:`Config` from defaults, YAML, dicts and dotted overrides; YAML out; the option help."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException, ValidationError

from declora.config.root import Config
from declora.errors import ConfigError
from declora.rundir.layout import CONFIG  # names only: imports nothing of declora


def load_config(
    path: str | Path | dict[str, Any] | Config | None = None, overrides: list[str] | dict[str, Any] | None = None
) -> Config:
    """Build a validated :class:`Config` from defaults, an optional YAML file and dotted overrides.

    With ``resume=RUN_DIR``, ``RUN_DIR/config.yaml`` is the base under ``path`` and ``overrides``, and
    ``out_dir`` is ``RUN_DIR``.

    Example:
        >>> load_config({"train": {"clients": 4}, "train.rounds": 2}, ["peft.r=4"]).train.rounds
        2

    Args:
        path: YAML file whose keys mirror :class:`Config` (unknown keys are errors), or the same as a
            dict (nested, dotted keys, or both), or a :class:`Config`.
        overrides: ``key=value`` strings, e.g. ``["train.clients=10", "topology.kind=ring"]``, or a dict
            as for ``path``.

    Raises:
        ConfigError: one line naming the offending option.
    """
    schema = OmegaConf.structured(Config)
    try:
        layers = [schema]
        if isinstance(path, (dict, Config)):
            layers.append(_layer(path))
        elif path is not None:
            layers.append(_file_layer(path))
        if isinstance(overrides, dict):
            layers.append(_layer(overrides))
            overrides = []
        for item in overrides or []:
            if not isinstance(item, str) or "=" not in item:
                raise ConfigError(f"override {item!r} must look like key=value, e.g. train.clients=10")
        layers.append(OmegaConf.from_dotlist(list(overrides or [])))
        merged = OmegaConf.merge(*layers)
        saved = Path(merged.resume or "") / CONFIG
        if merged.resume is not None and saved.is_file():  # continue a run: its config is the base layer
            base = OmegaConf.load(saved)
            for once in ("overwrite", "resume_from_scratch"):  # said for one start, never inherited
                base.pop(once, None)
            merged = OmegaConf.merge(schema, base, *layers[1:])
            merged.out_dir = merged.resume  # and it continues in its own directory
        elif isinstance(path, (str, Path)) and merged.out_dir is not None:
            from declora.rundir.protect import reloaded_out_dir  # RUN/config.yaml records RUN: start a new folder

            overridden = any("out_dir" in layer for layer in layers[2:])
            merged.out_dir = reloaded_out_dir(merged.out_dir, True, overridden, None)
        return OmegaConf.to_object(merged)  # type: ignore[return-value]  # runs every __post_init__
    except OmegaConfBaseException as err:
        raise ConfigError(_omegaconf_message(err)) from None


def _file_layer(path: str | Path) -> Any:
    """The OmegaConf layer of a ``--config`` file: YAML whose top level maps sections to options.

    Raises:
        ConfigError: one line naming ``--config`` and the file: missing, unreadable, not valid YAML (with the
            line), or a list or a bare value at the top.
    """
    import yaml

    if not Path(path).is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        text = Path(path).read_text(encoding="utf-8")
        raw = yaml.safe_load(text)  # only to see the top level: OmegaConf takes a bare word for a key
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"--config {path}: cannot be read as UTF-8 text ({err}); give a YAML file") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or " ".join(str(err).split())
        raise ConfigError(f"--config {path}: not valid YAML{where} ({problem}); fix the file") from None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(
            f"--config {path}: holds a {type(raw).__name__}, not options by section; write e.g. 'train: {{rounds: 3}}'"
        )
    return OmegaConf.create(text)  # OmegaConf's own YAML loader (e.g. 1e-5 is a float), on the text read once


def _layer(values: dict[str, Any] | Config) -> Any:
    """An OmegaConf layer from a Config or a dict whose keys may be dotted (``{"train.clients": 4}``)."""
    if isinstance(values, Config):
        return OmegaConf.structured(values)
    nested: dict[str, Any] = {}
    for key, value in values.items():
        if not isinstance(key, str):
            raise ConfigError(f"config key {key!r} must be a string such as 'train.clients'")
        *parents, leaf = key.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"config key {key!r}: {part!r} is an option, not a section")
        if isinstance(value, dict) and isinstance(node.get(leaf), dict):
            node[leaf] = OmegaConf.to_container(OmegaConf.merge(node[leaf], value))
        else:
            node[leaf] = value
    return OmegaConf.create(nested)


def _omegaconf_message(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None) or ""
    first = str(err).splitlines()[0]
    if "not in struct" in first or "Key '" in first and "not" in first:
        return f"unknown option {key!r}: see `declora train --help-config` for the valid keys"
    if isinstance(err, ValidationError):
        expected = _expected_type(err)
        if expected is not None:
            return expected
    return f"{key}: {first}" if key else first


# Examples for the list options, as a user would write them on the command line.
_LIST_EXAMPLES = {
    "peft.target_modules": "[query, value]",
    "peft.modules_to_save": "[classifier]",
    "peft.feedforward_modules": "[output.dense]",
    "peft.ranks": "[4, 8]",
    "data.verbalizers": "[' negative', ' positive']",
    "partition.proportions": "[[0.15, 0.85], [0.85, 0.15]]",
    "report_to": "[tensorboard]",
    "swarm.initial_peers": "[/ip4/127.0.0.1/tcp/4001/p2p/PEER_ID]",
    "swarm.announce_maddrs": "[/ip4/203.0.113.7/tcp/4001]",
}
_SCALARS = {int: "a whole number", float: "a number", bool: "true or false", str: "a string"}


def _expected_type(err: ValidationError) -> str | None:
    """``peft.target_modules must be a list, e.g. [query, value] (got 'query')``: a type error in our words.

    None when the option's type cannot be read (the caller then keeps OmegaConf's own message).
    """
    import types
    import typing

    cls, name, key = getattr(err, "object_type", None), getattr(err, "key", None), getattr(err, "full_key", "")
    if cls is None or not dataclasses.is_dataclass(cls) or name not in {f.name for f in dataclasses.fields(cls)}:
        return None
    hint = typing.get_type_hints(cls)[name]
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    args = [a for a in typing.get_args(hint) if a is not type(None)] if union else [hint]
    optional = union and len(args) < len(typing.get_args(hint))
    base, value = args[0], getattr(err, "value", None)
    got = "null" if value is None else repr(value if isinstance(value, (str, int, float)) else str(value))
    null = " or null" if optional else ""
    if typing.get_origin(base) is list:
        return f"{key} must be a list{null}, e.g. {_LIST_EXAMPLES.get(key, '[a, b]')} (got {got})"
    if base not in _SCALARS:
        return None
    default = next(f.default for f in dataclasses.fields(cls) if f.name == name)
    shown = str(default).lower() if base is bool else default
    example = f", e.g. {shown}" if default not in (None, "", dataclasses.MISSING) else ""
    return f"{key} must be {_SCALARS[base]}{null}{example} (got {got})"


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML (what ``config.yaml`` in a run directory holds)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def config_help() -> str:
    """A reference of every option with its default and help text."""
    lines: list[str] = []

    def walk(obj: Any, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
            else:
                lines.append(f"{prefix}{f.name} = {value!r}\n    {f.metadata.get('help', '')}")

    walk(Config(), "")
    return "\n".join(lines)
