"""Whole runs on the tiny model under attack: honest peers' metrics, suspects, robust rules, torchrun."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from ranks import assert_rows_close, launch_ranks, simulate

from declora.mixing.kernel import squared_distance
from declora.rundir.layout import read_metrics


def overrides(tiny_bert: Path, sst2_small: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"model.name_or_path={tiny_bert}",
        f"data.path={sst2_small}",
        "train.clients=6",
        "topology.kind=complete",
        "train.rounds=4",
        "train.local_steps=1",
        "train.batch_size=8",
        "peft.r=4",
        "eval.client_max_examples=40",
        "data.max_eval_examples=60",
        "data.validation_split=none",
        "progress=false",
        "plots=false",
        "save_adapters=false",
        "checkpoint_every=0",
        f"out_dir={out}",
        *extra,
    ]


def test_attacker_moves_plain_gossip_and_clipped_gossip_names_it(
    tiny_bert: Path, sst2_small: Path, tmp_path: Path, one_thread: None, capfd: pytest.CaptureFixture[str]
) -> None:
    import declora

    attack = ["byzantine.peers=[4]", "byzantine.attack=scaled_update", "byzantine.strength=50"]
    runs = {
        "base": [],
        "plain": attack,
        "clip": [*attack, "comm.robust=clipped_gossip"],
    }
    results = {
        name: declora.train(overrides(tiny_bert, sst2_small, tmp_path / name, "save_adapters=true", *extra))
        for name, extra in runs.items()
    }
    # the honest peers' averaged model (adapters/average): far from the no-attack one under plain gossip only
    base = results["base"].average_state()
    moved = {name: squared_distance(r.average_state(), base) for name, r in results.items() if name != "base"}
    assert moved["plain"] > 1000 * moved["clip"]
    rows = {name: read_metrics(tmp_path / name) for name in runs}
    assert "honest_accuracy_mean" in rows["plain"][-1] and "honest_accuracy_min" in rows["plain"][-1]
    assert "honest_accuracy_mean" not in rows["base"][-1] and "suspects" not in results["base"].summary
    assert results["plain"].summary["byzantine_peers"] == [4] and results["plain"].summary["robust"] == "none"
    clipped = json.loads((tmp_path / "clip" / "summary.json").read_text())
    assert clipped["suspects"] == [4] and clipped["suspected_by"] == {"4": [0, 1, 2, 3, 5]}
    assert "client 0 suspects neighbour client 4" in capfd.readouterr().err


@pytest.mark.distributed
def test_torchrun_with_one_attacker_equals_the_simulation(tiny_bert: Path, sst2_small: Path, tmp_path: Path) -> None:
    """sign_flip needs no view of the others, so torchrun and the simulation send the very same messages."""
    extra = ("train.clients=4", "byzantine.peers=[2]", "byzantine.attack=sign_flip", "comm.robust=clipped_gossip")
    sim = tmp_path / "sim"
    simulate(overrides(tiny_bert, sst2_small, sim, *extra))
    out = tmp_path / "dist"
    ranks = launch_ranks(4, overrides(tiny_bert, sst2_small, out, *extra), tmp_path)
    assert [r.rc for r in ranks] == [0, 0, 0, 0], "\n".join(r.log[-2000:] for r in ranks)
    assert_rows_close(read_metrics(out), read_metrics(sim))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["suspects"] == json.loads((sim / "summary.json").read_text())["suspects"]
