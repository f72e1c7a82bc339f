"""Runs you can trust (issue 13): divergence is an error, every bad input is one line up front, one kind
of user error, run directories are never overwritten by accident, run files can be shared."""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import subprocess
import sys
import time
import types
import typing
from pathlib import Path
from typing import Any

import pytest
import torch

from declora.cli.app import main
from declora.client.guards import Guard
from declora.config import Config, ConfigError, load_config
from declora.errors import DataError, DecloraError, DivergenceError, PeerError
from declora.rundir.layout import RunDir, read_metrics
from declora.training import checkpoint

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest


def _errors(err: str) -> list[str]:
    """The ``declora: error:`` lines of stderr (other lines, e.g. warnings, are not errors)."""
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("declora: error:")]


def _one_error(capsys: pytest.CaptureFixture[str], argv: list[str], code: int) -> str:
    assert main(argv) == code
    err = capsys.readouterr().err
    lines = _errors(err)
    assert len(lines) == 1, err
    return lines[0]


def _run(overrides: list[str], *extra: str) -> dict:
    from declora.training.trainer import run

    return run(load_config(overrides=[*overrides, *extra]))


def _no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading the model fails the test: the error must come before it."""
    import declora.training.trainer

    def boom(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the model was loaded before the error")

    monkeypatch.setattr(declora.training.trainer, "build_model", boom)


# --- 2. every option validated up front --------------------------------------------------------------


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
    import declora.cli.app

    def accepted(cfg: Any, **kwargs: Any) -> None:
        raise AssertionError("a bad value reached the trainer")

    # a bad value that passes validation fails fast here instead of loading a model
    monkeypatch.setitem(sys.modules, "declora.training.trainer", types.SimpleNamespace(run=accepted))
    monkeypatch.setattr(declora.cli.app, "quiet_libraries", lambda: None)
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
            lines = _errors(err)
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
    line = _one_error(capsys, ["train", override], 2)
    assert override.split("=")[0] in line


# --- 3. one kind of user error -----------------------------------------------------------------------


def test_debug_shows_the_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="train.lr"):
        main(["--debug", "train", "train.lr=nan"])
    with pytest.raises(ConfigError, match="train.lr"):
        main(["train", "--debug", "train.lr=nan"])  # anywhere on the line
    monkeypatch.setenv("DECLORA_DEBUG", "1")
    with pytest.raises(ConfigError, match="train.lr"):
        main(["train", "train.lr=nan"])


def test_the_error_family_and_exit_codes() -> None:
    from declora.client.client import TrainingError
    from declora.comm.distributed import PeerFailure

    failure = PeerFailure(2, 3, 0, "exchange", "reset")
    assert isinstance(failure, PeerError) and isinstance(failure, RuntimeError) and failure.exit_code == 1
    assert TrainingError is DivergenceError and DivergenceError("x").exit_code == 1
    assert issubclass(DataError, DecloraError) and DataError("x").exit_code == 2
    assert ConfigError("x").exit_code == 2


# --- 1. divergence is an error, never a result -------------------------------------------------------


def test_nan_loss_is_one_line_exit_1_and_writes_no_result(
    tiny_overrides: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    line = _one_error(capsys, ["train", *tiny_overrides, "train.optimizer=sgd", "train.lr=1e30"], 1)
    assert "round 1, client" in line and "stage 'training loss'" in line and "train.lr" in line
    out = tmp_path / "run"
    for name in ("DONE", "summary.json", "adapters", "checkpoints"):
        assert not (out / name).exists(), name
    assert read_metrics(out) == []


def _poison(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    name = sorted(state)[0]
    return {**state, name: torch.full_like(state[name], float("nan"))}


def test_nan_in_a_later_round_keeps_the_last_good_checkpoint_and_resume_continues(
    tiny_overrides: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from declora.algorithms.dec_lora import DecLoRA

    real = DecLoRA.communicate

    def poisoned(self: Any, states: Any, comm: Any, W: Any, participants: Any = None) -> Any:
        out, sent = real(self, states, comm, W, participants)
        return ({**out, 2: _poison(out[2])} if comm.round == 2 else out), sent

    out = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(DecLoRA, "communicate", poisoned)
        with pytest.raises(DivergenceError, match=r"round 2, client 2, stage 'after exchange'.*resume="):
            _run(tiny_overrides, "train.rounds=3", "checkpoint_cleanup=false")
    assert checkpoint.latest_complete(out) == 1  # round 2 never reached its checkpoint
    assert not (out / "DONE").exists() and not (out / "adapters").exists()
    assert [r["round"] for r in read_metrics(out)] == [1]
    # the fix the message offers: resume with a lower learning rate
    summary = _run([], f"resume={out}", "train.lr=5e-4")
    assert (out / "DONE").is_file() and summary["rounds"] == 3
    assert [r["round"] for r in read_metrics(out)] == [1, 2, 3]


@pytest.mark.parametrize("stage", ["after local steps", "evaluation loss"])
def test_non_finite_state_and_eval_loss_are_caught(
    stage: str, tiny_overrides: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import declora.training.trainer
    from declora.client.client import Client

    if stage == "after local steps":
        real_steps = Client.local_steps

        def steps(self: Any, *args: Any, **kwargs: Any) -> float:
            loss = real_steps(self, *args, **kwargs)
            if self.cid == 3:
                self.set_state(_poison(self.state()))
            return loss

        monkeypatch.setattr(Client, "local_steps", steps)
        where = "round 1, client 3"
    else:
        real_eval = declora.training.trainer.evaluate_round
        monkeypatch.setattr(
            declora.training.trainer, "evaluate_round", lambda *a, **k: real_eval(*a, **k) | {"eval_loss": float("inf")}
        )
        where = "round 1, client average"
    with pytest.raises(DivergenceError, match=f"{where}, stage '{stage}'"):
        _run(tiny_overrides, "train.rounds=1")
    assert not (tmp_path / "run" / "DONE").exists() and not (tmp_path / "run" / "adapters").exists()


def test_divergence_guard_stops_a_run_that_blows_up_but_stays_finite(
    tiny_overrides: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["train", *tiny_overrides, "train.optimizer=sgd", "train.lr=100", "train.divergence_factor=1.1"]
    line = _one_error(capsys, argv, 1)
    assert "stage 'divergence guard'" in line and "train.divergence_factor=1.1" in line


def test_guard_losses_against_a_reference() -> None:
    g = Guard(1e-3, divergence_factor=10.0)
    g.losses(1, {0: 0.7, 1: 0.6})
    g.losses(2, {0: 6.9, 1: 5.9})  # under 10x each client's own initial loss
    with pytest.raises(DivergenceError, match="round 3, client 1, stage 'divergence guard'"):
        g.losses(3, {0: 6.9, 1: 6.01})
    Guard(1e-3).losses(1, {0: 1e30})  # off by default: only non-finite values stop
    with pytest.raises(DivergenceError, match="client 0, stage 'training loss'"):
        Guard(1e-3).losses(4, {0: float("nan")})
    first_step = Guard(1e-3, divergence_factor=10.0)  # a first round that already blew up is caught
    with pytest.raises(DivergenceError, match=r"round 1, client 0.*initial 0\.69"):
        first_step.losses(1, {0: 7.3e9}, {0: types.SimpleNamespace(step_losses=[0.69, 1e10])})
    resumed = Guard(1e-3, divergence_factor=2.0, initial_loss=1.0)
    with pytest.raises(DivergenceError, match="initial 1"):
        resumed.losses(5, {0: 2.5})


# --- 2. data problems, named, before the model is loaded ---------------------------------------------


@pytest.mark.parametrize(
    "train_tsv,needle",
    [
        ("", "train.tsv is empty"),
        ("sentence\tlabel\n", "train.tsv has a header line but no examples"),
        ("sentence\tlabel\ngood\t1\n\t\nbad\t0\n", "train.tsv line 3 has no label"),
        ("sentence\tlabel\ngood\t1\nbad\t0.5\n", "train.tsv line 3: label=0.5 is not a class label"),
    ],
)
def test_data_problems_name_the_file_and_row_before_the_model(
    train_tsv: str,
    needle: str,
    tiny_bert: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.tsv").write_text(train_tsv)
    (data / "test.tsv").write_text("sentence\tlabel\ngood\t1\n")
    _no_model(monkeypatch)
    argv = ["train", f"model.name_or_path={tiny_bert}", f"data.path={data}", f"out_dir={tmp_path / 'run'}"]
    line = _one_error(capsys, argv, 2)
    assert needle in line and str(data) in line


def test_float_labels_without_gaps_are_read_as_integers(tmp_path: Path) -> None:
    from declora.config import DataConfig
    from declora.data.loading import load_train_labels

    (tmp_path / "train.csv").write_text("text,label\ngood,1.0\nbad,0.0\nfine,1.0\n")
    cfg = DataConfig(task="generic", path=str(tmp_path), text_column="text", label_column="label")
    labels, names, _ = load_train_labels(cfg)
    assert labels.tolist() == [1, 0, 1] and names == ["0", "1"]


def test_proportions_longer_than_the_classes_are_a_data_error(
    tiny_overrides: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_model(monkeypatch)
    props = "partition.proportions=[[0.2,0.3,0.5]]"
    line = _one_error(capsys, ["train", *tiny_overrides, "partition.kind=label_proportions", props], 2)
    assert "3 entries" in line and "2 classes (negative, positive)" in line
    line = _one_error(
        capsys, ["partition", "label_proportions", "--clients", "2", "--proportions", "[[0.2,0.3,0.5]]"], 2
    )
    assert "2 classes" in line


# --- 4. a run directory is never overwritten by accident ---------------------------------------------


def test_a_second_run_into_a_run_directory_is_refused_and_changes_nothing(
    tiny_overrides: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    _run(tiny_overrides, "train.rounds=1", "checkpoint_cleanup=false")
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with monkeypatch.context() as m:
        _no_model(m)
        line = _one_error(capsys, ["train", *tiny_overrides, "train.rounds=1"], 2)
    assert f"out_dir={out} already holds a run" in line and f"resume={out}" in line and "overwrite=true" in line
    # resume refuses other options, naming every one of them, in one line
    line = _one_error(capsys, ["train", f"resume={out}", "train.rounds=2", "train.batch_size=16", "peft.r=8"], 2)
    assert "train.batch_size=16 but the run used 8" in line and "peft.r=8 but the run used 4" in line
    assert "only train.rounds, train.lr" in line
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    # overwrite=true: a start that fails its set-up deletes nothing ...
    line = _one_error(capsys, ["train", *tiny_overrides, "overwrite=true", f"model.name_or_path={tmp_path}/no"], 2)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    # ... one that starts replaces the previous run (its checkpoints too)
    _run(tiny_overrides, "train.rounds=2", "overwrite=true", "checkpoint_every=0")
    assert [r["round"] for r in read_metrics(out)] == [1, 2] and not (out / "checkpoints").exists()


def test_reloading_a_runs_config_starts_a_new_folder(
    tiny_overrides: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    _run(tiny_overrides, "train.rounds=1")
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    cfg = load_config(out / "config.yaml")
    assert cfg.out_dir is None  # RUN/config.yaml records out_dir=RUN, which holds a run
    from declora.training.trainer import run

    again = run(cfg)
    assert Path(again["run_dir"]).resolve() != out.resolve() and (Path(again["run_dir"]) / "DONE").is_file()
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert load_config(out / "config.yaml", [f"out_dir={out}"]).out_dir == str(out)  # explicit: then refused


def test_two_default_run_folders_in_the_same_second_differ(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import declora.rundir.layout

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(declora.rundir.layout.time, "strftime", lambda *a: "20250101-000000")
    cfg = load_config()
    paths = [RunDir(cfg).path for _ in range(3)]
    assert [p.name for p in paths] == [
        "20250101-000000-dec_lora",
        "20250101-000000-dec_lora-2",
        "20250101-000000-dec_lora-3",
    ]


def test_an_unwritable_out_dir_is_one_line_before_the_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_model(monkeypatch)
    (tmp_path / "file").write_text("")
    line = _one_error(capsys, ["train", f"out_dir={tmp_path / 'file' / 'run'}"], 2)
    assert "is a file, not a folder" in line
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        line = _one_error(capsys, ["train", f"out_dir={locked / 'run'}"], 2)
        assert "not writable" in line


# --- 6. files people can share -----------------------------------------------------------------------


def test_run_files_honour_the_umask(tiny_overrides: list[str], tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        _run(tiny_overrides, "train.rounds=1", "checkpoint_cleanup=false")
    finally:
        os.umask(old)
    out = tmp_path / "run"
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {"config.yaml", "metrics.jsonl", "summary.json", "DONE", "rank_0.pt", "COMPLETE.json"} <= {
        p.name for p in files
    }
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, p


def test_metrics_and_summary_are_strict_json(tmp_path: Path) -> None:
    import numpy as np

    rd = RunDir(load_config(overrides=[f"out_dir={tmp_path}"]))
    rd.start_metrics([{"round": 1, "train_loss": float("nan")}])
    rd.append_metrics({"round": 2, "train_loss": float("inf"), "accuracy": np.float64(0.5), "x": [float("-inf")]})
    rd.write_summary({"best": float("nan"), "counts": [[1, 2]]})

    def strict(text: str) -> Any:
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))

    rows = [strict(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"round": 1, "train_loss": None}, {"round": 2, "train_loss": None, "accuracy": 0.5, "x": [None]}]
    assert strict((tmp_path / "summary.json").read_text()) == {"best": None, "counts": [[1, 2]]}


def test_the_kernel_notice_is_hidden_before_the_model_is_built(
    tiny_overrides: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import declora.training.trainer

    calls: list[Any] = []

    def built(*args: Any, **kwargs: Any) -> None:
        calls.append("build_model")
        raise KeyboardInterrupt  # stop setup here

    monkeypatch.setattr(declora.training.trainer, "hide_bnb_cpu_notice", lambda quantized: calls.append(quantized))
    monkeypatch.setattr(declora.training.trainer, "build_model", built)
    with pytest.raises(KeyboardInterrupt):
        declora.training.trainer.setup(load_config(overrides=tiny_overrides))
    assert calls == [False, "build_model"]  # not quantized: hidden, before peft imports bitsandbytes


def test_bitsandbytes_imported_after_the_filter_prints_no_notice() -> None:
    code = "from declora.model.quantized import hide_bnb_cpu_notice as h; h(False); import bitsandbytes"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if "No module named 'bitsandbytes'" in proc.stderr:
        pytest.skip("bitsandbytes is not installed")
    assert proc.returncode == 0 and "gemm_4bit_forward" not in proc.stderr, proc.stderr[-1000:]


def test_the_notice_filter_is_only_installed_for_unquantized_bases() -> None:
    import logging

    from declora.model.quantized import BNB_CPU_LOGGER, BNB_CPU_NOTICE, hide_bnb_cpu_notice

    logger = logging.getLogger(BNB_CPU_LOGGER)
    record = logging.LogRecord(BNB_CPU_LOGGER, logging.WARNING, "x", 1, BNB_CPU_NOTICE + " from %s", ("k",), None)
    other = logging.LogRecord(BNB_CPU_LOGGER, logging.WARNING, "x", 1, "something else", (), None)
    try:
        hide_bnb_cpu_notice(False)
        assert not logger.filter(record) and logger.filter(other)
        hide_bnb_cpu_notice(True)
        assert logger.filter(record)
    finally:
        hide_bnb_cpu_notice(True)
