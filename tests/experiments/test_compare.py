"""``declora compare``: one row per run, the numbers of each summary, CSV and plot files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from declora.cli.app import main
from declora.config import ConfigError, load_config
from declora.experiments.compare import COLUMNS, cumulative_bytes, markdown_table, read_run
from declora.training.trainer import run


def _fake_run(root: Path, name: str, algorithm: str, accs: list[float], sent: int, **summary_extra) -> Path:
    """A run directory as the trainer writes it (only the keys compare reads)."""
    out = root / name
    out.mkdir(parents=True)
    rows = [{"round": t, "accuracy": a, "consensus_error": 0.1 / t, "bytes_sent": sent} for t, a in enumerate(accs, 1)]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {
        "algorithm": algorithm,
        "clients": 4,
        "rounds": len(accs),
        "topology": None if algorithm in ("fedavg", "centralized") else "ring",
        "best_accuracy": max(accs),
        "final_accuracy": accs[-1],
        "final_client_accuracy_mean": accs[-1] - 0.01,
        "final_consensus_error": 0.1 / len(accs),
        "total_bytes_sent": sent * len(accs),
        "trainable_params": 1234,
        "wall_s": 12.5,
    } | summary_extra
    (out / "summary.json").write_text(json.dumps(summary))
    (out / "config.yaml").write_text("partition:\n  kind: dirichlet\n  alpha: 0.1\npeft:\n  method: ia3\n")
    return out


def test_table_has_one_row_per_run_with_its_numbers(tmp_path: Path) -> None:
    a = _fake_run(tmp_path, "a", "dec_lora", [0.6, 0.7, 0.65], 1_500_000, peft_method="lora")
    b = _fake_run(tmp_path, "b", "fedavg", [0.55, 0.8], 2_000)
    c = _fake_run(tmp_path, "c", "centralized", [0.9], 0)
    table = markdown_table([read_run(p) for p in (a, b, c)]).splitlines()
    assert len(table) == 2 + 3
    assert [cell.strip() for cell in table[0].strip("|").split("|")] == [title for title, _ in COLUMNS]
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in table[2:]]
    col = {key: i for i, (_, key) in enumerate(COLUMNS)}
    assert [r[col["run"]] for r in cells] == ["a", "b", "c"]
    assert [r[col["best_accuracy"]] for r in cells] == ["0.7000", "0.8000", "0.9000"]
    assert [r[col["final_accuracy"]] for r in cells] == ["0.6500", "0.8000", "0.9000"]
    assert [r[col["total_bytes_sent"]] for r in cells] == ["4.50 MB", "4.00 KB", "0 B"]
    assert [r[col["topology"]] for r in cells] == ["ring", "server", "-"]
    # peft method: the summary's when present, else the config's
    assert [r[col["peft_method"]] for r in cells] == ["lora", "ia3", "ia3"]
    assert cells[0][col["partition"]] == "dirichlet(a=0.1)"
    assert cumulative_bytes(read_run(a)) == [1.5e6, 3e6, 4.5e6]


def test_cli_writes_csv_and_plot_and_rejects_unfinished_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = _fake_run(tmp_path, "a", "dec_lora", [0.6, 0.7], 1000)
    b = _fake_run(tmp_path, "b", "local", [0.5, 0.52], 0)
    out_csv, out_png = tmp_path / "t.csv", tmp_path / "t.png"
    assert main(["compare", str(a), str(b), "--csv", str(out_csv), "--plot", str(out_png)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("\n| ") == 3 - 1 and "| a |" in printed and "| b |" in printed
    rows = list(csv.DictReader(out_csv.open()))
    assert [r["run"] for r in rows] == ["a", "b"]
    assert [int(r["total_bytes_sent"]) for r in rows] == [2000, 0]
    assert float(rows[0]["best_accuracy"]) == 0.7
    assert out_png.stat().st_size > 10_000
    (tmp_path / "half").mkdir()
    assert main(["compare", str(a), str(tmp_path / "half")]) == 2
    with pytest.raises(ConfigError, match="no summary.json"):
        read_run(tmp_path / "half")


def test_compare_reads_a_real_run_directory(tiny_overrides: list[str], tmp_path: Path) -> None:
    summary = run(
        load_config(overrides=[*tiny_overrides, "train.rounds=1", "peft.method=ia3", "partition.kind=shards"])
    )
    record = read_run(summary["run_dir"])
    assert record.row["peft_method"] == "ia3" and record.row["partition"] == "shards(k=2)"
    assert record.row["final_accuracy"] == summary["final_accuracy"]
    assert record.row["total_bytes_sent"] == summary["total_bytes_sent"] == cumulative_bytes(record)[-1]
    assert len(markdown_table([record]).splitlines()) == 3
