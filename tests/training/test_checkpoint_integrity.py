"""Checkpoints that check themselves (issue 13, item 5): sha256 of every file in the round's marker,
verified on resume; a damaged newest round falls back to the newest intact one in one line; a run
restarts from scratch only when told; unreadable files are one line naming them; weights_only stays."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from declora.cli.app import main
from declora.config import load_config
from declora.errors import CheckpointError
from declora.rundir import integrity
from declora.rundir.layout import read_metrics
from declora.training import checkpoint
from declora.training.trainer import run

pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest


def _run(overrides: list[str], *extra: str) -> dict:
    return run(load_config(overrides=[*overrides, *extra]))


def _rows(out: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in read_metrics(out)]


def _damage(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: same size, still a zip archive
    path.write_bytes(bytes(data))


@pytest.fixture
def two_rounds(tiny_overrides: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A 2-round run that keeps both rounds' checkpoints (pruning disabled)."""
    with monkeypatch.context() as m:
        m.setattr(checkpoint, "prune", lambda *a, **k: None)
        _run(tiny_overrides, "checkpoint_cleanup=false")
    out = tmp_path / "run"
    assert integrity.newest_intact(out) == (2, [])
    return out


@pytest.fixture
def reference(tiny_overrides: list[str], tmp_path: Path) -> list[dict]:
    """The metrics rows of the same run done in one go over 3 rounds."""
    _run(tiny_overrides, "train.rounds=3", f"out_dir={tmp_path / 'reference'}")
    return _rows(tmp_path / "reference")


def test_the_marker_records_the_sha256_of_every_file(two_rounds: Path) -> None:
    for t in (1, 2):
        marker = json.loads((checkpoint.round_dir(two_rounds, t) / checkpoint.MARKER).read_text())
        digest = hashlib.sha256(checkpoint.rank_file(two_rounds, t, 0).read_bytes()).hexdigest()
        assert marker["files"] == {"rank_0.pt": digest}


def test_a_damaged_newest_round_falls_back_to_the_newest_intact_one(
    two_rounds: Path, reference: list[dict], capsys: pytest.CaptureFixture[str]
) -> None:
    _damage(checkpoint.rank_file(two_rounds, 2, 0))
    run(load_config(overrides=[f"resume={two_rounds}", "train.rounds=3"]))
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("declora: warning")]
    assert len(warnings) == 1
    assert "round_000002/rank_0.pt is damaged" in warnings[0] and "continuing from round 1" in warnings[0]
    assert _rows(two_rounds) == reference  # rounds 2 and 3 redone from round 1: the same numbers


def test_no_intact_round_stops_unless_told_to_start_again(
    tiny_overrides: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    _run(tiny_overrides, "checkpoint_cleanup=false")
    rows = _rows(out)
    _damage(checkpoint.rank_file(out, 2, 0))
    capsys.readouterr()
    assert main(["train", f"resume={out}", "train.rounds=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert "round_000002/rank_0.pt is damaged" in err and "resume_from_scratch=true" in err
    assert _rows(out) == rows  # nothing was touched
    summary = run(load_config(overrides=[f"resume={out}", "resume_from_scratch=true"]))
    assert "starting again from round 1" in capsys.readouterr().err
    assert _rows(out) == rows and summary["rounds"] == 2  # the same run, done again from round 1


def test_a_missing_marker_no_longer_restarts_silently(
    tiny_overrides: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    _run(tiny_overrides, "checkpoint_cleanup=false")
    (checkpoint.round_dir(out, 2) / checkpoint.MARKER).unlink()
    capsys.readouterr()
    assert main(["train", f"resume={out}", "train.rounds=3"]) == 2
    err = capsys.readouterr().err
    assert "COMPLETE.json is missing" in err and "resume_from_scratch=true" in err
    assert [r["round"] for r in read_metrics(out)] == [1, 2]


def _old_style_marker(out: Path, t: int) -> None:
    """A marker as written before digests existed (no ``files``): the file is not verified."""
    (checkpoint.round_dir(out, t) / checkpoint.MARKER).write_text(json.dumps({"round": t, "clients": 4}))


def test_an_unreadable_checkpoint_is_one_line_naming_the_file(
    tiny_overrides: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    _run(tiny_overrides, "checkpoint_cleanup=false")
    path = checkpoint.rank_file(out, 2, 0)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # truncated
    _old_style_marker(out, 2)
    capsys.readouterr()
    assert main(["train", f"resume={out}", "train.rounds=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("declora: error:") and f"cannot read {path}" in err


def test_weights_only_still_refuses_pickled_objects(tiny_overrides: list[str], tmp_path: Path) -> None:
    out = tmp_path / "run"
    _run(tiny_overrides, "checkpoint_cleanup=false")
    path = checkpoint.rank_file(out, 2, 0)
    torch.save({"round": 2, "evil": Path("/")}, path)  # loadable only with weights_only=False
    _old_style_marker(out, 2)
    with pytest.raises(CheckpointError, match=f"cannot read {path}"):
        run(load_config(overrides=[f"resume={out}", "train.rounds=3"]))


def test_resume_with_a_changed_lr_uses_it(
    tiny_overrides: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    _run(tiny_overrides, "checkpoint_cleanup=false")
    seen: list[float] = []
    real = checkpoint._apply_lr

    def spy(client: object, saved: float | None) -> None:
        real(client, saved)  # type: ignore[arg-type]
        seen.extend(g["lr"] for g in client.optimizer.param_groups)  # type: ignore[attr-defined]

    monkeypatch.setattr(checkpoint, "_apply_lr", spy)
    run(load_config(overrides=[f"resume={out}", "train.rounds=3", "train.lr=5e-4"]))
    assert seen == [5e-4] * 4  # the restored AdamW state carried 1e-3; the new rate replaces it
    payload = torch.load(checkpoint.rank_file(out, 3, 0), weights_only=True)
    assert payload["lr"] == {i: 5e-4 for i in range(4)}
    assert all(g["lr"] == 5e-4 for g in payload["clients"][0]["optimizer"]["param_groups"])
