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

``--compare-paths``: instead, the two ways of computing per-example gradients
(declora.client.per_example: ``vmap`` and ``hooks``) on the same model and adapter (client 0 of the
recipe, train mode as under DP), one call each on the first 64 and 256 of client 0's training
sentences (``--sizes``), interleaved and repeated (``--repeats``) with a plain batched forward and
backward of the mean loss as the reference: seconds per call, the ratios vmap / hooks and
hooks / plain within each repeat, median [min, max] over the repeats. Then each (path, size) once
more in its own process for the call's peak memory: VmHWM after the call minus VmRSS before it (the
high-water mark reset just before).

Usage (hold the lock on the shared machine):

    flock /tmp/heavy.lock python benchmarks/dp_memory.py [--steps 4] [--physical 32] [--plain-batch 32] [--unchunked]
    flock /tmp/heavy.lock python benchmarks/dp_memory.py --compare-paths [--sizes 64 256] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

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


def _proc_kb(field: str) -> int:
    """A ``/proc/self/status`` memory field (VmRSS, VmHWM) in kB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _grads_setup(args: argparse.Namespace, size: int) -> tuple[Any, Any, dict]:
    """Real MiniLM with the recipe's adapter (client 0), and a batch of client 0's first ``size`` sentences."""
    from declora.config import load_config
    from declora.data.batches import collate
    from declora.training.setup import make_clients, setup

    overrides = [f"model.name_or_path={args.model}", f"data.path={args.data}", *RECIPE, "data.max_train_examples=2000"]
    s = setup(load_config(overrides=overrides))
    s.model.train()  # as under DP: dropout on, one mask per example on either path
    client = make_clients(s, [0])[0]
    return s.model, client.params, collate(s.data.train, s.parts[0][:size], s.data.pad_token_id, s.device)


def _paths() -> dict[str, Any]:
    from declora.client.per_example import hook_per_example_grads, vmap_per_example_grads

    return {"vmap": vmap_per_example_grads, "hooks": hook_per_example_grads}


def _plain(model: Any, params: dict, batch: dict) -> None:
    """The non-private reference: one batched forward and backward of the mean loss (no per-example split)."""
    import torch

    from declora.model.loading import forward_with

    trained = {n: p.detach().requires_grad_() for n, p in params.items() if p.requires_grad}
    fixed = {n: p.detach() for n, p in params.items() if not p.requires_grad}
    loss = forward_with(model, fixed | trained, batch).loss
    torch.autograd.grad(loss, list(trained.values()), allow_unused=True)


def one_call(args: argparse.Namespace) -> None:
    """``--one-call PATH:SIZE`` (a child of ``--compare-paths``): the peak memory of one call, as JSON."""
    path, size = args.one_call.split(":")
    model, params, batch = _grads_setup(args, int(size))
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: setup's own peak does not count
    before = _proc_kb("VmRSS")
    (_paths() | {"plain": _plain})[path](model, params, batch)
    print(json.dumps({"peak_mb": (_proc_kb("VmHWM") - before) / 1024}))


def _spread(r: list[float]) -> str:
    return f"{sorted(r)[len(r) // 2]:.2f} [{min(r):.2f}, {max(r):.2f}]"  # median [min, max]


def compare_paths(args: argparse.Namespace) -> None:
    """Seconds per per-example-gradient call, vmap vs hooks, interleaved; then each call's peak memory."""
    import torch

    from declora.client.per_example import hooks_apply

    model, params, batch = _grads_setup(args, max(args.sizes))
    assert hooks_apply(model, params), "the recipe's adapter should take the hook path"
    paths = _paths() | {"plain": _plain}
    trained = sum(p.numel() for p in params.values() if p.requires_grad)
    print(f"threads {torch.get_num_threads()}, {trained} trained values, sizes {args.sizes}", flush=True)
    for fn in paths.values():  # warm-up: first-call allocations and lazy imports
        fn(model, params, {k: v[:8] for k, v in batch.items()})
    ratios: dict[int, list[float]] = {n: [] for n in args.sizes}
    plain: dict[int, list[float]] = {n: [] for n in args.sizes}
    for rep in range(args.repeats):
        for n in args.sizes:
            sub = {k: v[:n] for k, v in batch.items()}
            width = int(sub["attention_mask"].sum(1).max())
            sub = {k: v[:, :width] if v.dim() == 2 else v for k, v in sub.items()}  # padded to its own longest
            secs = {}
            for name, fn in paths.items():
                t0 = time.perf_counter()
                fn(model, params, sub)
                secs[name] = time.perf_counter() - t0
            ratios[n].append(secs["vmap"] / secs["hooks"])
            plain[n].append(secs["hooks"] / secs["plain"])
            print(f"repeat {rep} batch {n:>4} (width {width:>3}): vmap {secs['vmap']:6.2f} s, "
                  f"hooks {secs['hooks']:6.2f} s, plain fwd+bwd {secs['plain']:6.2f} s, "
                  f"vmap/hooks {ratios[n][-1]:.2f}, hooks/plain {plain[n][-1]:.2f}", flush=True)  # fmt: skip
    for n, r in ratios.items():
        print(f"batch {n:>4}: vmap/hooks time = {_spread(r)}, hooks/plain = {_spread(plain[n])}")
    for n in args.sizes:
        peaks = {}
        for name in paths:
            cmd = [sys.executable, __file__, "--one-call", f"{name}:{n}", "--model", args.model, "--data", args.data]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            peaks[name] = json.loads(out.strip().splitlines()[-1])["peak_mb"]
        print(f"batch {n:>4}: peak memory of one call: vmap {peaks['vmap']:.0f} MB, hooks {peaks['hooks']:.0f} MB, "
              f"plain {peaks['plain']:.0f} MB (vmap/hooks {peaks['vmap'] / peaks['hooks']:.2f}, "
              f"hooks/plain {peaks['hooks'] / peaks['plain']:.2f})", flush=True)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4, help="local steps of each of the 5 peers")
    ap.add_argument("--physical", type=int, default=32, help="privacy.physical_batch_size of the DP step")
    ap.add_argument("--plain-batch", type=int, default=32, help="batch of the non-private reference step")
    ap.add_argument("--unchunked", action="store_true", help="also DP batch 256 in one pass (~9 GB)")
    ap.add_argument("--model", default="all-minilm-l6-v2")
    ap.add_argument("--data", default="../shared/data/sst2")
    ap.add_argument("--compare-paths", action="store_true", help="per-example gradients: vmap vs hooks")
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 256], help="--compare-paths: batch sizes")
    ap.add_argument("--repeats", type=int, default=3, help="--compare-paths: interleaved repeats")
    ap.add_argument("--one-call", help=argparse.SUPPRESS)  # PATH:SIZE, a child process of --compare-paths
    args = ap.parse_args()
    if args.one_call:
        return one_call(args)
    if args.compare_paths:
        return compare_paths(args)
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
