"""Suspects and attack memory are checkpointed: a resumed run under attack equals the uninterrupted one."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

from declora.byzantine.adversary import Adversary
from declora.byzantine.defense import ByzantineGossip, checkpoint_state, restore_state
from declora.byzantine.suspects import NEED, Suspects
from declora.config import ByzantineConfig, load_config
from declora.mixing.robust import Diagnostics
from declora.rundir.layout import read_metrics
from declora.training import checkpoint
from declora.training.trainer import run

pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest
ATTACK = [
    "byzantine.peers=[4]",
    "byzantine.attack=scaled_update",
    "byzantine.strength=50",
    "comm.robust=clipped_gossip",
    "comm.robust_exclude=true",  # a flagged neighbour is no longer mixed: lost flags change the numbers
]


def overrides(tiny_bert: Path, sst2_small: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"model.name_or_path={tiny_bert}",
        f"data.path={sst2_small}",
        "train.clients=6",
        "topology.kind=complete",
        "train.local_steps=1",
        "train.batch_size=8",
        "peft.r=4",
        "eval.client_max_examples=40",
        "data.max_eval_examples=60",
        "data.validation_split=none",
        "progress=false",
        "plots=false",
        "checkpoint_cleanup=false",
        f"out_dir={out}",
        *ATTACK,
        *extra,
    ]


def _rows(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in read_metrics(run_dir)]


def test_stopped_after_the_flag_and_resumed_equals_uninterrupted(
    tiny_bert: Path, sst2_small: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """5 rounds in one go vs 3 + 2 resumed. Client 4 is flagged in round 3 (NEED = 3 cut rounds: no flag can
    come earlier) and excluded from then on; rounds 4-5 equal only if the flags (and the windows) come back."""
    assert NEED == 3  # the split below: the flag is raised in the last round before the stop
    full = run(load_config(overrides=overrides(tiny_bert, sst2_small, tmp_path / "full", "train.rounds=5")))
    capfd.readouterr()
    out = tmp_path / "resumed"
    run(load_config(overrides=overrides(tiny_bert, sst2_small, out, "train.rounds=3")))
    assert "client 0 suspects neighbour client 4" in capfd.readouterr().err  # raised before the stop
    saved = torch.load(checkpoint.rank_file(out, 3, 0), weights_only=True)["byzantine"]
    assert all(4 in saved["suspects"]["flagged"][i] for i in (0, 1, 2, 3, 5))
    resumed = run(load_config(overrides=[f"resume={out}", "train.rounds=5"]))
    assert "suspects neighbour client 4" not in capfd.readouterr().err  # named once: not again after resume
    assert [r["round"] for r in read_metrics(out)] == [1, 2, 3, 4, 5]
    assert _rows(out) == _rows(Path(full["run_dir"]))
    for key in ("final_accuracy", "final_consensus_error", "suspects", "suspected_by", "suspect_cuts"):
        assert resumed[key] == full[key], key
    assert resumed["suspects"] == [4]
    for name in ("client_0", "client_4", "average"):
        a = (out / "adapters" / name / "adapter_model.safetensors").read_bytes()
        assert a == (Path(full["run_dir"]) / "adapters" / name / "adapter_model.safetensors").read_bytes(), name


def test_a_checkpoint_without_byzantine_state_still_loads(
    tiny_bert: Path, sst2_small: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint written before suspects were saved (no ``byzantine`` key) resumes, with empty suspects."""
    out = tmp_path / "old"
    with monkeypatch.context() as m:
        m.setattr(checkpoint, "checkpoint_state", lambda algorithm: None)  # what older code wrote
        run(load_config(overrides=overrides(tiny_bert, sst2_small, out, "train.rounds=1", "save_adapters=false")))
    assert "byzantine" not in torch.load(checkpoint.rank_file(out, 1, 0), weights_only=True)
    resumed = run(load_config(overrides=[f"resume={out}", "train.rounds=2"]))
    assert [r["round"] for r in read_metrics(out)] == [1, 2] and resumed["suspects"] == []


def _roundtrip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)  # what checkpoint.restore reads


def test_suspects_and_attack_memory_roundtrip_through_a_weights_only_load() -> None:
    said: list[str] = []
    before = Suspects("clipped_gossip", said.append)
    for t in range(1, 4):
        before.record(0, Diagnostics({1: 0.9, 2: 0.1 * t}), t)
        before.record(3, Diagnostics({1: 0.6 if t != 2 else 0.0}), t)
    assert before.of(0) == {1} and before.of(3) == set() and len(said) == 1
    after = Suspects("clipped_gossip", said.append)
    after.load_state_dict(_roundtrip(before.state_dict()))
    assert (after.seen, after.cut_rounds, after.cut_total) == (before.seen, before.cut_rounds, before.cut_total)
    assert after.recent == before.recent and after.flagged == before.flagged and after.table() == before.table()
    after.record(0, Diagnostics({1: 0.9}), 4)
    after.record(3, Diagnostics({1: 0.9}), 4)  # its window now holds 3 cuts: flagged, named once
    assert after.of(3) == {1} and len(said) == 2 and "client 3 suspects neighbour client 1" in said[-1]
    fresh = Suspects("clipped_gossip")
    fresh.load_state_dict(None)
    assert fresh.state_dict() == {"pairs": [], "flagged": {}}

    adversary = Adversary(ByzantineConfig(peers=[2], attack="alie"))
    adversary.observe({2: {0: {"a": torch.arange(3.0)}, 1: {"a": torch.ones(3)}}, 0: {1: {"a": torch.zeros(3)}}})
    hooks = ByzantineGossip("clipped_gossip", adversary=adversary)
    hooks.suspects = before

    class Algo:
        byzantine = hooks

    saved = _roundtrip(checkpoint_state(Algo()))
    target = Algo()
    target.byzantine = ByzantineGossip("clipped_gossip", adversary=Adversary(ByzantineConfig(peers=[2], attack="alie")))
    restore_state(target, saved)
    last = target.byzantine.adversary.last
    assert sorted(last) == [2] and sorted(last[2]) == [0, 1] and torch.equal(last[2][0]["a"], torch.arange(3.0))
    assert target.byzantine.suspects.flagged == {0: {1}}
    restore_state(target, None)  # an older checkpoint: both start empty
    assert target.byzantine.adversary.last == {} and target.byzantine.suspects.flagged == {}
    assert checkpoint_state(object()) is None  # no hooks (plain gossip): nothing is saved
