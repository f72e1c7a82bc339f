"""What every benchmark shares: the tiny test model, the override list, running and reading a run.

Benchmarks are scripts (``python benchmarks/<name>.py``): Python puts their folder first on
``sys.path``, so ``from _common import ...`` finds this file without installing anything.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from declora.rundir.layout import SUMMARY, read_metrics

SHARED_SST2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"  # ../shared/data/sst2 of the repo
DECLORA = [sys.executable, "-m", "declora"]  # the CLI, in a fresh process


def tiny_bert(folder: Path) -> str:
    """A randomly initialised 2-layer BERT (hidden 32) with MiniLM's tokenizer, as in the tests."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from declora.model.loading import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("minilm"))
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def model_name(kind: str, tmp: Path) -> str:
    """``model.name_or_path`` for ``--model tiny`` (built into ``tmp/tiny``) or an embedded alias (``minilm``)."""
    return tiny_bert(tmp / "tiny") if kind == "tiny" else kind


def overrides(
    *,
    data: str | Path,
    model: str | None = None,
    clients: int | None = None,
    rounds: int | None = None,
    local_steps: int | None = None,
    batch_size: int | None = None,
    train_examples: int | None = None,
    eval_examples: int | None = None,
    lean: bool = True,
    extra: tuple[str, ...] | list[str] = (),
) -> list[str]:
    """The dotted overrides of a benchmark run; None leaves an option at its default.

    Args:
        lean: no progress bar, plots or adapter folders (they are not what a benchmark measures).
        extra: further ``key=value`` overrides, appended as given.
    """
    options: dict[str, Any] = {
        "model.name_or_path": model,
        "data.path": data,
        "train.clients": clients,
        "train.rounds": rounds,
        "train.local_steps": local_steps,
        "train.batch_size": batch_size,
        "data.max_train_examples": train_examples,
        "data.max_eval_examples": eval_examples,
    }
    out = [f"{key}={value}" for key, value in options.items() if value is not None]
    if lean:
        out += ["progress=false", "plots=false", "save_adapters=false"]
    return [*out, *extra]


def timed(cmd: list[str], env: dict[str, str] | None = None) -> float:
    """Run ``cmd`` to the end (output discarded, a failure raises); its wall seconds."""
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def summary(run_dir: Path) -> dict[str, Any]:
    """The run's ``summary.json``."""
    return json.loads((Path(run_dir) / SUMMARY).read_text())


def per_round(run_dir: Path) -> float:
    """Mean wall seconds per round: the gap between the first and last metrics rows over the rounds between
    (start-up and the first round's warm-up excluded)."""
    walls = [r["wall_s"] for r in read_metrics(run_dir)]
    return (walls[-1] - walls[0]) / (len(walls) - 1)
