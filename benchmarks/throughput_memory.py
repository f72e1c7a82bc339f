"""Throughput of dec_lora (10 clients) vs centralized on the same samples, and peak RSS vs clients.

Each configuration runs in its own process (so peak RSS is its own) on the real MiniLM and SST-2,
and the ratios are computed within this one run. Usage:

    python benchmarks/throughput_memory.py [--rounds 2] [--local-steps 5] [--data ../shared/data/sst2]
        [--memory-only | --throughput-only]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def run(out: Path, overrides: list[str]) -> dict:
    cmd = [sys.executable, "-m", "declora", "train", *overrides, f"out_dir={out}"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "summary.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--local-steps", type=int, default=5)
    ap.add_argument("--data", default="../shared/data/sst2")
    ap.add_argument("--memory-only", action="store_true", help="only the peak-RSS runs (not timing-sensitive)")
    ap.add_argument("--throughput-only", action="store_true", help="only the samples/s runs")
    args = ap.parse_args()
    common = [
        f"data.path={args.data}",
        f"train.rounds={args.rounds}",
        f"train.local_steps={args.local_steps}",
        "data.max_eval_examples=64",
        "eval.clients=false",
        "progress=false",
        "plots=false",
        "save_adapters=false",
    ]
    # Memory runs do the same work (rounds x clients x local steps = 2 x 100 steps of 32) so that peak
    # RSS differs only by what each extra client costs, not by how many batches were seen.
    with tempfile.TemporaryDirectory() as tmp:
        res = {}
        if not args.memory_only:
            res["centralized_10"] = run(Path(tmp) / "c", [*common, "train.algorithm=centralized", "train.clients=10"])
            res["dec_lora_10"] = run(Path(tmp) / "d", [*common, "train.clients=10"])
        if not args.throughput_only:
            mem = [c for c in common if not c.startswith("train.local_steps")]
            for n in (1, 10, 20):
                res[f"mem_dec_lora_{n}"] = run(
                    Path(tmp) / f"m{n}", [*mem, f"train.clients={n}", f"train.local_steps={100 // n}"]
                )
    print(f"{'run':<16} {'samples':>8} {'samples/s':>10} {'peak RSS MB':>12}")
    for name, s in res.items():
        print(f"{name:<16} {s['samples']:>8} {s['samples_per_s']:>10.1f} {s['peak_rss_mb']:>12.1f}")
    if "dec_lora_10" in res:
        c, d = res["centralized_10"], res["dec_lora_10"]
        print(
            f"\nthroughput dec_lora(10) / centralized (same {d['samples']} samples): "
            f"{d['samples_per_s'] / c['samples_per_s']:.3f}   (target >= 0.95)"
        )
    if "mem_dec_lora_1" in res:
        for n in (10, 20):
            ratio = res[f"mem_dec_lora_{n}"]["peak_rss_mb"] / res["mem_dec_lora_1"]["peak_rss_mb"]
            print(
                f"peak RSS {n} clients / 1 client (same {res['mem_dec_lora_1']['samples']} samples): "
                f"{ratio:.3f}   (target <= 1.15)"
            )


if __name__ == "__main__":
    main()
