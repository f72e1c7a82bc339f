"""Plots and comparisons that do not mislead: integer rounds, 1-round and centralized runs, titles that
say what ran, compare warnings on incomparable runs, unfinished runs and runs that send nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from declora.cli.app import main
from declora.config import load_config
from declora.experiments.compare import differences, markdown_table, plot_compare, read_run
from declora.rundir.plots import integer_rounds, plot_run, run_title, shows_consensus
from declora.training.trainer import run

pytestmark = pytest.mark.usefixtures("one_thread")


def _rows(n: int, consensus: float = 0.1) -> list[dict]:
    return [
        {"round": t, "accuracy": 0.5 + 0.01 * t, "consensus_error": consensus, "client_accuracy_mean": None}
        for t in range(1, n + 1)
    ]


def test_round_axis_has_integer_ticks_and_one_round_a_margin() -> None:
    from matplotlib.figure import Figure

    ax = Figure().add_subplot()
    ax.plot([1, 2, 3], [0.1, 0.2, 0.3])
    integer_rounds(ax, [1, 2, 3])
    assert all(float(t).is_integer() for t in ax.get_xticks())
    one = Figure().add_subplot()
    one.plot([1], [0.5], marker="o")
    integer_rounds(one, [1])
    assert one.get_xlim() == (0, 2) and all(float(t).is_integer() for t in one.get_xticks())


def test_one_round_and_no_consensus_plots(tmp_path: Path) -> None:
    written = plot_run(_rows(1), tmp_path / "a", "t")
    assert [p.name for p in written] == ["accuracy.png", "consensus.png"]
    assert all(p.stat().st_size > 5_000 for p in written)
    written = plot_run(_rows(3, consensus=0.0), tmp_path / "a", "t")  # fedavg/centralized: always 0
    assert [p.name for p in written] == ["accuracy.png"] and not (tmp_path / "a" / "consensus.png").exists()
    assert not shows_consensus(_rows(2, consensus=1e-30)) and shows_consensus(_rows(2))


def test_title_says_what_was_run() -> None:
    cfg = load_config(overrides=["partition.kind=dirichlet", "partition.alpha=0.1", "train.clients=7"])
    assert run_title(cfg) == "dec_lora · ring (laplacian) · N=7 K=5 r=16 · dirichlet(α=0.1)"
    central = load_config(overrides=["train.algorithm=centralized"])
    assert run_title(central, {"topology": None}).startswith("centralized · no graph · N=10")


def test_centralized_one_round_run_writes_its_plots(tiny_overrides: list[str], tmp_path: Path) -> None:
    out = tmp_path / "c"
    extra = ["train.algorithm=centralized", "train.rounds=1", "plots=true", f"out_dir={out}"]
    run(load_config(overrides=[*tiny_overrides, *extra]))
    assert sorted(p.name for p in (out / "plots").iterdir()) == ["accuracy.png", "partition.png"]


def _fake(root: Path, name: str, accs: list[float], sent: int, *, lr: float = 1e-3, done: bool = True) -> Path:
    out = root / name
    out.mkdir(parents=True)
    rows = [{"round": t, "accuracy": a, "consensus_error": 0.1, "bytes_sent": sent} for t, a in enumerate(accs, 1)]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "config.yaml").write_text(
        f"model:\n  name_or_path: m\ntrain:\n  algorithm: dec_lora\n  clients: 4\n  rounds: 5\n  lr: {lr}\n"
        "  batch_size: 8\ndata:\n  task: sst2\n  path: d\n"
    )
    if done:
        summary = {"algorithm": "dec_lora", "clients": 4, "rounds": len(accs), "best_accuracy": max(accs)}
        summary |= {"final_accuracy": accs[-1], "total_bytes_sent": sent * len(accs), "samples": 640}
        summary |= {"model": "m", "task": "sst2", "eval_examples": 120, "data_source": "d"}
        (out / "summary.json").write_text(json.dumps(summary))
    return out


def test_compare_warns_marks_unfinished_runs_and_draws_zero_byte_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = _fake(tmp_path, "a", [0.6, 0.7], 1000)
    b = _fake(tmp_path, "b", [0.5, 0.52], 0, lr=2e-3)  # sends nothing, other lr
    c = _fake(tmp_path, "c", [0.55], 500, done=False)
    runs = [read_run(p) for p in (a, b, c)]
    assert runs[2].row["run"] == "c (unfinished 1/5)" and not runs[2].finished
    warnings = differences(runs)
    assert any("learning rate" in w and "b: 0.002" in w for w in warnings)
    assert any("unfinished" in w and "c (unfinished 1/5)" in w for w in warnings)
    assert not any("batch size" in w or "model" in w for w in warnings)
    table = markdown_table(runs)
    assert "| 0.002 |" in table and "sst2/test n=120" in table
    plot_compare(runs, tmp_path / "cmp.png")
    assert (tmp_path / "cmp.png").stat().st_size > 10_000
    assert main(["compare", str(a), str(b), str(c)]) == 0
    assert "declora: warning: runs differ in learning rate" in capsys.readouterr().err
