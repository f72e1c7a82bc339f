"""``declora launch``: start one local process per client with torchrun (``torch.distributed.run``).

``declora launch --clients 4 train.rounds=3`` runs::

    python -m torch.distributed.run --standalone --nproc-per-node 4 \\
        -m declora train runtime=distributed train.clients=4 train.rounds=3

``--standalone`` is torchrun's single-machine rendezvous (c10d on a free 127.0.0.1 port). For several
machines run ``torchrun`` yourself with ``--nnodes``, ``--node-rank`` and ``--rdzv-endpoint``.
"""

from __future__ import annotations

import shlex
import subprocess
import sys

from declora.algorithms import build_algorithm
from declora.config import ConfigError, load_config


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
        "--standalone",
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
    return subprocess.run(cmd, check=False).returncode
