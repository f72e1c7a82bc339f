"""Peak memory and speed of a DP-SGD step with physical batches vs a non-private step (issue 27).

Each configuration runs ``declora train`` in its own process (real MiniLM, the shared SST-2, the private
recipe's adapter: dec_ffa_lora, r=4 on query/value/pooler.dense, classifier trained; 5 peers on a ring,
one round of ``--steps`` local steps) and reads ``peak_rss_mb`` and ``samples_per_s`` from its
``summary.json``. The peak is the whole process's (base model, tokenized data, evaluation included),
the quantity the issue's 8.7 GB was. Configurations:

- ``plain-32``: no DP, batch 32 (the reference; ``--plain-batch``);
- ``dp-256/32``: DP-SGD, expected (Poisson) batch 256 in physical chunks of 32 (``--physical``);
- ``dp-256`` (``--unchunked``): DP-SGD, batch 256 in one vmap pass (before ``privacy.physical_batch_size``).

Samples/s counts expected samples (steps x expected batch) over the local-training time.

Usage (hold the lock on the shared machine):

    flock /tmp/heavy.lock python benchmarks/dp_memory.py [--steps 4] [--physical 32] [--plain-batch 32] [--unchunked]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

RECIPE = [
    "train.algorithm=dec_ffa_lora",
    "peft.r=4",
    "peft.target_modules=[query,value,pooler.dense]",
    "peft.modules_to_save=[classifier]",
    "train.clients=5",
    "topology.kind=ring",
    "train.rounds=1",
    "eval.clients=false",
    "data.max_eval_examples=64",
    "data.validation_split=none",
    "checkpoint_every=0",
    "save_adapters=false",
    "plots=false",
    "progress=false",
]
DP = ["privacy.mechanism=dp_sgd", "privacy.noise_multiplier=0.55"]


def run(name: str, overrides: list[str], args: argparse.Namespace, tmp: Path) -> dict[str, float]:
    out = tmp / name.replace("/", "_")
    cmd = [
        sys.executable, "-m", "declora", "train", f"model.name_or_path={args.model}", f"data.path={args.data}",
        *RECIPE, f"train.local_steps={args.steps}", *overrides, f"out_dir={out}",
    ]  # fmt: skip
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    s = json.loads((out / "summary.json").read_text())
    print(f"{name:>10}: peak RSS {s['peak_rss_mb']:>7.0f} MB, {s['samples_per_s']:>6.1f} samples/s", flush=True)
    return {"rss": s["peak_rss_mb"], "sps": s["samples_per_s"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4, help="local steps of each of the 5 peers")
    ap.add_argument("--physical", type=int, default=32, help="privacy.physical_batch_size of the DP step")
    ap.add_argument("--plain-batch", type=int, default=32, help="batch of the non-private reference step")
    ap.add_argument("--unchunked", action="store_true", help="also DP batch 256 in one pass (~9 GB)")
    ap.add_argument("--model", default="all-minilm-l6-v2")
    ap.add_argument("--data", default="../shared/data/sst2")
    args = ap.parse_args()
    p, b = args.physical, args.plain_batch
    configs = {
        f"plain-{b}": [f"train.batch_size={b}"],
        f"dp-256/{p}": ["train.batch_size=256", *DP, f"privacy.physical_batch_size={p}"],
    }
    if args.unchunked:
        configs["dp-256"] = ["train.batch_size=256", *DP]
    with tempfile.TemporaryDirectory() as tmp:
        res = {name: run(name, ov, args, Path(tmp)) for name, ov in configs.items()}
    base, chunked = res[f"plain-{b}"], res[f"dp-256/{p}"]
    print(f"\npeak RSS dp-256/{p} / plain-{b} = {chunked['rss'] / base['rss']:.3f}")
    print(f"samples/s dp-256/{p} / plain-{b} = {chunked['sps'] / base['sps']:.3f}")
    if "dp-256" in res:
        print(f"peak RSS dp-256 (one pass) / plain-{b} = {res['dp-256']['rss'] / base['rss']:.3f}")


if __name__ == "__main__":
    main()
