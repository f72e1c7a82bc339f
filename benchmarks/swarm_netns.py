"""Wall time per round: 4 swarm peers on emulated hosts with impaired links vs the same swarm on loopback.

Measured one after the other in one invocation on this machine (root needed for the namespaces):

- ``declora swarm --clients N``: N peers on 127.0.0.1 (the baseline);
- N ``declora peer`` processes, each in its own network namespace (``tests/comm/netns.py``), every link
  impaired: 10 Mbit/s token bucket on each host's egress, and 50 ms one-way delay plus 1 % "loss" (a chunk
  held back one 200 ms retransmission timeout) through a user-space TCP relay in front of each peer (this
  kernel has no netem). Each peer listens on its own loopback and announces the relay's address.

A round's wall time is the mean gap between consecutive metrics rows from round 1 on (start-up excluded),
averaged over the peers; the goal of issue 26 is impaired <= 1.3x loopback. Same config as
``benchmarks/swarm_vs_torchrun.py`` (MiniLM, ring, 3 rounds, K=2, batch 8, 400 train / 100 eval). Usage::

    flock /tmp/heavy.lock python benchmarks/swarm_netns.py            # MiniLM
    python benchmarks/swarm_netns.py --model tiny                     # a quick check
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from _common import DECLORA, SHARED_SST2, model_name, overrides, per_round, timed

from declora.rundir.layout import peer_dir

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "comm"))
from netns import Hosts, unavailable  # noqa: E402

LISTEN, RELAY = 4001, 4000


def impaired_swarm(n: int, options: list[str], out: Path, env: dict, args: argparse.Namespace) -> float:
    """Run the N peers in namespaces (see the module docstring); returns the wall time in all."""
    from declora.comm.swarm_records import peer_id_of

    out.mkdir(parents=True)
    ids = {i: peer_id_of(out / "keys" / f"{i}.key") for i in range(n)}
    allow = out / "allowlist.txt"
    allow.write_text("".join(f"{p} {i}\n" for i, p in ids.items()))
    t0 = time.monotonic()
    with Hosts(n, halves=n) as hosts:
        first = f"/ip4/{hosts.ip(0)}/tcp/{RELAY}/p2p/{ids[0]}"
        procs = []
        for i in range(n):
            folder = peer_dir(out, i)
            folder.mkdir(parents=True)
            hosts.rate(i, args.rate)
            hosts.relay(i, RELAY, LISTEN, args.delay_ms, args.loss, folder / "relay.log")
            peer = [
                *options,
                f"train.clients={n}",
                f"swarm.client_id={i}",
                f"out_dir={folder}",
                f"swarm.identity_path={out / 'keys' / f'{i}.key'}",
                f"swarm.allowlist_file={allow}",
                "swarm.host=127.0.0.1",
                f"swarm.port={LISTEN}",
                f"swarm.announce_maddrs=[/ip4/{hosts.ip(i)}/tcp/{RELAY}]",
                "swarm.round_timeout_s=120",
                *([f"swarm.initial_peers=[{first}]"] if i else []),
            ]
            procs.append(hosts.popen(i, [*DECLORA, "peer", *peer], folder / "peer.log", env))
        codes = [p.wait(timeout=args.timeout) for p in procs]
        if any(codes):
            raise SystemExit(f"impaired swarm: exit codes {codes}; see {out}/peer_*/peer.log")
    return time.monotonic() - t0


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
    ap.add_argument("--delay-ms", type=float, default=50.0)
    ap.add_argument("--loss", type=float, default=0.01)
    ap.add_argument("--rate", default="10mbit")
    ap.add_argument("--timeout", type=float, default=540.0)
    args = ap.parse_args()
    if (why := unavailable()) is not None:
        raise SystemExit(f"swarm_netns: {why}")
    tmp = Path(tempfile.mkdtemp(prefix="declora-swarm-netns-"))
    options = overrides(
        model=model_name(args.model, tmp),
        data=args.data,
        rounds=args.rounds,
        local_steps=args.local_steps,
        batch_size=args.batch_size,
        train_examples=args.train_examples,
        eval_examples=args.eval_examples,
    )
    env = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    n = args.clients

    out = tmp / "loopback"
    total = timed([*DECLORA, "swarm", "--clients", str(n), "--out", str(out), *options], env)
    loop = [per_round(peer_dir(out, i)) for i in range(n)]
    print(f"loopback x{n}: {sum(loop) / n:.3f} s/round ({total:.1f} s in all); per peer {loop}", flush=True)

    out = tmp / "impaired"
    total = impaired_swarm(n, options, out, env, args)
    imp = [per_round(peer_dir(out, i)) for i in range(n)]
    print(f"impaired x{n}: {sum(imp) / n:.3f} s/round ({total:.1f} s in all); per peer {imp}", flush=True)
    print(
        f"ratio impaired / loopback: {sum(imp) / sum(loop):.2f}x (goal <= 1.3x); links: {args.delay_ms:g} ms "
        f"one way, {args.loss:.0%} loss, {args.rate}; run dirs in {tmp}"
    )


if __name__ == "__main__":
    main()
