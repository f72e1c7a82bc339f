"""``declora compare RUN_DIR ...``: one table (Markdown and CSV) and overlaid curves over finished runs.

Reads only the run-directory contract (``config.yaml``, ``summary.json``, ``metrics.jsonl``), so it
works on any run, old or new, simulated or distributed.

Example:
    >>> rows = [load_run(d) for d in ["runs/a", "runs/b"]]  # doctest: +SKIP
    >>> print(markdown_table(rows))  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from declora.config import ConfigError

# (column title, row key): the table's columns, in order; the CSV uses the keys as its header.
COLUMNS = [
    ("run", "run"),
    ("algorithm", "algorithm"),
    ("peft method", "peft_method"),
    ("topology", "topology"),
    ("partition", "partition"),
    ("clients", "clients"),
    ("rounds", "rounds"),
    ("best acc", "best_accuracy"),
    ("final acc", "final_accuracy"),
    ("final client acc", "final_client_accuracy_mean"),
    ("consensus error", "final_consensus_error"),
    ("total bytes", "total_bytes_sent"),
    ("trainable params", "trainable_params"),
    ("wall s", "wall_s"),
]


@dataclass
class RunRecord:
    """One finished run: its table row and its per-round metrics."""

    path: Path
    row: dict[str, Any]
    metrics: list[dict[str, Any]]


def _partition_label(config: dict[str, Any]) -> str:
    """``iid``, ``dirichlet(a=0.1)``, ``label_proportions[[0.15,0.85],...]``, ``shards(k=2)``."""
    p = config.get("partition") or {}
    kind = p.get("kind", "iid")
    if kind == "dirichlet":
        return f"dirichlet(a={p.get('alpha')})"
    if kind == "shards":
        return f"shards(k={p.get('shards_per_client')})"
    if kind == "label_proportions":
        return "label_proportions" + json.dumps(p.get("proportions"), separators=(",", ":"))
    return str(kind)


def load_run(path: str | Path) -> RunRecord:
    """Read one run directory.

    Raises:
        ConfigError: the folder is not a finished run (no summary.json or metrics.jsonl).
    """
    from omegaconf import OmegaConf

    path = Path(path)
    for name in ("summary.json", "metrics.jsonl"):
        if not (path / name).is_file():
            raise ConfigError(f"{path}: no {name}; give the directory of a finished `declora train` run")
    summary = json.loads((path / "summary.json").read_text())
    config: dict[str, Any] = {}
    if (path / "config.yaml").is_file():
        config = OmegaConf.to_container(OmegaConf.load(path / "config.yaml"))  # type: ignore[assignment]
    lines = (path / "metrics.jsonl").read_text().splitlines()
    metrics = [json.loads(line) for line in lines if line.strip()]
    algorithm = summary.get("algorithm")
    row = {key: summary.get(key) for _, key in COLUMNS}
    row |= {
        "run": path.name,
        "peft_method": summary.get("peft_method") or (config.get("peft") or {}).get("method", "lora"),
        "topology": summary.get("topology") or ("server" if algorithm == "fedavg" else "-"),
        "partition": _partition_label(config) if config else summary.get("partition"),
    }
    return RunRecord(path, row, metrics)


def _fmt(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key == "final_consensus_error":
        return f"{value:.2e}"
    if key == "total_bytes_sent":
        return _human_bytes(value)
    if isinstance(value, float):
        return f"{value:.4f}" if key.endswith("accuracy") or key.endswith("_mean") else f"{value:.1f}"
    if isinstance(value, int) and value >= 10_000:
        return f"{value:,}"
    return str(value)


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def markdown_table(runs: list[RunRecord]) -> str:
    """One Markdown row per run (bytes in decimal units: 1 MB = 10^6 bytes)."""
    lines = [
        "| " + " | ".join(title for title, _ in COLUMNS) + " |",
        "|"
        + "|".join(
            "---" if key in ("run", "algorithm", "peft_method", "topology", "partition") else "---:"
            for _, key in COLUMNS
        )
        + "|",
    ]
    for r in runs:
        lines.append("| " + " | ".join(_fmt(key, r.row[key]) for _, key in COLUMNS) + " |")
    return "\n".join(lines)


def write_csv(runs: list[RunRecord], path: str | Path) -> None:
    """The table with raw numbers (bytes in bytes, full precision), one row per run."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[key for _, key in COLUMNS] + ["run_dir"])
        writer.writeheader()
        for r in runs:
            writer.writerow({**r.row, "run_dir": str(r.path)})


def cumulative_bytes(run: RunRecord) -> list[float]:
    """Bytes sent up to and including each metrics row's round.

    Sums ``bytes_sent`` when every round has a row; with ``eval.every > 1`` (rows skip rounds) it
    spreads the run's total evenly over its rounds (every algorithm here sends the same per round).
    """
    rounds = [m["round"] for m in run.metrics]
    if rounds == list(range(1, len(rounds) + 1)):
        total, out = 0.0, []
        for m in run.metrics:
            total += m.get("bytes_sent") or 0
            out.append(total)
        return out
    per_round = (run.row.get("total_bytes_sent") or 0) / max(run.row.get("rounds") or 1, 1)
    return [r * per_round for r in rounds]


def plot_compare(runs: list[RunRecord], path: str | Path) -> None:
    """Two panels: averaged-model accuracy vs round, and vs cumulative bytes sent (log scale).

    Runs that send nothing (centralized, local) appear in the first panel only.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(11, 4.2))
    FigureCanvasAgg(fig)
    by_round, by_bytes = fig.subplots(1, 2)
    for r in runs:
        label = r.row["run"]
        acc = [m["accuracy"] for m in r.metrics]
        line = by_round.plot([m["round"] for m in r.metrics], acc, marker="o", ms=3, label=label)[0]
        sent = cumulative_bytes(r)
        if sent and sent[-1] > 0:
            by_bytes.plot(sent, acc, marker="o", ms=3, color=line.get_color(), label=label)
    by_round.set(xlabel="round", ylabel="held-out accuracy (averaged model)")
    by_round.xaxis.set_major_locator(MaxNLocator(integer=True))
    by_bytes.set(xlabel="total bytes sent (all clients)", ylabel="held-out accuracy", xscale="log")
    for ax in (by_round, by_bytes):
        ax.grid(alpha=0.3)
    by_round.legend(fontsize="small")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
