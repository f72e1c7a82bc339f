"""Wall time per round: N swarm peers (runtime=swarm, hivemind) vs N torchrun peers vs the simulation.

One config, three runtimes, measured one after the other in one invocation on this machine:

- the in-process simulation on one thread (``declora train``);
- ``declora launch --clients N``: torchrun, one process per client (gloo), one thread each;
- ``declora swarm --clients N``: one peer process per client over hivemind (libp2p daemon + DHT on
  127.0.0.1), one thread each.

A round's wall time is the mean gap between consecutive metrics rows from round 1 on (start-up and the
first round's warm-up excluded; local steps, gossip, evaluation and the checkpoint included); for the
swarm, each peer writes its own metrics, and the figure is the mean over peers. The goal of issue 15 is
swarm <= 1.5x torchrun per round. Usage (a heavy job: take the team's lock)::

    flock /tmp/declora-heavy.lock python benchmarks/swarm_vs_torchrun.py            # MiniLM, 3 rounds
    python benchmarks/swarm_vs_torchrun.py --model tiny                             # a quick check
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from _common import DECLORA, SHARED_SST2, model_name, overrides, per_round, timed

from declora.rundir.layout import peer_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("tiny", "minilm"), default="minilm")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--local-steps", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--train-examples", type=int, default=400)
    ap.add_argument("--eval-examples", type=int, default=100)
    ap.add_argument("--data", default=str(SHARED_SST2))
    args = ap.parse_args()
    if args.rounds < 2:
        ap.error("--rounds must be >= 2 (a round's time is the gap between two metrics rows)")

    tmp = Path(tempfile.mkdtemp(prefix="declora-swarm-bench-"))
    options = overrides(  # train.clients is set per runtime below
        model=model_name(args.model, tmp),
        data=args.data,
        rounds=args.rounds,
        local_steps=args.local_steps,
        batch_size=args.batch_size,
        train_examples=args.train_examples,
        eval_examples=args.eval_examples,
    )
    env = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}  # every process on one thread
    n = args.clients
    results: dict[str, float] = {}

    out = tmp / "sim"
    total = timed([*DECLORA, "train", f"train.clients={n}", *options, f"out_dir={out}"], env)
    results["simulation, 1 thread"] = per_round(out)
    report("simulation, 1 thread", results, total)

    out = tmp / "torchrun"
    total = timed([*DECLORA, "launch", f"--clients={n}", *options, f"out_dir={out}"], env)
    results[f"torchrun x{n}"] = per_round(out)
    report(f"torchrun x{n}", results, total)

    out = tmp / "swarm"
    total = timed([*DECLORA, "swarm", "--clients", str(n), "--out", str(out), *options], env)
    peers = [per_round(peer_dir(out, i)) for i in range(n)]
    results[f"swarm x{n}"] = sum(peers) / n
    report(f"swarm x{n}", results, total, f"per peer: {', '.join(f'{p:.3f}' for p in peers)}")

    swarm, dist, sim = results[f"swarm x{n}"], results[f"torchrun x{n}"], results["simulation, 1 thread"]
    print(f"ratio swarm / torchrun: {swarm / dist:.2f}x (goal <= 1.5x)")
    print(f"ratio swarm / simulation: {swarm / sim:.2f}x; torchrun / simulation: {dist / sim:.2f}x")


def report(name: str, results: dict[str, float], total: float, extra: str = "") -> None:
    tail = f"; {extra}" if extra else ""
    print(f"{name:<22} {results[name]:8.3f} s/round   ({total:6.1f} s in all, start-up included{tail})", flush=True)


if __name__ == "__main__":
    main()
