"""The report of a reproduced experiment: its table (ours beside the paper's) and its claim checks.

Values come from each run's ``summary.json`` and ``metrics.jsonl``, plus derived columns:
``mean_consensus_error`` (mean over evaluated rounds; the final value alone is noisy) and ``mb_sent``.
Accuracies are shown in percent, like the paper's tables.

Example:
    >>> spearman([1.0, 2.0, 3.0], [3.0, 2.0, 1.0])
    -1.0
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from declora.experiments.compare import RunRecord, _fmt
from declora.rundir.layout import SUMMARY

TITLES = {
    "best_accuracy": "best acc %",
    "final_accuracy": "final acc %",
    "final_client_accuracy_mean": "final client acc %",
    "final_consensus_error": "final consensus err",
    "mean_consensus_error": "mean consensus err",
    "total_bytes_sent": "total sent",
    "message_bytes": "message",
    "trainable_params": "trainable params",
    "base_model_mb": "base MiB",
    "spectral_gap": "spectral gap",
    "mixing_rms": "rms contraction",
    "wall_s": "wall s",
    "samples_per_s": "samples/s",
    "final_eval_loss": "final eval loss",
    "epsilon": "epsilon (max over peers)",
    "noise_multiplier": "sigma",
}


def value(record: RunRecord, key: str) -> Any:
    """A summary field of the run, or a derived one (``mean_consensus_error``, ``final_eval_loss``)."""
    summary = getattr(record, "_summary", None)
    if summary is None:
        summary = json.loads((record.path / SUMMARY).read_text())
        record._summary = summary  # type: ignore[attr-defined]  # read once per record
    if key == "mean_consensus_error":
        errors = [m["consensus_error"] for m in record.metrics if m.get("consensus_error") is not None]
        return float(np.mean(errors)) if errors else None
    if key == "final_eval_loss":
        return record.metrics[-1].get("eval_loss") if record.metrics else None
    return summary.get(key)


def title(key: str, records: list[RunRecord]) -> str:
    """A column's header. ``best_accuracy`` is named for what picked its round: ``best acc %`` when every
    run picked it on a validation split, ``max test acc %`` (an optimistic, test-selected number) when a
    run had no validation split (``data.validation_split=none``; summary ``best_round_selected_on``)."""
    if key == "best_accuracy" and any(value(r, "best_round_selected_on") != "validation" for r in records):
        return "max test acc %"
    return TITLES.get(key, key)


def fmt(key: str, v: Any) -> str:
    if v is None:
        return "-"
    if key.endswith("accuracy") or key.endswith("accuracy_mean"):
        return f"{100 * v:.2f}"
    if key == "message_bytes":
        return _fmt("total_bytes_sent", v)
    if key.endswith("consensus_error"):
        return f"{v:.3g}"
    if key in ("spectral_gap", "mixing_rms"):
        return f"{v:.4f}"
    if key in ("epsilon", "noise_multiplier"):  # privacy.mechanism=dp_sgd runs (declora.client.dp_sgd)
        return f"{v:.3g}"
    if key.endswith("loss"):
        return f"{v:.3f}"
    return _fmt(key, v)


def table(exp: Any, records: dict[str, RunRecord]) -> str:
    """One Markdown row per run in recipe order; a ``paper`` column when the recipe has paper numbers."""
    with_paper = any(r.paper is not None for r in exp.runs)
    head = ["run", *([f"paper ({TITLES.get(exp.paper_metric, exp.paper_metric)})"] if with_paper else [])]
    head += [title(c, list(records.values())) for c in exp.columns]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for run in exp.runs:
        rec = records.get(run.name)
        cells = [run.name, *([_paper(run.paper)] if with_paper else [])]
        cells += [fmt(c, value(rec, c)) if rec else "not run" for c in exp.columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _paper(v: Any) -> str:
    return "-" if v is None else str(v)


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman rank correlation (no ties expected: spectral gaps and errors are continuous)."""
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    if len(x) < 2 or rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def _within(check: dict[str, Any], records: dict[str, RunRecord]) -> list[str]:
    metric, ref_name = check.get("metric", "best_accuracy"), check["reference"]
    tol = float(check.get("tolerance_pp", 1.0))
    if ref_name not in records:
        return [f"within {tol} pp of {ref_name}: reference not run yet"]
    ref = value(records[ref_name], metric)
    names = check.get("runs") or [n for n in records if n != ref_name]
    out = []
    for name in names:
        if name not in records:
            continue
        diff = 100 * (value(records[name], metric) - ref)
        if check["kind"] == "at_least":  # one-sided: better than the reference also passes
            verdict = f"at least as good (within {tol:g} pp or better)" if diff >= -tol else f"worse by > {tol:g} pp"
        else:
            verdict = f"within {tol:g} pp" if abs(diff) <= tol else f"NOT within {tol:g} pp"
        out.append(
            f"{name}: {fmt(metric, value(records[name], metric))} vs {ref_name} {fmt(metric, ref)} "
            f"({diff:+.2f} pp) — {verdict}"
        )
    return out


def _order(check: dict[str, Any], records: dict[str, RunRecord]) -> list[str]:
    x_key, y_key = check["x"], check["y"]
    expect = check.get("expect", "decreasing")
    names = [n for n in (check.get("runs") or records) if n in records]
    xs = [value(records[n], x_key) for n in names]
    ys = [value(records[n], y_key) for n in names]
    if len(names) < 3:
        return [f"{y_key} vs {x_key}: needs at least 3 finished runs"]
    rho = spearman(xs, ys)
    ranked = [n for _, n in sorted(zip(xs, names, strict=True))]
    ok = rho == -1.0 if expect == "decreasing" else rho == 1.0
    verdict = "confirmed" if ok else f"not strictly {expect}"
    return [
        f"{y_key} {expect} with {x_key}: {verdict} (Spearman rho = {rho:+.2f} over {len(names)} runs; "
        f"by {x_key}: {', '.join(ranked)})"
    ]


def check_lines(exp: Any, records: dict[str, RunRecord]) -> list[str]:
    """Every check of the recipe as one or more sentences with the numbers behind them."""
    out: list[str] = []
    for check in exp.checks:
        out += _order(check, records) if check["kind"] == "order" else _within(check, records)
    return out
