"""``declora launch``: start one local process per client with torchrun (``torch.distributed.run``).

``declora launch --clients 4 train.rounds=3`` runs::

    python -m torch.distributed.run --standalone --nproc-per-node 4 \\
        -m declora train runtime=distributed train.clients=4 train.rounds=3

The rendezvous endpoint is ``127.0.0.1:0`` (c10d on a free port: ranks reach the store over loopback
only), and gloo is bound to the loopback interface (``GLOO_SOCKET_IFNAME=lo`` unless set). **Exposure:**
torch's TCPStore (torch 2.13) *listens on all interfaces* whatever endpoint it is given, without
authentication: anyone who reaches that port while the run is up can read and write its keys (e.g. a fake
``declora/failed/<rank>``). On a machine reachable by others, firewall ephemeral ports or run inside a
network namespace. For several machines run ``torchrun`` yourself with ``--nnodes``, ``--node-rank`` and
``--rdzv-endpoint=<private address>:PORT`` on a private interface, and ``GLOO_SOCKET_IFNAME`` naming it.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

from declora.algorithms import build_algorithm
from declora.config import ConfigError, load_config

LOOPBACK_RENDEZVOUS = ("--nnodes=1", "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0")


def torchrun_command(clients: int, overrides: list[str], config: str | None = None) -> list[str]:
    """The torchrun command line that runs ``declora train`` with one process per client.

    ``train.clients=<clients>`` comes before ``overrides``, so an explicit override wins (and is then
    checked against ``clients``).
    """
    train = ["train", *(["--config", config] if config else []), "runtime=distributed", f"train.clients={clients}"]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *LOOPBACK_RENDEZVOUS,
        f"--nproc-per-node={clients}",
        "-m",
        "declora",
        *train,
        *overrides,
    ]


def launch(clients: int, overrides: list[str], config: str | None = None, dry_run: bool = False) -> int:
    """Validate the config here (bad input stops before any process starts), then run torchrun.

    Returns:
        torchrun's exit status (non-zero when any rank failed).
    """
    if clients < 1:
        raise ConfigError(f"--clients={clients} must be >= 1")
    cmd = torchrun_command(clients, overrides, config)
    cfg = load_config(config, cmd[cmd.index("runtime=distributed") :])
    workers = build_algorithm(cfg.train.algorithm).workers(cfg.train)
    if workers != clients:
        raise ConfigError(
            f"--clients={clients} but train.algorithm={cfg.train.algorithm} with train.clients={cfg.train.clients} "
            f"trains {workers} model(s): one process per model, so use --clients {workers}"
        )
    print("declora launch:", shlex.join(cmd), file=sys.stderr, flush=True)
    if dry_run:
        return 0
    env = dict(os.environ)
    if sys.platform.startswith("linux"):  # gloo listens on loopback only (Linux names it lo)
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    return subprocess.run(cmd, check=False, env=env).returncode
