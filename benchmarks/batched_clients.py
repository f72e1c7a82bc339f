"""Every client in one forward pass (``train.batch_clients=true``) vs one client after another.

Real MiniLM, SST-2, N clients on a ring, in this one process, interleaved (seq, batched, seq grouped,
batched grouped[, bf16 ...], then again) so that machine load hits every configuration alike, each
on the same samples: ``declora.training.trainer.run``'s ``train_s`` (local steps + gossip).

Printed per run: samples/s; padded tokens/s (each client's batch padded to its own longest row, the
work the sequential loop computes); the extra padding of the batched passes (each pass is padded to
its widest client); achieved FLOP/s on the clients' padded tokens as a fraction of this machine's best
fp32 (bf16) matmul rate (``throughput_memory.py``'s counting). The ceiling: ``torch.mm``'s FLOP/s at
MiniLM's shapes with as many rows as one client's batch has tokens vs as many as one pass has.

Usage (wrap in ``flock /tmp/heavy.lock`` on a shared machine):

    python benchmarks/batched_clients.py [--samples 1600] [--repeats 2] [--clients 10] [--bf16]
        [--clients-per-pass N]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _common import SHARED_SST2, overrides
from throughput_memory import RECORD, counting_collate, flops_per_padded_token, spread

import declora.client.batched
import declora.client.batched_pass
import declora.client.client
from declora.config import load_config
from declora.data.loading import load_task
from declora.model.loading import load_tokenizer
from declora.training.trainer import run as declora_run

PASSES: list[int] = []  # padded tokens of every batched forward pass (clients x rows x widest row)


def counting_forward(model, ctx, group, batches, pad):  # noqa: ANN001, ANN201 - wraps batched_pass.forward as is
    PASSES.append(len(group) * batches[0]["input_ids"].size(0) * max(b["input_ids"].size(1) for b in batches))
    return FORWARD(model, ctx, group, batches, pad)


FORWARD = declora.client.batched_pass.forward


def mm_rate(rows: int, dtype: torch.dtype = torch.float32, seconds: float = 0.5) -> float:
    """FLOP/s of torch.mm with ``rows`` token rows on MiniLM's shapes (384 <-> 1,536), best of three."""
    shapes = [(rows, 384, 1536), (rows, 1536, 384), (rows, 384, 384)]
    mats = [(torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)) for m, k, n in shapes]
    flops = sum(2 * m * k * n for m, k, n in shapes)
    reps = max(1, int(seconds * 100e9 / flops))
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(reps):
            for a, b in mats:
                torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return reps * flops / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=1600, help="samples per configuration and repeat")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--local-steps", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--clients-per-pass", type=int, default=None)
    ap.add_argument("--bf16", action="store_true", help="also both paths under train.mixed_precision=bf16")
    ap.add_argument("--data", default=str(SHARED_SST2))
    args = ap.parse_args()
    per_round = args.clients * args.local_steps * args.batch_size
    if args.samples % per_round:
        ap.error(f"--samples must be a multiple of clients x local steps x batch size = {per_round}")
    common = overrides(
        data=args.data,
        clients=args.clients,
        rounds=args.samples // per_round,
        local_steps=args.local_steps,
        batch_size=args.batch_size,
        eval_examples=32,
        extra=["eval.clients=false", "checkpoint_every=0"],
    )
    cap = [] if args.clients_per_pass is None else [f"train.clients_per_pass={args.clients_per_pass}"]
    configs = {}
    for group in ("ungrouped", "grouped"):
        for precision in ("fp32", "bf16") if args.bf16 else ("fp32",):
            extra = [f"data.group_by_length={group == 'grouped'}"]
            extra += ["train.mixed_precision=bf16"] if precision == "bf16" else []  # 'no' would read as false
            configs[f"seq {group} {precision}"] = [*extra, "train.batch_clients=false"]
            configs[f"bat {group} {precision}"] = [*extra, "train.batch_clients=true", *cap]
    declora.client.client.collate = counting_collate  # type: ignore[attr-defined]
    declora.client.batched.collate = counting_collate  # type: ignore[attr-defined]
    declora.client.batched_pass.forward = counting_forward  # type: ignore[assignment]
    cfg = load_config(overrides=common)
    data = load_task(cfg.data, load_tokenizer(cfg.model), cfg.model.max_length, seed=cfg.train.seed)
    per_token, per_token_t = flops_per_padded_token(cfg, data.num_labels)
    best = {"fp32": mm_rate(1024), "bf16": mm_rate(1024, torch.bfloat16) if args.bf16 else float("nan")}
    rows: dict[str, list[dict[str, float]]] = {name: [] for name in configs}
    print(f"torch threads {torch.get_num_threads()}; {args.clients} clients, batch {args.batch_size}")
    print(f"\n{'rep':>3} {'run':<20} {'s':>6} {'samples/s':>9} {'padded tok/s':>12} {'pass pad':>8} {'GFLOP/s':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            best["fp32"] = max(best["fp32"], mm_rate(1024))
            for name, extra in configs.items():
                RECORD.clear()
                PASSES.clear()
                out = Path(tmp) / f"{rep}-{name.replace(' ', '-')}"
                summary = declora_run(load_config(overrides=[*common, *extra, f"out_dir={out}"]))
                seconds, samples = summary["train_s"], sum(len(b) for b, _, _ in RECORD)
                padded = sum(p for _, p, _ in RECORD)
                flops = sum(p * (per_token + per_token_t * p / len(b)) for b, p, _ in RECORD)
                row = {
                    "samples_s": samples / seconds,
                    "padded": padded / len(RECORD),
                    "pass": (sum(PASSES) / len(PASSES)) if PASSES else padded / len(RECORD),
                    "pass_pad": sum(PASSES) / padded if PASSES else 1.0,
                    "gflops": flops / seconds / 1e9,
                }
                rows[name].append(row)
                print(
                    f"{rep:>3} {name:<20} {seconds:>6.1f} {row['samples_s']:>9.1f} {padded / seconds:>12.0f} "
                    f"{row['pass_pad']:>8.2f} {row['gflops']:>8.1f}",
                    flush=True,
                )
    print("\nbatched / sequential samples/s, within each repeat, median [min, max]:")
    for name in configs:
        if name.startswith("bat"):
            seq = rows["seq" + name[3:]]
            ratio = [b["samples_s"] / s["samples_s"] for b, s in zip(rows[name], seq, strict=True)]
            print(f"  {name[4:]:<16} {spread(ratio)}")
    print(f"\nbest matmul rate (1,024 rows): fp32 {best['fp32'] / 1e9:.1f}, bf16 {best['bf16'] / 1e9:.1f} GFLOP/s")
    for name, values in rows.items():
        peak = best["bf16" if name.endswith("bf16") else "fp32"]
        rows_seq = statistics.median(v["padded"] for v in values)
        rows_pass = statistics.median(v["pass"] for v in values)
        ceiling = mm_rate(int(rows_pass), torch.bfloat16 if name.endswith("bf16") else torch.float32)
        print(
            f"  {name:<20} fraction of the best matmul rate {spread([v['gflops'] * 1e9 / peak for v in values])}; "
            f"mm rate at its {int(rows_pass)}-row passes {ceiling / 1e9:.1f} GFLOP/s "
            f"(one client's batch: {int(rows_seq)} rows)"
        )


if __name__ == "__main__":
    main()
