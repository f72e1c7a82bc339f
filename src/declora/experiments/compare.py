"""``declora compare RUN_DIR ...``: one table (Markdown and CSV) and overlaid curves over runs.

Reads only the run-directory contract (``config.yaml``, ``summary.json``, ``metrics.jsonl``), so it
works on any run, old or new, simulated or distributed. A run without ``summary.json`` (still going,
or stopped) is read from its config and metrics and marked ``(unfinished t/T)``. :func:`differences`
names the settings that make runs incomparable (evaluation set, sample budget, lr, batch size, model);
the CLI prints them as warnings, and the table shows those columns.

Example:
    >>> rows = [read_run(d) for d in ["runs/a", "runs/b"]]  # doctest: +SKIP
    >>> print(markdown_table(rows))  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from declora.config import ConfigError
from declora.rundir.layout import CONFIG, METRICS, SUMMARY, read_metrics

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
    ("model", "model"),
    ("eval set", "eval_set"),
    ("samples", "samples"),
    ("lr", "lr"),
    ("batch", "batch_size"),
]
# Settings that should match for a comparison to mean something: (row key, what it is).
COMPARABLE = [
    ("eval_key", "evaluation set"),
    ("samples", "training budget (samples)"),
    ("lr", "learning rate"),
    ("batch_size", "batch size"),
    ("model", "model"),
]


@dataclass
class RunRecord:
    """One finished run: its table row and its per-round metrics."""

    path: Path
    row: dict[str, Any]
    metrics: list[dict[str, Any]]
    finished: bool = True


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


def _from_metrics(metrics: list[dict[str, Any]], config: dict[str, Any]) -> dict[str, Any]:
    """An unfinished run's summary fields, from its metrics rows and config."""
    train = config.get("train") or {}
    last = metrics[-1] if metrics else {}
    best = max(metrics, key=lambda m: m["accuracy"]) if metrics else {}
    return {
        "algorithm": train.get("algorithm"),
        "clients": train.get("clients"),
        "rounds": last.get("round"),
        "topology": (config.get("topology") or {}).get("kind")
        if str(train.get("algorithm")).startswith("dec_")
        else None,
        "best_accuracy": best.get("accuracy"),
        "final_accuracy": last.get("accuracy"),
        "final_client_accuracy_mean": last.get("client_accuracy_mean"),
        "final_consensus_error": last.get("consensus_error"),
        "total_bytes_sent": sum(m.get("bytes_sent") or 0 for m in metrics),
        "model": (config.get("model") or {}).get("name_or_path"),
    }


def read_run(path: str | Path) -> RunRecord:
    """Read one run directory's records, finished or not (``declora.inference.load_run`` loads its model).

    Raises:
        ConfigError: the folder is not a run (no summary.json, and no metrics.jsonl + config.yaml).
    """
    from omegaconf import OmegaConf

    path = Path(path)
    finished = (path / SUMMARY).is_file() and (path / METRICS).is_file()
    if not finished and not ((path / METRICS).is_file() and (path / CONFIG).is_file()):
        raise ConfigError(
            f"{path}: no summary.json (nor metrics.jsonl + config.yaml); give a `declora train` run directory"
        )
    config: dict[str, Any] = {}
    if (path / CONFIG).is_file():
        config = OmegaConf.to_container(OmegaConf.load(path / CONFIG))  # type: ignore[assignment]
    metrics = read_metrics(path)
    summary = json.loads((path / SUMMARY).read_text()) if finished else _from_metrics(metrics, config)
    algorithm = summary.get("algorithm")
    train, data = config.get("train") or {}, config.get("data") or {}
    row = {key: summary.get(key) for _, key in COLUMNS}
    planned = train.get("rounds")
    row |= {
        "run": path.name if finished else f"{path.name} (unfinished {summary.get('rounds') or 0}/{planned})",
        "peft_method": summary.get("peft_method") or (config.get("peft") or {}).get("method", "lora"),
        "topology": summary.get("topology") or ("server" if algorithm == "fedavg" else "-"),
        "partition": _partition_label(config) if config else summary.get("partition"),
        "model": summary.get("model") or (config.get("model") or {}).get("name_or_path"),
        "lr": train.get("lr"),
        "batch_size": train.get("batch_size"),
    }
    split = data.get("eval_split") or "test"
    n = summary.get("eval_examples") or data.get("max_eval_examples")
    row["eval_set"] = f"{summary.get('task') or data.get('task')}/{split}" + (f" n={n}" if n else "") if data else None
    row["eval_key"] = (row["eval_set"], summary.get("data_source") or data.get("path"))
    return RunRecord(path, row, metrics, finished)


def differences(runs: list[RunRecord]) -> list[str]:
    """One warning per comparability setting on which the runs differ (unknown values are ignored)."""
    out = []
    for key, what in COMPARABLE:
        values = {r.row["run"]: r.row.get(key) for r in runs}
        known = {v for v in values.values() if v is not None and v != (None, None)}
        if len(known) > 1:
            shown = ", ".join(f"{run}: {v[0] if isinstance(v, tuple) else v}" for run, v in values.items())
            if key == "eval_key" and len({v[0] for v in known}) == 1:
                shown = ", ".join(f"{run}: {v[1]}" for run, v in values.items())  # same split, other data
            out.append(f"runs differ in {what} ({shown}): their numbers are not directly comparable")
    unfinished = [r.row["run"] for r in runs if not r.finished]
    if unfinished:
        out.append(f"unfinished runs (numbers so far): {', '.join(unfinished)}")
    return out


def _fmt(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key == "final_consensus_error":
        return f"{value:.2e}"
    if key == "total_bytes_sent":
        return _human_bytes(value)
    if key == "lr":
        return f"{value:g}"
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
            "---"
            if key in ("run", "algorithm", "peft_method", "topology", "partition", "model", "eval_set")
            else "---:"
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
        writer = csv.DictWriter(f, fieldnames=[key for _, key in COLUMNS] + ["run_dir"], extrasaction="ignore")
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

    A run that sends nothing (centralized, local) cannot sit on a log axis: the bytes panel shows its
    final accuracy as a dashed horizontal line, labelled as sending 0 bytes. One legend, below both
    panels, names every run once (unfinished runs are marked in their name).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from declora.rundir.plots import integer_rounds

    fig = Figure(figsize=(11, 4.6 + 0.25 * ((len(runs) + 2) // 3)))
    FigureCanvasAgg(fig)
    by_round, by_bytes = fig.subplots(1, 2)
    handles, rounds_seen, silent = [], [], []
    for r in runs:
        label = r.row["run"]
        acc = [m["accuracy"] for m in r.metrics]
        rounds = [m["round"] for m in r.metrics]
        rounds_seen += rounds
        line = by_round.plot(rounds, acc, marker="o", ms=3, label=label)[0]
        handles.append(line)
        sent = cumulative_bytes(r)
        if sent and sent[-1] > 0:
            by_bytes.plot(sent, acc, marker="o", ms=3, color=line.get_color())
        elif acc:
            silent.append((acc[-1], line.get_color()))
    for acc, color in silent:  # after the others, so the axis limits are known
        by_bytes.axhline(acc, ls="--", lw=1.2, color=color)
    by_round.set(xlabel="round", ylabel="held-out accuracy (averaged model)")
    integer_rounds(by_round, rounds_seen)
    by_bytes.set(xlabel="total bytes sent (all clients)", ylabel="held-out accuracy")
    if any(line.get_xdata().size for line in by_bytes.get_lines() if line.get_linestyle() != "--"):
        by_bytes.set_xscale("log")
    if silent:  # in the label, where it covers no data
        by_bytes.set_xlabel("total bytes sent (all clients); dashed: sends 0 bytes (final accuracy)")
    for ax in (by_round, by_bytes):
        ax.grid(alpha=0.3)
    fig.legend(handles=handles, fontsize="small", loc="lower center", ncol=min(3, max(len(runs), 1)), frameon=False)
    fig.tight_layout(rect=(0, 0.06 + 0.05 * ((len(runs) + 2) // 3), 1, 1))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
