"""Bytes per gossip round by bit width, on the real trainable state of a model (no training).

Builds the peft model of a config once, then measures one encoded message per bit width and scale
(the real packed payload, encoded and counted, and the closed-form ``payload_bytes`` it must equal),
the per-round total for a topology (each client sends one message per neighbour) and the ratio to
fp32, plus the relative round-trip error. Usage:

    python benchmarks/gossip_bytes.py [train.clients=10 topology.kind=ring peft.r=16 ...]
"""

from __future__ import annotations

import sys

import torch

from declora.config import load_config
from declora.mixing.compress import Quantizer
from declora.mixing.topology import Topology
from declora.model.loading import build_model, trainable_state
from declora.quiet import quiet_libraries


def main(overrides: list[str]) -> None:
    cfg = load_config(overrides=overrides)
    quiet_libraries()
    model = build_model(cfg.model, cfg.peft, num_labels=2, seed=cfg.train.seed)
    state = {n: t.detach().clone() for n, t in trainable_state(model).items()}
    torch.manual_seed(0)
    state = {n: t + 0.01 * torch.randn_like(t) for n, t in state.items()}  # B = 0 at init: perturb it
    topo = Topology.from_config(cfg.topology, cfg.train.clients, cfg.train.seed)
    sends = sum(topo.degrees)  # messages per round: one per client per neighbour
    values = sum(t.numel() for t in state.values())
    print(
        f"{cfg.model.name_or_path}, peft {cfg.peft.method} r={cfg.peft.r}: {values:,} trainable values in "
        f"{len(state)} tensors; {cfg.topology.kind} with {cfg.train.clients} clients = {sends} messages/round"
    )
    print(f"{'bits':>4} {'scale':>6} {'message':>12} {'per round':>12} {'vs fp32':>8} {'rel. error':>10}")
    fp32 = Quantizer(32).payload_bytes(state)
    for bits in (32, 16, 8, 4, 2):
        for scale in ("tensor", "row") if bits < 16 else ("tensor",):
            q = Quantizer(bits, scale)
            message = q.encode(state)
            measured = sum(t.numel() * t.element_size() for t in message.values())
            assert measured == q.payload_bytes(state), (bits, scale, measured)
            back = q.decode(message, state)
            err = sum((back[n] - t).norm() ** 2 for n, t in state.items()) ** 0.5
            rel = float(err / sum(t.norm() ** 2 for t in state.values()) ** 0.5)
            print(f"{bits:>4} {scale:>6} {measured:>12,} {measured * sends:>12,} {measured / fp32:>8.4f} {rel:>10.2e}")


if __name__ == "__main__":
    main(sys.argv[1:])
