"""Churn and heterogeneous ranks end to end, on the tiny model: live graphs in the round loop,
offline peers, resume mid-churn, torch.distributed == simulation, and ``peft.ranks``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from declora.config import load_config
from declora.mixing.churn import Churn
from declora.mixing.topology import Topology
from declora.rundir.layout import read_metrics
from declora.training.trainer import run


def _run(overrides: list[str], *extra: str) -> dict:
    return run(load_config(overrides=[*overrides, *extra]))


def _rows(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in read_metrics(run_dir)]


def _adapter(run_dir: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(Path(run_dir) / "adapters" / name / "adapter_model.safetensors"))


def _params(run_dir: Path, round_: int) -> dict[int, dict]:
    payload = torch.load(run_dir / "checkpoints" / f"round_{round_:06d}" / "rank_0.pt", weights_only=True)
    return payload["clients"]


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_offline_peer_keeps_its_state_and_resumes_from_it(tiny_overrides: list[str], tmp_path: Path) -> None:
    sched = tmp_path / "away.yaml"
    sched.write_text("- {rounds: 2-, offline: 3}\n- {rounds: 1, offline: 0}\n")
    one = _run(tiny_overrides, "train.rounds=1", f"train.availability_file={sched}", f"out_dir={tmp_path / 'one'}")
    three = _run(tiny_overrides, "train.rounds=3", f"train.availability_file={sched}", f"out_dir={tmp_path / 'three'}")
    rows = read_metrics(Path(three["run_dir"]))
    assert [r["online_peers"] for r in rows] == [3, 3, 3]
    assert [r["live_edges"] for r in rows] == [2, 2, 2]  # ring 0-1-2-3-0 minus the offline peer's two edges
    assert three["missed_rounds"] == [1, 0, 0, 2]
    assert _rows(Path(one["run_dir"]))[0] == _rows(Path(three["run_dir"]))[0]
    # peer 3 left after round 1: its adapter is exactly what it was then; the others moved on
    assert _equal(_adapter(three["run_dir"], "client_3"), _adapter(one["run_dir"], "client_3"))
    assert not _equal(_adapter(three["run_dir"], "client_1"), _adapter(one["run_dir"], "client_1"))

    # peer 3 away in round 2 only: it trained in rounds 1 and 3 (2 x K steps), from where it stopped
    sched.write_text("- {rounds: 2, offline: 3}\n")
    back = _run(tiny_overrides, "train.rounds=3", f"train.availability_file={sched}", f"out_dir={tmp_path / 'back'}")
    assert back["missed_rounds"] == [0, 0, 0, 1]
    steps = {i: int(c["optimizer"]["state"][0]["step"]) for i, c in _params(Path(back["run_dir"]), 3).items()}
    assert steps == {0: 6, 1: 6, 2: 6, 3: 4}
    # the round loop's W_t is the module's: a metrics row names its size
    W = Topology.from_config(load_config(overrides=tiny_overrides).topology, 4, 0).W
    churn = Churn.from_config(load_config(overrides=[*tiny_overrides, f"train.availability_file={sched}"]), W, 2)
    assert read_metrics(Path(back["run_dir"]))[1]["live_edges"] == len(churn.live(2).edges) == 2


def test_stragglers_take_fewer_steps(tiny_overrides: list[str], tmp_path: Path) -> None:
    s = _run(tiny_overrides, "train.stragglers=0.5", "train.local_steps=4", "train.straggler_steps=0.25")
    W = Topology.from_config(load_config(overrides=tiny_overrides).topology, 4, 0).W
    cfg = load_config(overrides=[*tiny_overrides, "train.stragglers=0.5", "train.straggler_steps=0.25"])
    churn = Churn.from_config(cfg, W, 4)
    expected = {i: sum(churn.live(t).steps[i] for t in (1, 2)) for i in range(4)}
    assert set(churn.live(1).steps.values()) | set(churn.live(2).steps.values()) == {1, 4}  # both kinds occur
    steps = {i: int(c["optimizer"]["state"][0]["step"]) for i, c in _params(Path(s["run_dir"]), 2).items()}
    assert steps == expected
    assert s["missed_rounds"] == [0, 0, 0, 0]


def test_resume_in_the_middle_of_churn_ends_as_the_uninterrupted_run(tiny_overrides: list[str], tmp_path: Path) -> None:
    churn = ["topology.link_drop=0.5", "train.peer_dropout=0.3", "train.stragglers=0.5", "train.rounds=3"]
    full = _run(tiny_overrides, *churn, f"out_dir={tmp_path / 'full'}")
    part = tmp_path / "part"
    _run(tiny_overrides, *churn[:-1], "train.rounds=2", f"out_dir={part}")
    resumed = _run([f"resume={part}", "train.rounds=3"])
    assert _rows(part) == _rows(Path(full["run_dir"]))
    assert resumed["missed_rounds"] == full["missed_rounds"]
    assert sum(full["missed_rounds"]) > 0  # the scenario does take peers offline
    assert len({r["live_edges"] for r in read_metrics(part)}) > 1
    for name in ("average", "client_0", "client_3"):
        assert _equal(_adapter(part, name), _adapter(Path(full["run_dir"]), name))


def test_churn_under_torch_distributed_equals_the_simulation(tiny_overrides: list[str], tmp_path: Path) -> None:
    from ranks import assert_rows_close, launch_ranks, simulate

    base = [o for o in tiny_overrides if not o.startswith("out_dir=")]
    churn = ["topology.link_drop=0.4", "train.peer_dropout=0.3", "train.stragglers=0.5", "train.rounds=3"]
    sim = Path(simulate([*base, *churn], f"out_dir={tmp_path / 'sim'}")["run_dir"])
    rows = read_metrics(sim)
    assert min(r["online_peers"] for r in rows) < 4 and min(r["live_edges"] for r in rows) < 4
    out = tmp_path / "dist"
    ranks = launch_ranks(4, [*base, *churn, f"out_dir={out}"], tmp_path)
    assert [r.rc for r in ranks] == [0, 0, 0, 0], "\n".join(r.log[-2000:] for r in ranks)
    assert_rows_close(read_metrics(out), rows)
    assert (
        json.loads((out / "summary.json").read_text())["missed_rounds"]
        == json.loads((sim / "summary.json").read_text())["missed_rounds"]
    )
    for name in ["average"] + [f"client_{i}" for i in range(4)]:
        ours, theirs = _adapter(out, name), _adapter(sim, name)
        for key, tensor in theirs.items():
            torch.testing.assert_close(ours[key], tensor, rtol=1e-5, atol=1e-7)


def test_fedavg_with_offline_peers_averages_the_online_ones(tiny_overrides: list[str], tmp_path: Path) -> None:
    s = _run(tiny_overrides, "train.algorithm=fedavg", "train.peer_dropout=0.5", "train.rounds=3")
    rows = read_metrics(Path(s["run_dir"]))
    assert [r["live_edges"] for r in rows] == [0, 0, 0]
    assert any(r["online_peers"] < 4 for r in rows)
    assert all(r["consensus_error"] == 0.0 for r in rows)  # everyone holds the server's model


# -- heterogeneous ranks ------------------------------------------------------------------------------


def test_uniform_ranks_through_the_heterogeneous_path_equal_dec_decaf(
    tiny_overrides: list[str], tmp_path: Path
) -> None:
    a = _run(tiny_overrides, "train.algorithm=dec_decaf", f"out_dir={tmp_path / 'a'}")
    b = _run(tiny_overrides, "train.algorithm=dec_decaf", "peft.ranks=[4]", f"out_dir={tmp_path / 'b'}")
    assert b["peer_ranks"] == [4, 4, 4, 4]
    assert _rows(Path(a["run_dir"])) == _rows(Path(b["run_dir"]))
    for name in ("average", "client_0", "client_2"):
        assert _equal(_adapter(a["run_dir"], name), _adapter(b["run_dir"], name))


def test_heterogeneous_ranks_bytes_zero_padding_and_reloaded_adapters(
    tiny_overrides: list[str], tiny_bert: Path, tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoTokenizer

    from declora.model.loading import build_model, load_base, load_state

    cfg = load_config(overrides=[*tiny_overrides, "train.algorithm=dec_decaf", "peft.ranks=[2,4]", "peft.lora_alpha=8"])
    s = run(cfg)
    out = Path(s["run_dir"])
    assert s["peer_ranks"] == [2, 4, 2, 4]
    params = {i: c["params"] for i, c in _params(out, 2).items()}
    lora = [n for n in params[0] if ".lora_" in n]
    # bytes: a rank-r peer sends r * (d_in + d_out) values per module, plus the head, to 2 ring neighbours
    head = sum(t.numel() for n, t in params[0].items() if n not in lora)
    per_rank = {
        r: head + sum((t[:r] if ".lora_A." in n else t[:, :r]).numel() for n, t in params[0].items() if n in lora)
        for r in (2, 4)
    }
    assert [row["bytes_sent"] for row in read_metrics(out)] == [4 * 2 * 2 * (per_rank[2] + per_rank[4])] * 2
    # rank-2 peers' extra rows of A / columns of B are still exactly zero after training and mixing
    for n in lora:
        extra = params[0][n][2:] if ".lora_A." in n else params[0][n][:, 2:]
        assert extra.abs().max() == 0 and params[1][n].abs().sum() > 0

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    batch = tokenizer(["a gripping , funny film", "dull and far too long", "fine"], return_tensors="pt", padding=True)
    trained = build_model(cfg.model, cfg.peft, 2, seed=0).eval()
    for i, rank in ((0, 2), (1, 4)):
        folder = out / "adapters" / f"client_{i}"
        assert json.loads((folder / "adapter_config.json").read_text())["r"] == rank
        saved = load_file(str(folder / "adapter_model.safetensors"))
        assert all(t.shape[0] == rank for n, t in saved.items() if ".lora_A." in n)
        load_state(trained, params[i])
        with torch.no_grad():
            expected = trained(**batch).logits
            reloaded = PeftModel.from_pretrained(load_base(cfg.model, 2), str(folder)).eval()
            np.testing.assert_allclose(reloaded(**batch).logits.numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)


def test_heterogeneous_ranks_under_churn_keep_offline_factors(tiny_overrides: list[str], tmp_path: Path) -> None:
    sched = tmp_path / "s.csv"
    sched.write_text("rounds,offline\n2,0\n")
    one = _run(
        tiny_overrides, "train.algorithm=dec_decaf", "peft.ranks=[2,4]", "train.rounds=1", f"out_dir={tmp_path / 'a'}"
    )
    two = _run(
        tiny_overrides,
        "train.algorithm=dec_decaf",
        "peft.ranks=[2,4]",
        f"train.availability_file={sched}",
        "topology.link_drop=0.3",
    )
    assert two["missed_rounds"] == [1, 0, 0, 0]
    assert _equal(_adapter(one["run_dir"], "client_0"), _adapter(two["run_dir"], "client_0"))


# -- membership: who the reported averaged model is the mean of ------------------------------------------


def test_schedule_membership_left_for_good_and_not_joined(tmp_path: Path) -> None:
    from declora.config.availability import load_schedule

    path = tmp_path / "s.yaml"
    path.write_text("- {rounds: 5-8, offline: 3}\n- {rounds: 9-, offline: 3}\n- {rounds: 1-2, offline: [0, 1]}\n")
    s = load_schedule(path, 5)
    assert [s.left(r) for r in (4, 5, 9, 100)] == [set(), {3}, {3}, {3}]  # 5-8 then 9-: gone from round 5
    assert [s.not_joined(r) for r in (1, 2, 3)] == [{0, 1}, {0, 1}, set()]
    path.write_text("- {rounds: 5-8, offline: 3}\n- {rounds: 2, offline: 4}\n")
    s = load_schedule(path, 5)
    assert all(s.left(r) == set() for r in range(1, 12)) and s.not_joined(2) == set()  # temporary outages only


def test_peers_that_left_for_good_are_out_of_the_averaged_model(tiny_overrides: list[str], tmp_path: Path) -> None:
    from declora.mixing.kernel import squared_distance

    sched = tmp_path / "leave.yaml"
    sched.write_text("- {rounds: 2-, offline: 7-9}\n")  # 3 of 10 leave for good at round 2
    s = _run(tiny_overrides, "train.clients=10", "train.rounds=3", f"train.availability_file={sched}")
    out = Path(s["run_dir"])
    rows = read_metrics(out)
    assert [r["members"] for r in rows] == [10, 7, 7] and [r["online_peers"] for r in rows] == [10, 7, 7]
    assert all(r["online_accuracy"] == r["accuracy"] for r in rows)  # the online peers are the members
    clients = [_adapter(out, f"client_{i}") for i in range(10)]
    average = _adapter(out, "average")
    for name, t in average.items():  # adapters/average: the 7 who stayed, not a blend with the 3 frozen ones
        torch.testing.assert_close(t, sum(c[name] for c in clients[:7]) / 7, rtol=1e-5, atol=1e-7)
        assert not torch.allclose(t, sum(c[name] for c in clients) / 10, rtol=1e-5, atol=1e-7)
    consensus = np.mean([squared_distance(c, average) for c in clients[:7]])
    assert rows[-1]["consensus_error"] == pytest.approx(consensus, rel=1e-4)
    # the metrics row's accuracy is that of adapters/average, evaluated again from the saved folder
    from declora.inference import evaluate_run

    assert evaluate_run(out)["accuracy"] == rows[-1]["accuracy"]


def test_late_joiners_and_temporary_outages_and_fedavg_report_the_same_fields(
    tiny_overrides: list[str], tmp_path: Path
) -> None:
    sched = tmp_path / "s.yaml"
    sched.write_text("- {rounds: 1-2, offline: 0}\n- {rounds: 2, offline: 1}\n")  # 0 joins at 3; 1 away in 2
    dec = _run(tiny_overrides, "train.rounds=3", f"train.availability_file={sched}", f"out_dir={tmp_path / 'dec'}")
    rows = read_metrics(Path(dec["run_dir"]))
    assert [r["members"] for r in rows] == [3, 3, 4]  # peer 0 is out until it joins; peer 1's outage keeps it in
    assert [r["online_peers"] for r in rows] == [3, 2, 4]
    assert rows[0]["online_accuracy"] == rows[0]["accuracy"] and rows[2]["online_accuracy"] == rows[2]["accuracy"]
    assert isinstance(rows[1]["online_accuracy"], float)  # the mean of peers 2 and 3 only, evaluated apart
    fed = _run(
        tiny_overrides,
        "train.algorithm=fedavg",
        "train.rounds=3",
        f"train.availability_file={sched}",
        f"out_dir={tmp_path / 'fed'}",
    )
    fed_rows = read_metrics(Path(fed["run_dir"]))
    assert [r["members"] for r in fed_rows] == [3, 3, 4] and all("online_accuracy" in r for r in fed_rows)
    plain = read_metrics(Path(_run(tiny_overrides, f"out_dir={tmp_path / 'plain'}")["run_dir"]))
    assert all("members" not in r and "online_accuracy" not in r for r in plain)  # without churn: today's rows


# -- the churn experiment: seeds, mean ± std, accuracy against the local steps taken -------------------------


def test_seeded_recipe_reports_mean_and_std_and_plots_steps(tiny_bert: Path, sst2_small: Path, tmp_path: Path) -> None:
    from declora.experiments.reproduce import find_experiment, run_experiment
    from declora.experiments.seeds import cumulative_steps

    recipes, out = tmp_path / "recipes", tmp_path / "out"
    recipes.mkdir()
    common = [f"model.name_or_path={tiny_bert}", f"data.path={sst2_small}", "train.clients=4", "train.rounds=2"]
    common += ["train.local_steps=2", "train.batch_size=8", "peft.r=2", "plots=false", "save_adapters=false"]
    (recipes / "seeded.yaml").write_text(
        json.dumps(
            {
                "name": "seeded",
                "common": common,
                "seeds": [0, 1],
                "runs": [
                    {"name": "no churn", "overrides": []},
                    {"name": "dropout", "overrides": ["train.peer_dropout=0.5"]},
                ],
                "columns": ["final_accuracy"],
                "checks": [{"kind": "within", "metric": "final_accuracy", "reference": "no churn", "tolerance_pp": 99}],
            }
        )
    )
    exp = find_experiment("seeded", recipes)
    names = ["no churn / seed 0", "no churn / seed 1", "dropout / seed 0", "dropout / seed 1"]
    assert [r.name for r in exp.runs] == names
    text = run_experiment(exp, "cpu", out, jobs=2).read_text()
    finals = {
        (name, s): json.loads((out / "seeded" / run.slug / "summary.json").read_text())["final_accuracy"]
        for run in exp.runs
        for name, s in [(run.group, run.overrides[-1])]
    }
    for name in ("no churn", "dropout"):
        vals = [finals[(name, f"train.seed={s}")] for s in (0, 1)]
        cell = f"{100 * np.mean(vals):.2f} ± {100 * np.std(vals, ddof=1):.2f}"
        assert f"| {name} | 2/2 | {cell} |" in text
    assert "dropout: " in text and "within 99 pp" in text  # checks on the means
    assert (out / "seeded" / "compare.png").is_file()
    from declora.experiments.compare import read_run

    plain, dropped = (read_run(out / "seeded" / exp.runs[i].slug) for i in (0, 2))
    assert cumulative_steps(plain) == [4 * 2 * 1.0, 4 * 2 * 2.0]  # every peer K steps per round
    churn_steps = cumulative_steps(dropped)
    assert churn_steps == [float(m["local_steps_taken"]) for m in dropped.metrics] and churn_steps[-1] < 16
