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
import os
import tempfile
from pathlib import Path

from _common import DECLORA, SHARED_SST2, model_name, overrides, per_round, timed


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
    ap.add_argument("--data", default=str(SHARED_SST2))
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="declora-bench-"))
    options = overrides(
        model=model_name(args.model, tmp),
        data=args.data,
        clients=args.clients,
        rounds=args.rounds,
        local_steps=args.local_steps,
        batch_size=args.batch_size,
        train_examples=args.train_examples,
        eval_examples=args.eval_examples,
    )
    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    env.pop("OMP_NUM_THREADS", None)
    runs = []
    if args.sim_threads in ("1", "both"):
        runs.append(("simulation, 1 thread", [*DECLORA, "train", *options], {"OMP_NUM_THREADS": "1"}))
    if args.sim_threads in ("default", "both"):
        runs.append(("simulation, default", [*DECLORA, "train", *options], {}))
    launch = [*DECLORA, "launch", f"--clients={args.clients}", *options]
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
