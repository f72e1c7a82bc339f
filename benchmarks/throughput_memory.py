"""Throughput on real tokens and peak memory of declora (real MiniLM, SST-2), measured honestly.

Throughput, in this one process, interleaved (A B C D E, A B C D E, ...) so that machine load hits
every configuration alike, each on the same number of samples:

* ``dec_lora``: ``declora.training.trainer.run`` with N clients on a ring (its ``train_s``: local steps + gossip);
* ``centralized``: the same samples through one pooled model (``train.algorithm=centralized``);
* ``peft_loop``: a plain transformers + peft loop (one PeftModel, AdamW) on the very batches that
  ``dec_lora`` drew in the same repeat (recorded while it ran): identical padded tokens;
* ``grouped``: ``dec_lora`` with ``data.group_by_length=true``;
* ``bf16``: ``dec_lora`` with ``train.mixed_precision=bf16`` (when this CPU/GPU supports it).

For every run it prints samples/s, real and padded tokens/s (padded = batch x longest row, what is
computed), and the achieved FLOP rate as a fraction of this machine's fp32 (bf16) matmul rate (timed
before every repeat; the best is taken, since other load only lowers it). FLOPs of forward + backward
per padded token are counted by ``torch.utils.flop_counter``; attention's two ``T x T`` products,
which SDPA hides from the counter, are added as ``12 T d L`` per token. Ratios are
taken within each repeat and reported as median [min, max].

Memory: peak RSS of ``declora train`` in separate processes with 1, 10 and 20 clients doing the same
work (the same 3,200 samples), and of tokenizing the training split at once vs in 1,000-row chunks.

Usage (wrap in ``flock /tmp/declora-heavy.lock`` on a shared machine):

    python benchmarks/throughput_memory.py [--samples 3200] [--repeats 3] [--clients 10]
        [--data ../shared/data/sst2] [--skip-memory | --skip-throughput]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import DECLORA, SHARED_SST2, overrides, summary

import declora.client.client
from declora.client.precision import cpu_has_native_bf16
from declora.config import load_config
from declora.data.loading import collate, load_task
from declora.model.loading import build_model, forward_with, load_tokenizer, select_device, trainable_state
from declora.training.trainer import run as declora_run

RECORD: list[tuple[np.ndarray, int, int]] = []  # (indices, padded tokens, real tokens) of every training batch


def counting_collate(split: Any, indices: np.ndarray, pad_token_id: int, device: torch.device) -> dict:
    """declora.client.client's collate, recording each training batch (evaluation uses its own import)."""
    batch = collate(split, indices, pad_token_id, device)
    RECORD.append((np.asarray(indices).copy(), batch["input_ids"].numel(), int(batch["attention_mask"].sum())))
    return batch


def matmul_rate(dtype: torch.dtype = torch.float32, reps: int = 20) -> float:
    """FLOP/s of torch.mm on MiniLM's shapes (1,024 tokens x 384 <-> 1,536), best of three timings."""
    shapes = [(1024, 384, 1536), (1024, 1536, 384), (1024, 384, 384)]
    mats = [(torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)) for m, k, n in shapes]
    flops = reps * sum(2 * m * k * n for m, k, n in shapes)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(reps):
            for a, b in mats:
                torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return flops / best


def flops_per_padded_token(cfg: Any, num_labels: int) -> tuple[float, float]:
    """``(a, c)``: forward + backward FLOPs per padded token of a width-T batch = ``a + c * T``."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model(cfg.model, cfg.peft, num_labels, seed=0)
    state = {n: t.requires_grad_(True) for n, t in trainable_state(model).items()}
    model.requires_grad_(False)
    batch = {
        "input_ids": torch.randint(1000, 2000, (2, 16)),
        "attention_mask": torch.ones(2, 16, dtype=torch.long),
        "labels": torch.tensor([0, 1]),
    }
    with FlopCounterMode(display=False) as counter:
        forward_with(model, state, batch).loss.backward()
    conf = model.config
    return counter.get_total_flops() / 32, 12.0 * conf.hidden_size * conf.num_hidden_layers


def plain_peft_loop(cfg: Any, data: Any, batches: list[np.ndarray], device: torch.device) -> float:
    """A hand-written transformers + peft loop over ``batches``; returns its training seconds."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from declora.model.loading import resolve_model_path

    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(resolve_model_path(cfg.model.name_or_path), num_labels=2)
    lora = LoraConfig(
        task_type="SEQ_CLS", r=16, lora_alpha=16, target_modules=["query", "value"], modules_to_save=["pooler"]
    )
    model = get_peft_model(base, lora).to(device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    start, total = time.perf_counter(), 0.0
    for idx in batches:
        loss = model(**collate(data.train, idx, data.pad_token_id, device)).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        total += loss.item()
    return time.perf_counter() - start


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} [{min(values):.3f}, {max(values):.3f}]"


def throughput(args: argparse.Namespace, common: list[str], tmp: Path) -> None:
    declora.client.client.collate = counting_collate  # type: ignore[attr-defined]
    configs: dict[str, list[str]] = {
        "dec_lora": [],
        "centralized": ["train.algorithm=centralized"],
        "peft_loop": [],
        "grouped": ["data.group_by_length=true"],
    }
    device = select_device("auto")
    if (device.type == "cpu" and cpu_has_native_bf16()) or device.type == "cuda":
        configs["bf16"] = ["train.mixed_precision=bf16"]
    cfg = load_config(overrides=common)
    data = load_task(cfg.data, load_tokenizer(cfg.model), cfg.model.max_length, seed=cfg.train.seed)
    per_token, per_token_t = flops_per_padded_token(cfg, data.num_labels)
    rates: dict[str, list[float]] = {"fp32": [], "bf16": []}  # measured before every repeat: load varies
    print(
        f"torch threads {torch.get_num_threads()}, device {device}; FLOPs per padded token = "
        f"{per_token / 1e6:.2f}M + {per_token_t / 1e3:.1f}k x width"
    )
    rows: dict[str, list[dict[str, float]]] = {name: [] for name in configs}
    print(
        f"\n{'rep':>3} {'run':<12} {'samples':>7} {'s':>7} {'samples/s':>9} {'real tok/s':>10} "
        f"{'padded tok/s':>12} {'pad/real':>8} {'GFLOP/s':>8}"
    )
    for rep in range(args.repeats):
        for kind, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            rates[kind].append(matmul_rate(dtype))
        print(
            f"{rep:>3} matmul rate now: fp32 {rates['fp32'][-1] / 1e9:.1f}, bf16 {rates['bf16'][-1] / 1e9:.1f} GFLOP/s"
        )
        recorded: list[np.ndarray] = []
        for name, extra in configs.items():
            RECORD.clear()
            if name == "peft_loop":
                seconds = plain_peft_loop(cfg, data, recorded, device)
                record = [
                    (
                        b,
                        len(b) * max(len(data.train.input_ids[i]) for i in b),
                        sum(len(data.train.input_ids[i]) for i in b),
                    )
                    for b in recorded
                ]
            else:
                summary = declora_run(load_config(overrides=[*common, *extra, f"out_dir={tmp / f'{name}{rep}'}"]))
                seconds, record = summary["train_s"], list(RECORD)
                if name == "dec_lora":
                    recorded = [b for b, _, _ in record]
            samples = sum(len(b) for b, _, _ in record)
            padded, real = sum(p for _, p, _ in record), sum(r for _, _, r in record)
            flops = sum(p * (per_token + per_token_t * p / len(b)) for b, p, _ in record)
            row = {
                "samples": samples,
                "s": seconds,
                "samples_s": samples / seconds,
                "real_s": real / seconds,
                "padded_s": padded / seconds,
                "pad_ratio": padded / real,
                "gflops": flops / seconds / 1e9,
            }
            rows[name].append(row)
            print(
                f"{rep:>3} {name:<12} {samples:>7} {seconds:>7.1f} {row['samples_s']:>9.1f} {row['real_s']:>10.0f} "
                f"{row['padded_s']:>12.0f} {row['pad_ratio']:>8.2f} {row['gflops']:>8.1f}",
                flush=True,
            )

    def ratio(a: str, b: str, key: str = "samples_s") -> list[float]:
        return [x[key] / y[key] for x, y in zip(rows[a], rows[b], strict=True)]

    print("\nratios within each repeat, median [min, max]:")
    print(f"  dec_lora({args.clients}) / centralized, samples/s:            {spread(ratio('dec_lora', 'centralized'))}")
    print(
        f"  dec_lora / plain peft loop, identical batches, samples/s:  {spread(ratio('dec_lora', 'peft_loop'))}"
        "   (goal >= 0.98)"
    )
    print(
        f"  grouped / ungrouped dec_lora, real tokens/s:             {spread(ratio('grouped', 'dec_lora', 'real_s'))}"
        "   (goal >= 2)"
    )
    print(f"  grouped / ungrouped dec_lora, samples/s:                 {spread(ratio('grouped', 'dec_lora'))}")
    if "bf16" in rows:
        print(f"  bf16 / fp32 dec_lora, samples/s:                         {spread(ratio('bf16', 'dec_lora'))}")
    best = {kind: max(values) for kind, values in rates.items()}  # contention only ever lowers a timing
    print(
        f"\nmatmul rate, best of {args.repeats}: fp32 {best['fp32'] / 1e9:.1f}, bf16 {best['bf16'] / 1e9:.1f} GFLOP/s"
    )
    for name, values in rows.items():
        peak = best["bf16" if name == "bf16" else "fp32"] / 1e9
        print(
            f"  {name}: padded/real tokens {values[0]['pad_ratio']:.2f}, fraction of the best matmul rate "
            f"{spread([v['gflops'] / peak for v in values])}"
        )


# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent through fork + exec.
TOKENIZE = """
import sys
import declora.data.loading as d
from declora.config import load_config
from declora.model.loading import load_tokenizer
def hwm():
    line = next(x for x in open("/proc/self/status") if x.startswith("VmHWM"))
    return int(line.split()[1]) / 1024
cfg = load_config(overrides=sys.argv[1:-1])
if sys.argv[-1] == "whole":
    d.TOKENIZE_CHUNK = 10**9
tok = load_tokenizer(cfg.model)
before = hwm()
d.load_task(cfg.data, tok, cfg.model.max_length)
print(before, hwm())
"""


def memory(args: argparse.Namespace, common: list[str], tmp: Path) -> None:
    """Run first: a child's ru_maxrss (summary.json's peak_rss_mb) starts at this process's RSS."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS, separate processes (this launcher: {own:.0f} MB, below every child's peak):")
    for mode in ("whole", "chunked"):
        out = subprocess.run(
            [sys.executable, "-c", TOKENIZE, f"data.path={args.data}", mode], check=True, capture_output=True, text=True
        ).stdout.split()
        before, after = float(out[0]), float(out[1])
        print(f"  tokenize the training split {mode:<8}: {after:.0f} MB ({after - before:+.0f} MB over the tokenizer)")
    steps = 100  # the same work for every N (100 x batch size samples): N clients x (100 / N) local steps
    base = [c for c in common if not c.startswith(("train.local_steps", "train.rounds"))] + ["train.rounds=1"]
    mb = {}
    for n in (1, 10, 20):
        out = tmp / f"mem{n}"
        cmd = [*DECLORA, "train", *base, f"train.clients={n}", f"train.local_steps={steps // n}", f"out_dir={out}"]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        mb[n] = summary(out)["peak_rss_mb"]
        print(
            f"  dec_lora {n:>2} clients x {steps // n:>3} steps of {args.batch_size}: {mb[n]:.0f} MB "
            f"({mb[n] / mb[1]:.3f}x one client)",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=3200, help="samples per configuration and repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--local-steps", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--data", default=str(SHARED_SST2))
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--skip-throughput", action="store_true")
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
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_memory:
            memory(args, common, Path(tmp))
        if not args.skip_throughput:
            throughput(args, common, Path(tmp))
    print(f"\nthis process: peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
