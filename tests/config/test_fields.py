"""Every numeric option is checked up front: NaN, infinities and out-of-range values stop the
CLI in one line naming the option, before anything is loaded (from test_trust.py, issue 13)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time
import types
import typing
from pathlib import Path
from typing import Any

import pytest
from conftest import error_lines, one_error

from declora.cli.app import main
from declora.config import Config

pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest


def _numeric_options() -> list[tuple[str, type, bool]]:
    """(dotted key, element type, is a list) of every int/float option, walking the dataclasses."""
    out: list[tuple[str, type, bool]] = []

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            hint = hints[f.name]
            if dataclasses.is_dataclass(hint):
                walk(hint, f"{prefix}{f.name}.")
                continue
            args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
            base = args[0]
            nested = 0
            while typing.get_origin(base) is list:
                base, nested = typing.get_args(base)[0], nested + 1
            if base in (int, float) and base is not bool:
                out.append((f"{prefix}{f.name}", base, nested))

    walk(Config, "")
    return out


def _bad_values(kind: type, nested: int) -> list[str]:
    values = ["nan", "inf", "-inf", "-1"] if kind is float else ["-1", "nan"]
    for level in range(nested):  # float lists: the bad value next to a good one, e.g. [[nan, 1.0]]
        values = [f"[{v}, 1.0]" if kind is float and level == 0 else f"[{v}]" for v in values]
    return values


# Options for which one of these values is legitimately accepted (none today): {(key, value): reason}.
ACCEPTED: dict[tuple[str, str], str] = {}


def test_the_walk_finds_the_options_of_every_section() -> None:
    keys = {k for k, _, _ in _numeric_options()}
    for key in ("train.lr", "train.momentum", "train.max_grad_norm", "train.seed", "eval.batch_size",
                "eval.client_max_examples", "data.max_eval_examples", "topology.rows", "partition.shards_per_client",
                "partition.min_partition_size", "partition.proportions", "comm.timeout_s", "checkpoint_every",
                "peft.lora_dropout", "train.divergence_factor"):  # fmt: skip
        assert key in keys, key


def test_every_numeric_option_rejects_nan_inf_and_out_of_range_in_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import declora.cli.train

    def accepted(cfg: Any, **kwargs: Any) -> None:
        raise AssertionError("a bad value reached the trainer")

    # a bad value that passes validation fails fast here instead of loading a model
    monkeypatch.setitem(sys.modules, "declora.training.trainer", types.SimpleNamespace(run=accepted))
    monkeypatch.setattr(declora.cli.train, "quiet_libraries", lambda: None)  # where train calls it
    main(["train", "train.lr=nan"])  # warm the imports
    capsys.readouterr()
    checked = []
    for key, kind, nested in _numeric_options():
        for value in _bad_values(kind, nested):
            if (key, value) in ACCEPTED:
                continue
            t0 = time.perf_counter()
            try:
                code = main(["train", f"{key}={value}"])
            except AssertionError:
                pytest.fail(f"{key}={value} was accepted")
            elapsed = time.perf_counter() - t0
            err = capsys.readouterr().err
            lines = error_lines(err)
            assert code == 2 and len(lines) == 1 and err.count("\n") == 1, (key, value, err)
            assert key in lines[0], (key, value, lines[0])  # names the option
            assert elapsed < 2.0, (key, value, elapsed)
            checked.append((key, value))
    assert len(checked) > 60


def test_a_bad_option_from_the_shell_is_one_line_and_exit_2(tmp_path: Path) -> None:
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "declora", "train", "train.lr=nan"], cwd=tmp_path, capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("declora: error: train.lr=nan must be a finite number > 0")
    assert time.perf_counter() - t0 < 30  # the interpreter and imports only: no data, no model
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "override",
    [
        "train.lr=inf",  # the issue: exited 0 with non-finite adapters
        "train.lr=1e999",
        "train.max_grad_norm=-1",  # the issue: flipped the gradient's sign
        "train.max_grad_norm=nan",
        "train.momentum=1.5",
        "train.seed=-1",
        "topology.p=nan",
        "comm.consensus_step=nan",
        "partition.alpha=inf",
        "partition.proportions=[[0.5,nan]]",
        "train.divergence_factor=1",
        "eval.batch_size=0",
    ],
)
def test_the_issues_bad_values_stop_before_anything_runs(override: str, capsys: pytest.CaptureFixture[str]) -> None:
    line = one_error(capsys, ["train", override], 2)
    assert override.split("=")[0] in line
