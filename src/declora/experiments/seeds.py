"""Recipes with ``seeds:``: every run repeated per seed, reported as mean ± std, plotted per round and per step.

A recipe's ``seeds: [0, 1, 2]`` turns each run ``NAME`` into runs ``NAME / seed S`` (``train.seed=S``
appended to its overrides; folders ``<slug>_seed_S``). The report then has one row per ``NAME``: each
column's mean ± sample std over the seeds that finished (and how many did), the checks are computed on
the means, and ``compare.png`` shows the mean accuracy (± std band) against rounds and against the
cumulative local steps all peers actually took: under churn a run that lost computation (offline peers,
stragglers) sits to the left of one that only lost links, so the two costs can be told apart.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np

from declora.experiments.compare import RunRecord
from declora.experiments.report import fmt, title, value


def seed_name(name: str, seed: int) -> str:
    return f"{name} / seed {seed}"


def group(exp: Any, records: dict[str, RunRecord]) -> dict[str, list[RunRecord]]:
    """Base run name -> the finished seeds' records, in recipe order (empty list: none finished)."""
    out: dict[str, list[RunRecord]] = {}
    for run in exp.runs:
        out.setdefault(run.group or run.name, [])
        if run.name in records:
            out[run.group or run.name].append(records[run.name])
    return out


def _mean_std(values: list[Any]) -> tuple[float | None, float | None]:
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None, None
    return float(np.mean(vals)), (float(np.std(vals, ddof=1)) if len(vals) > 1 else None)


def seeded_table(exp: Any, groups: dict[str, list[RunRecord]]) -> str:
    """One Markdown row per base run: ``mean ± std`` of every column over its finished seeds."""
    every = [r for recs in groups.values() for r in recs]
    head = ["run", "seeds", *[title(c, every) for c in exp.columns]]
    lines = ["| " + " | ".join(head) + " |", "|---|---:|" + "---:|" * len(exp.columns)]
    for name, recs in groups.items():
        cells = [name, f"{len(recs)}/{len(exp.seeds)}"]
        for c in exp.columns:
            mean, std = _mean_std([value(r, c) for r in recs])
            cells.append("not run" if mean is None else fmt(c, mean) + (f" ± {fmt(c, std)}" if std is not None else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def mean_records(exp: Any, groups: dict[str, list[RunRecord]]) -> dict[str, RunRecord]:
    """One record per base run whose summary fields and metric rows are the seeds' means (for the checks)."""
    out = {}
    for name, recs in groups.items():
        if not recs:
            continue
        rec = copy.copy(recs[0])
        summaries = [{c: value(r, c) for c in {*exp.columns, *_check_metrics(exp)}} for r in recs]
        rec._summary = {k: _mean_std([s[k] for s in summaries])[0] for k in summaries[0]}  # type: ignore[attr-defined]
        rec.metrics = _mean_rows([r.metrics for r in recs])
        rec.row = dict(rec.row, run=name)
        out[name] = rec
    return out


def _check_metrics(exp: Any) -> set[str]:
    return {c.get(k) for c in exp.checks for k in ("metric", "x", "y") if c.get(k)}


def _mean_rows(runs: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per round present in every seed: the mean of each numeric field."""
    common = sorted(set.intersection(*[{m["round"] for m in rows} for rows in runs])) if runs else []
    out = []
    for round_ in common:
        rows = [next(m for m in r if m["round"] == round_) for r in runs]
        keys = [k for k, v in rows[0].items() if isinstance(v, int | float) and not isinstance(v, bool)]
        out.append({k: _mean_std([r.get(k) for r in rows])[0] for k in keys} | {"round": round_})
    return out


def cumulative_steps(rec: RunRecord) -> list[float]:
    """Local steps all peers took up to each metrics row's round.

    Churn runs report it (``local_steps_taken``); otherwise every worker took K steps per round.
    """
    from omegaconf import OmegaConf

    if rec.metrics and all("local_steps_taken" in m for m in rec.metrics):
        return [float(m["local_steps_taken"]) for m in rec.metrics]
    train = OmegaConf.to_container(OmegaConf.load(rec.path / "config.yaml")).get("train", {})  # type: ignore[union-attr]
    workers = 1 if train.get("algorithm") == "centralized" else int(train.get("clients", 1))
    return [float(m["round"] * workers * int(train.get("local_steps", 1))) for m in rec.metrics]


def plot_seeded(groups: dict[str, list[RunRecord]], path: str | Path) -> None:
    """Mean accuracy ± std over seeds against rounds (left) and cumulative local steps (right)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    done = {n: recs for n, recs in groups.items() if recs}
    fig = Figure(figsize=(11, 4.6 + 0.25 * ((len(done) + 2) // 3)))
    FigureCanvasAgg(fig)
    by_round, by_steps = fig.subplots(1, 2)
    handles = []
    for k, (name, recs) in enumerate(done.items()):
        style = {"color": f"C{k % 10}", "ls": ("-", "--", ":")[k // 10 % 3]}  # past 10 runs the colours repeat
        rounds = sorted(set.intersection(*[{m["round"] for m in r.metrics} for r in recs]))
        acc = np.array([[next(m["accuracy"] for m in r.metrics if m["round"] == t) for t in rounds] for r in recs])
        steps = np.array(
            [[s for m, s in zip(r.metrics, cumulative_steps(r), strict=True) if m["round"] in rounds] for r in recs]
        )
        mean, std = acc.mean(0), acc.std(0, ddof=1) if len(recs) > 1 else np.zeros(len(rounds))
        line = by_round.plot(rounds, mean, marker="o", ms=3, label=f"{name} (n={len(recs)})", **style)[0]
        by_round.fill_between(rounds, mean - std, mean + std, color=line.get_color(), alpha=0.15)
        by_steps.plot(steps.mean(0), mean, marker="o", ms=3, **style)
        by_steps.fill_between(steps.mean(0), mean - std, mean + std, color=line.get_color(), alpha=0.15)
        handles.append(line)
    by_round.set(xlabel="round", ylabel="accuracy (averaged model), mean ± std")
    by_steps.set(xlabel="cumulative local steps taken (all peers)", ylabel="held-out accuracy")
    for ax in (by_round, by_steps):
        ax.grid(alpha=0.3)
    fig.legend(handles=handles, fontsize="small", loc="lower center", ncol=min(3, max(len(done), 1)), frameon=False)
    fig.tight_layout(rect=(0, 0.06 + 0.05 * ((len(done) + 2) // 3), 1, 1))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
