"""Divergence is an error, never a result: the finite checks of every stage of a round and the
optional divergence guard (declora.client.guards; from test_trust.py, issue 13)."""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import one_error, train_run
from oracles import latest_complete

from declora.client.guards import Guard
from declora.errors import DivergenceError
from declora.rundir.layout import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest


def test_nan_loss_is_one_line_exit_1_and_writes_no_result(
    tiny_overrides: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    line = one_error(capsys, ["train", *tiny_overrides, "train.optimizer=sgd", "train.lr=1e30"], 1)
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
            train_run(tiny_overrides, "train.rounds=3", "checkpoint_cleanup=false")
    assert latest_complete(out) == 1  # round 2 never reached its checkpoint
    assert not (out / "DONE").exists() and not (out / "adapters").exists()
    assert [r["round"] for r in read_metrics(out)] == [1]
    # the fix the message offers: resume with a lower learning rate
    summary = train_run([], f"resume={out}", "train.lr=5e-4")
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
        train_run(tiny_overrides, "train.rounds=1")
    assert not (tmp_path / "run" / "DONE").exists() and not (tmp_path / "run" / "adapters").exists()


def test_divergence_guard_stops_a_run_that_blows_up_but_stays_finite(
    tiny_overrides: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["train", *tiny_overrides, "train.optimizer=sgd", "train.lr=100", "train.divergence_factor=1.1"]
    line = one_error(capsys, argv, 1)
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
