"""How many simulated clients fit in one process: peak RSS, bytes per client and seconds per round.

Each client count runs in its own process (``declora train``: real MiniLM, SST-2, ring, laplacian W)
with what grows with N and is not the algorithm switched off: per-client evaluation
(``eval.clients=false``), checkpoints (``checkpoint_every=0``: a checkpoint holds every client's
adapter and AdamW state) and per-client adapter folders (``save_adapters=false``). The averaged model
is still evaluated every round, on ``--eval-examples`` test sentences.

Bytes per client are the slope of peak RSS between the two largest client counts; the tensors a
client owns are its trainable values (LoRA A, B, the head) plus AdamW's two moments (3 x the message).

Usage (wrap in ``flock /tmp/declora-heavy.lock`` on a shared machine):

    python benchmarks/scale_clients.py [--clients 100 1000] [--local-steps 1] [--batch-size 8] [--rounds 1]
        [--batch-clients true --clients-per-pass 100]   # every client's local step in a few forward passes
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from pathlib import Path

from _common import DECLORA, SHARED_SST2, overrides, summary

from declora.rundir.layout import read_metrics

GIB = 2**30


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--local-steps", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--eval-examples", type=int, default=64)
    ap.add_argument("--model", default="all-minilm-l6-v2")
    ap.add_argument("--data", default=str(SHARED_SST2))
    ap.add_argument("--budget-gib", type=float, default=24.0, help="machine memory for the 'clients that fit' line")
    ap.add_argument("--batch-clients", default="false", help="train.batch_clients: false, true or auto")
    ap.add_argument("--clients-per-pass", type=int, default=None, help="train.clients_per_pass (batched only)")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.clients:
            out = Path(tmp) / f"n{n}"
            options = overrides(
                model=args.model,
                data=args.data,
                clients=n,
                rounds=args.rounds,
                local_steps=args.local_steps,
                batch_size=args.batch_size,
                eval_examples=args.eval_examples,
                extra=[
                    "topology.kind=ring",
                    "eval.clients=false",
                    "checkpoint_every=0",
                    f"out_dir={out}",
                    f"train.batch_clients={args.batch_clients}",
                    *([f"train.clients_per_pass={args.clients_per_pass}"] if args.clients_per_pass else []),
                ],
            )
            cmd = [*DECLORA, "train", *options]
            start = time.perf_counter()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wall = time.perf_counter() - start
            s, rounds = summary(out), read_metrics(out)
            rows.append((n, s, wall, rounds))
            print(
                f"N={n:>5}: peak RSS {s['peak_rss_mb']:>7.0f} MB, local steps + gossip "
                f"{s['train_s'] / args.rounds:>7.1f} s/round, round incl. evaluation "
                f"{s['wall_s'] / args.rounds:>7.1f} s, process {wall:.0f} s, "
                f"averaged-model accuracy {s['final_accuracy']:.3f}",
                flush=True,
            )
    n0, s0, _, _ = rows[0]
    owned = 3 * s0["message_bytes"]  # trainable tensors + AdamW exp_avg + exp_avg_sq, all float32
    print(f"\ntensors a client owns (adapter + head + AdamW moments): {owned / 2**20:.2f} MB")
    if len(rows) > 1:
        (na, sa, _, _), (nb, sb, _, _) = rows[-2], rows[-1]
        per_client = (sb["peak_rss_mb"] - sa["peak_rss_mb"]) * 2**20 / (nb - na)
        fixed = sb["peak_rss_mb"] * 2**20 - per_client * nb
        fit = int((args.budget_gib * GIB - fixed) // per_client)
        print(
            f"peak RSS per extra client (N={na} -> {nb}): {per_client / 2**20:.2f} MB "
            f"({per_client / owned:.2f}x the tensors it owns); fixed part {fixed / 2**20:.0f} MB"
        )
        print(f"clients that fit in {args.budget_gib:g} GiB at this slope: ~{fit:,}")


if __name__ == "__main__":
    main()
