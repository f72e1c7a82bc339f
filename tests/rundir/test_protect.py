"""A run directory is never overwritten by accident, an unwritable one stops the run up front, and
two default run folders never collide (declora.rundir.protect; from test_trust.py, issue 13)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import no_model, one_error, train_run

from declora.config import load_config
from declora.rundir.layout import read_metrics
from declora.rundir.writer import RunDir

pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest


def test_a_second_run_into_a_run_directory_is_refused_and_changes_nothing(
    tiny_overrides: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    train_run(tiny_overrides, "train.rounds=1", "checkpoint_cleanup=false")
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with monkeypatch.context() as m:
        no_model(m)
        line = one_error(capsys, ["train", *tiny_overrides, "train.rounds=1"], 2)
    assert f"out_dir={out} already holds a run" in line and f"resume={out}" in line and "overwrite=true" in line
    # resume refuses other options, naming every one of them, in one line
    line = one_error(capsys, ["train", f"resume={out}", "train.rounds=2", "train.batch_size=16", "peft.r=8"], 2)
    assert "train.batch_size=16 but the run used 8" in line and "peft.r=8 but the run used 4" in line
    assert "only train.rounds, train.lr" in line
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    # overwrite=true: a start that fails its set-up deletes nothing ...
    line = one_error(capsys, ["train", *tiny_overrides, "overwrite=true", f"model.name_or_path={tmp_path}/no"], 2)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    # ... one that starts replaces the previous run (its checkpoints too)
    train_run(tiny_overrides, "train.rounds=2", "overwrite=true", "checkpoint_every=0")
    assert [r["round"] for r in read_metrics(out)] == [1, 2] and not (out / "checkpoints").exists()


def test_reloading_a_runs_config_starts_a_new_folder(
    tiny_overrides: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    train_run(tiny_overrides, "train.rounds=1")
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    cfg = load_config(out / "config.yaml")
    assert cfg.out_dir is None  # RUN/config.yaml records out_dir=RUN, which holds a run
    from declora.training.trainer import run

    again = run(cfg)
    assert Path(again["run_dir"]).resolve() != out.resolve() and (Path(again["run_dir"]) / "DONE").is_file()
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert load_config(out / "config.yaml", [f"out_dir={out}"]).out_dir == str(out)  # explicit: then refused


def test_two_default_run_folders_in_the_same_second_differ(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import declora.rundir.writer

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(declora.rundir.writer.time, "strftime", lambda *a: "20250101-000000")
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
    no_model(monkeypatch)
    (tmp_path / "file").write_text("")
    line = one_error(capsys, ["train", f"out_dir={tmp_path / 'file' / 'run'}"], 2)
    assert "is a file, not a folder" in line
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        line = one_error(capsys, ["train", f"out_dir={locked / 'run'}"], 2)
        assert "not writable" in line
