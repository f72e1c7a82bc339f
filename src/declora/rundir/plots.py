"""Per-run plots (matplotlib, Agg; imported lazily so importing declora stays cheap).

``accuracy.png``: averaged-model accuracy per round (held-out, and validation when the run had one),
with the clients' mean and min-max band; ``consensus.png``: the consensus error on a log scale, only
where it means something (several clients that are not averaged into one model every round).
Rounds are integers on the x axis; a one-round run is drawn as points with a margin around them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from declora.rundir.layout import ACCURACY_PLOT, CHURN_PLOT, CONSENSUS_PLOT

# Below this every client holds the same tensors (fedavg, centralized): no consensus panel.
_NO_DISAGREEMENT = 1e-20


def run_title(cfg: Any, summary: dict[str, Any] | None = None) -> str:
    """What was run, in one line: ``dec_lora · ring (laplacian) · N=10 K=5 r=16 · dirichlet(α=0.1)``."""
    t, p = cfg.train, cfg.partition
    graph = (summary or {}).get("topology")
    uses_graph = graph is not None if summary is not None else t.algorithm.startswith("dec_")
    where = f"{cfg.topology.kind} ({cfg.topology.mixing})" if uses_graph else "no graph"
    partition = {
        "dirichlet": f"dirichlet(α={p.alpha})",
        "shards": f"shards(k={p.shards_per_client})",
    }.get(p.kind, p.kind)
    rank = f" r={cfg.peft.r}" if cfg.peft.method == "lora" else f" {cfg.peft.method}"
    return f"{t.algorithm} · {where} · N={t.clients} K={t.local_steps}{rank} · {partition}"


def integer_rounds(ax: Any, rounds: list[int]) -> None:
    """Integer ticks only; one round gets a margin so its point is not on the frame."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if rounds and min(rounds) == max(rounds):
        ax.set_xlim(rounds[0] - 1, rounds[0] + 1)


def shows_consensus(metrics: list[dict[str, Any]]) -> bool:
    """Whether the consensus error is worth a panel: some round where the clients disagree."""
    values = [m.get("consensus_error") for m in metrics]
    return any(v is not None and v > _NO_DISAGREEMENT for v in values)


def plot_run(metrics: list[dict[str, Any]], out_dir: Path, title: str) -> list[Path]:
    """Write ``accuracy.png`` (and ``consensus.png`` where it means something); returns the files."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rounds = [m["round"] for m in metrics]
    written = []

    fig = Figure(figsize=(7.5, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(rounds, [m["accuracy"] for m in metrics], marker="o", label="averaged model (held-out)")
    if any(m.get("val_accuracy") is not None for m in metrics):
        ax.plot(
            rounds, [m.get("val_accuracy") for m in metrics], marker="s", ms=4, ls="--", label="averaged (validation)"
        )
    if metrics and all(m.get("client_accuracy_mean") is not None for m in metrics):
        ax.plot(rounds, [m["client_accuracy_mean"] for m in metrics], marker=".", label="clients (mean)")
        ax.fill_between(
            rounds,
            [m["client_accuracy_min"] for m in metrics],
            [m["client_accuracy_max"] for m in metrics],
            alpha=0.2,
            label="clients (min-max)",
        )
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize="medium")
    integer_rounds(ax, rounds)
    ax.grid(alpha=0.3)
    # Outside the axes, on the right: a legend never covers the curves.
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    written.append(out_dir / ACCURACY_PLOT)
    fig.savefig(written[-1], dpi=120)

    if shows_consensus(metrics):
        fig = Figure(figsize=(6.5, 4.2))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        kept = [(m["round"], m["consensus_error"]) for m in metrics if (m["consensus_error"] or 0) > _NO_DISAGREEMENT]
        ax.plot([r for r, _ in kept], [v for _, v in kept], marker="o")
        ax.set(xlabel="round", ylabel="consensus error (1/N) Σ‖X_i − X̄‖²", yscale="log")
        ax.set_title(title, fontsize="medium")
        integer_rounds(ax, rounds)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        written.append(out_dir / CONSENSUS_PLOT)
        fig.savefig(written[-1], dpi=120)
    else:
        (out_dir / CONSENSUS_PLOT).unlink(missing_ok=True)  # a rerun into the same folder: no stale panel
    return written


def plot_churn(metrics: list[dict[str, Any]], out_dir: Path, title: str) -> Path | None:
    """``churn.png``: online peers and live edges per round beside accuracy and consensus error.

    Written only for runs with churn options (rows with ``online_peers``); returns its path or None.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [m for m in metrics if m.get("online_peers") is not None]
    if not rows:
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    rounds = [m["round"] for m in rows]
    fig = Figure(figsize=(6, 7))
    FigureCanvasAgg(fig)
    top, mid, low = fig.subplots(3, 1, sharex=True)
    top.plot(rounds, [m["accuracy"] for m in rows], marker="o")
    top.set(ylabel="accuracy (averaged)", title=title)
    mid.plot(rounds, [max(m["consensus_error"], 1e-30) for m in rows], marker="o", color="tab:red")
    mid.set(ylabel="consensus error", yscale="log")
    low.step(rounds, [m["online_peers"] for m in rows], where="mid", label="online peers")
    low.step(rounds, [m["live_edges"] for m in rows], where="mid", label="live edges")
    low.set(xlabel="round", ylabel="count")
    low.legend()
    for ax in (top, mid, low):
        ax.grid(alpha=0.3)
    integer_rounds(low, rounds)
    fig.tight_layout()
    path = out_dir / CHURN_PLOT
    fig.savefig(path, dpi=120)
    return path
