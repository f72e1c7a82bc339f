"""Per-run plots (matplotlib, Agg; imported lazily so importing declora stays cheap)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_run(metrics: list[dict[str, Any]], out_dir: Path, title: str) -> list[Path]:
    """``accuracy.png`` (averaged model and client mean/min/max) and ``consensus.png`` (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    rounds = [m["round"] for m in metrics]
    written = []

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(rounds, [m["accuracy"] for m in metrics], marker="o", label="averaged model")
    if all(m.get("client_accuracy_mean") is not None for m in metrics):
        ax.plot(rounds, [m["client_accuracy_mean"] for m in metrics], label="clients (mean)")
        ax.fill_between(
            rounds,
            [m["client_accuracy_min"] for m in metrics],
            [m["client_accuracy_max"] for m in metrics],
            alpha=0.2,
            label="clients (min-max)",
        )
    ax.set(xlabel="round", ylabel="held-out accuracy", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    written.append(out_dir / "accuracy.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(rounds, [max(m["consensus_error"], 1e-30) for m in metrics], marker="o")
    ax.set(xlabel="round", ylabel="consensus error (1/N) Σ‖X_i − X̄‖²", title=title, yscale="log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    written.append(out_dir / "consensus.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)
    return written
