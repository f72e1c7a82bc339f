"""Wall time per round: N torchrun peers (runtime=distributed, gloo) vs the in-process simulation.

The same config runs in fresh processes: the simulation on one thread (and, with
``--sim-threads default|both``, on torch's default thread count), and ``declora launch --clients N``
(torchrun, one process per client, one thread each: torchrun sets OMP_NUM_THREADS=1). On a machine
shared with other jobs torch's default threads contend for the cores and can be far slower than one
thread, which is why one thread is the default baseline. A round's wall time is the mean gap
between consecutive metrics rows (round 2 onwards: start-up and first-round warm-up excluded; local
steps, gossip, evaluation and the checkpoint all included). Usage:

    python benchmarks/torchrun_vs_simulation.py --model tiny            # 2-layer, hidden-32 BERT
    python benchmarks/torchrun_vs_simulation.py --model minilm --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


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


def per_round(run_dir: Path) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    walls = [r["wall_s"] for r in rows]
    return (walls[-1] - walls[0]) / (len(walls) - 1)


def timed(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("tiny", "minilm"), default="tiny")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--local-steps", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--train-examples", type=int, default=400)
    ap.add_argument("--eval-examples", type=int, default=100)
    ap.add_argument("--sim-threads", choices=("1", "default", "both"), default="1")
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"))
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="declora-bench-"))
    model = tiny_bert(tmp / "tiny") if args.model == "tiny" else "minilm"
    overrides = [
        f"model.name_or_path={model}",
        f"data.path={args.data}",
        f"train.clients={args.clients}",
        f"train.rounds={args.rounds}",
        f"train.local_steps={args.local_steps}",
        f"train.batch_size={args.batch_size}",
        f"data.max_train_examples={args.train_examples}",
        f"data.max_eval_examples={args.eval_examples}",
        "progress=false",
        "plots=false",
        "save_adapters=false",
    ]
    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    env.pop("OMP_NUM_THREADS", None)
    declora = [sys.executable, "-m", "declora"]
    runs = []
    if args.sim_threads in ("1", "both"):
        runs.append(("simulation, 1 thread", [*declora, "train", *overrides], {"OMP_NUM_THREADS": "1"}))
    if args.sim_threads in ("default", "both"):
        runs.append(("simulation, default", [*declora, "train", *overrides], {}))
    launch = [*declora, "launch", f"--clients={args.clients}", *overrides]
    runs.append((f"torchrun x{args.clients}", launch, {}))
    results = {}
    for i, (name, cmd, extra_env) in enumerate(runs):
        out = tmp / f"run{i}"
        total = timed([*cmd, f"out_dir={out}"], env | extra_env)
        results[name] = per_round(out)
        print(f"{name:<22} {results[name]:8.3f} s/round   ({total:6.1f} s in all, start-up included)", flush=True)
    dist = results.pop(f"torchrun x{args.clients}")
    for name, sim in results.items():
        print(f"ratio torchrun / {name}: {dist / sim:.2f}x")


if __name__ == "__main__":
    main()
