"""Checkpoint/resume in the simulation: a resumed run ends exactly as an uninterrupted one, a checkpoint
without its marker (a crash during the save) is never loaded, and resume refuses changed options."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from oracles import latest_complete

from declora.algorithms.dec_lora import DecLoRA
from declora.config import ConfigError, load_config
from declora.fault_injection import parse
from declora.rundir.layout import read_metrics
from declora.training import checkpoint
from declora.training.trainer import run

pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest


def _run(overrides: list[str], *extra: str) -> dict:
    return run(load_config(overrides=[*overrides, *extra]))


def _drop_wall(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]


@pytest.fixture
def uninterrupted(tiny_overrides: list[str], tmp_path: Path) -> dict:
    """4 rounds in one go (the reference every resumed run must reproduce)."""
    return _run(tiny_overrides, "train.rounds=4", f"out_dir={tmp_path / 'full'}")


def test_stopped_after_round_2_and_resumed_equals_uninterrupted(
    tiny_overrides: list[str], tmp_path: Path, uninterrupted: dict
) -> None:
    out = tmp_path / "resumed"
    _run(tiny_overrides, "train.rounds=2", f"out_dir={out}")
    assert latest_complete(out) == 2
    # resume=RUN_DIR takes the run's config.yaml as the base: only the new train.rounds is given
    resumed = run(load_config(overrides=[f"resume={out}", "train.rounds=4"]))
    assert [r["round"] for r in read_metrics(out)] == [1, 2, 3, 4]
    assert _drop_wall(read_metrics(out)) == _drop_wall(read_metrics(uninterrupted["run_dir"]))
    for key in ("final_accuracy", "best_accuracy", "total_bytes_sent", "final_consensus_error", "samples"):
        assert resumed[key] == uninterrupted[key], key
    # one complete checkpoint is kept: the newest
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["round_000004"]
    for name in ("client_0", "client_3", "average"):
        a = (out / "adapters" / name / "adapter_model.safetensors").read_bytes()
        assert a == (Path(uninterrupted["run_dir"]) / "adapters" / name / "adapter_model.safetensors").read_bytes()


def test_a_round_without_its_marker_is_never_loaded(
    tiny_overrides: list[str], tmp_path: Path, uninterrupted: dict
) -> None:
    out = tmp_path / "crashed"
    _run(tiny_overrides, "train.rounds=2", f"out_dir={out}")
    good = checkpoint.rank_file(out, 2, 0).read_bytes()
    # simulate a crash while saving round 3: a truncated file and a temporary file, but no marker ...
    crashed = checkpoint.round_dir(out, 3)
    crashed.mkdir()
    (crashed / "rank_0.pt").write_bytes(good[: len(good) // 2])
    (crashed / ".rank_0.pt.crash.tmp").write_bytes(good[:100])
    # ... and a marker for a round whose folder says otherwise
    checkpoint.round_dir(out, 4).mkdir()
    (checkpoint.round_dir(out, 4) / checkpoint.MARKER).write_text('{"round": 3, "clients": 4}')
    assert latest_complete(out) == 2

    resumed = run(load_config(overrides=[f"resume={out}", "train.rounds=4"]))  # would fail on the truncated file
    assert _drop_wall(read_metrics(out)) == _drop_wall(read_metrics(uninterrupted["run_dir"]))
    assert resumed["final_accuracy"] == uninterrupted["final_accuracy"]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["round_000004"]  # the debris is gone


def test_a_marker_naming_another_round_or_unreadable_is_ignored(tmp_path: Path) -> None:
    for t, text in ((1, '{"round": 1, "clients": 4}'), (2, '{"round": 7}'), (3, "{trunc")):
        checkpoint.round_dir(tmp_path, t).mkdir(parents=True)
        (checkpoint.round_dir(tmp_path, t) / checkpoint.MARKER).write_text(text)
    assert latest_complete(tmp_path) == 1
    assert latest_complete(tmp_path / "nothing") == 0


def test_crash_inside_the_atomic_write_leaves_no_checkpoint_file(
    tiny_overrides: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import declora.rundir.files as rundir

    real_replace = rundir.os.replace

    def crash_on_checkpoints(src: str, dst: str) -> None:
        if str(dst).endswith(".pt"):
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(rundir.os, "replace", crash_on_checkpoints)
    with pytest.raises(OSError, match="disk full"):
        _run(tiny_overrides, "train.rounds=1", "save_adapters=false")
    folder = checkpoint.round_dir(tmp_path / "run", 1)
    assert list(folder.iterdir()) == []  # neither rank_0.pt nor its temporary file nor a marker


def test_algorithm_state_goes_into_the_checkpoint_and_back(
    tiny_overrides: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded: list[dict] = []
    monkeypatch.setattr(DecLoRA, "state_dict", lambda self: {"x_hat": torch.arange(3.0), "rounds": 2})
    monkeypatch.setattr(DecLoRA, "load_state_dict", lambda self, state: loaded.append(state))
    out = tmp_path / "run"
    _run(tiny_overrides, f"out_dir={out}")
    payload = torch.load(checkpoint.rank_file(out, 2, 0), weights_only=True)
    assert payload["round"] == 2 and payload["local_clients"] == [0, 1, 2, 3]
    assert torch.equal(payload["algorithm"]["x_hat"], torch.arange(3.0))
    run(load_config(overrides=[f"resume={out}", "train.rounds=3"]))
    assert len(loaded) == 1 and loaded[0]["rounds"] == 2


def test_resume_refuses_changed_options_and_finished_runs(tiny_overrides: list[str], tmp_path: Path) -> None:
    out = tmp_path / "run"
    _run(tiny_overrides, f"out_dir={out}")
    with pytest.raises(ConfigError, match=r"train.batch_size=16 but the run used 8"):  # train.lr may change
        run(load_config(overrides=[f"resume={out}", "train.rounds=4", "train.batch_size=16"]))
    with pytest.raises(ConfigError, match=r"already finished round 2; set train.rounds > 2"):
        run(load_config(overrides=[f"resume={out}"]))
    with pytest.raises(ConfigError, match="not a run directory"):
        load_config(overrides=[f"resume={tmp_path / 'nowhere'}"])
    assert json.loads((out / "summary.json").read_text())["rounds"] == 2  # untouched by the refusals


def test_resume_without_any_checkpoint_starts_from_round_1(tiny_overrides: list[str], tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = _run(tiny_overrides, "checkpoint_every=0", f"out_dir={out}")
    rows = _drop_wall(read_metrics(out))
    assert not (out / "checkpoints").exists()
    again = run(load_config(overrides=[f"resume={out}"]))
    assert _drop_wall(read_metrics(out)) == rows
    assert again["final_accuracy"] == first["final_accuracy"]


def test_fault_spec_parsing() -> None:
    assert parse("2@3") == (2, 3, "exit")
    assert parse("0@1:hang") == (0, 1, "hang")
    for bad in ("2", "a@1", "1@2:explode"):
        with pytest.raises(ValueError, match="DECLORA_FAULT"):
            parse(bad)
