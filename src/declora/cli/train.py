"""``declora train / launch / peer / swarm`` and the readable end-of-run summary (wired in :mod:`declora.cli.app`).

Examples:
    declora train
    declora train --config recipes/default.yaml train.clients=10 topology.kind=ring train.rounds=20
    declora train ... resume=runs/<run>              (continue from its last complete checkpoint)
    declora launch --clients 4 train.rounds=3        (one process per client, torchrun)
    declora peer swarm.client_id=1 swarm.initial_peers=[/ip4/.../p2p/...]
    declora swarm --clients 4 --out runs/swarm train.rounds=3
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from declora.errors import ConfigError
from declora.quiet import quiet_libraries


class AnnounceRunDir:
    """A trainer callback printing the run directory once the run starts (rank 0 only)."""

    def on_train_begin(self, cfg: Any, run_dir: Path) -> None:
        if os.environ.get("RANK", "0") == "0":
            print(f"declora: run directory {run_dir}", file=sys.stderr, flush=True)


def _duration(seconds: float) -> str:
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, sec = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min {sec:02d} s" if hours else f"{minutes} min {sec:02d} s"


def _bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def format_summary(summary: dict[str, Any]) -> str:
    """A two-column table of the headline numbers, each in its unit (%, MB, min s)."""
    pct = lambda v: f"{100 * v:.2f} %"  # noqa: E731
    best_on = summary.get("best_round_selected_on")
    rows: list[tuple[str, Any, Any]] = [
        ("algorithm", "algorithm", str),
        ("clients", "clients", str),
        ("topology", "topology", str),
        ("spectral gap", "spectral_gap", lambda v: f"{v:.4g}"),
        ("rounds x local steps", None, None),
        ("best accuracy (held-out)", "best_accuracy", pct),
        (f"best round{f' (on {best_on})' if best_on else ''}", "best_round", str),
        ("final accuracy", "final_accuracy", pct),
        ("final client accuracy (mean)", "final_client_accuracy_mean", pct),
        ("final consensus error", "final_consensus_error", lambda v: f"{v:.3g}"),
        ("bytes sent (total)", "total_bytes_sent", _bytes),
        ("trainable params", "trainable_params", lambda v: f"{v:,}"),
        ("base model", "base_model_mb", lambda v: f"{v:,.1f} MiB"),
        ("wall time", "wall_s", _duration),
        ("samples/s", "samples_per_s", lambda v: f"{v:,.1f}"),
        ("peak RSS", "peak_rss_mb", lambda v: f"{v:,.0f} MB"),
        ("run dir", "run_dir", str),
    ]
    out = []
    for label, key, fmt in rows:
        if key is None:
            out.append((label, f"{summary.get('rounds')} x {summary.get('local_steps')}"))
            continue
        value = summary.get(key)
        out.append((label, "-" if value is None else fmt(value)))
    width = max(len(r[0]) for r in out)
    return "\n".join(f"  {label:<{width}}  {value}" for label, value in out)


def cmd_train(args: argparse.Namespace) -> int:
    from declora.config import config_help, load_config

    if args.help_config:
        print(config_help())
        return 0
    cfg = load_config(args.config, args.overrides)
    from declora.rundir.protect import check_out_dir

    check_out_dir(cfg.out_dir, resume=cfg.resume, overwrite=cfg.overwrite)  # the trainer's check, before torch loads
    quiet_libraries()
    from declora.training.trainer import run

    summary = run(cfg, callbacks=[AnnounceRunDir()])
    print("\nsummary")
    print(format_summary(summary))
    return 0


def cmd_launch(args: argparse.Namespace) -> int:
    from declora.launch.torchrun import launch

    return launch(args.clients, args.overrides, args.config, dry_run=args.dry_run)


def cmd_peer(args: argparse.Namespace) -> int:
    from declora.launch.swarm import print_peer_id, run_peer

    if args.print_id:  # the allowlist line "PEER_ID CLIENT_ID" of this peer's identity key, then exit
        print_peer_id(args.config, args.overrides)
        return 0
    summary = run_peer(args.config, args.overrides)
    print("\nsummary (this peer's own model)")
    print(format_summary(summary))
    return 0


def swarm_out(clients: int, overrides: list[str], config: str | None, out: str | None) -> tuple[str | None, list[str]]:
    """Check a local swarm's options before any heavy import; ``out_dir=`` is taken as ``--out``.

    Returns:
        the folder for the swarm (None = ``runs/<time>-swarm``) and the overrides without ``out_dir``
        (each peer gets its own ``out_dir``, ``OUT/peer_<i>``).

    Raises:
        ConfigError: ``--clients`` < 1, a bad option, ``out_dir=`` disagreeing with ``--out``, or an
            unwritable folder.
    """
    from declora.config import load_config
    from declora.rundir.protect import check_writable

    if clients < 1:
        raise ConfigError(f"--clients={clients} must be >= 1 (the number of local peers)")
    cfg = load_config(config, ["runtime=swarm", f"train.clients={clients}", *overrides])  # the peers' own checks
    option = "--out"
    if cfg.out_dir is not None:
        if out is not None and Path(out) != Path(cfg.out_dir):
            raise ConfigError(f"out_dir={cfg.out_dir} and --out {out} disagree: give one of them")
        out, option = cfg.out_dir, "out_dir"
    if out is not None:
        check_writable(out, option)
    return out, [o for o in overrides if not o.startswith("out_dir=")]


def cmd_swarm(args: argparse.Namespace) -> int:
    out, overrides = swarm_out(args.clients, args.overrides, args.config, args.out)
    from declora.launch.swarm import launch_swarm, parse_late

    return launch_swarm(args.clients, overrides, args.config, out, parse_late(args.late, args.clients))


def add_train_commands(sub: Any) -> None:
    """Register ``train``, ``launch``, ``peer`` and ``swarm`` on the ``declora`` subparsers."""
    config_help = "YAML file (keys as in `declora train --help-config`)"
    p = sub.add_parser("train", help="train with a config file and/or dotted key=value overrides")
    p.add_argument("--config", help=config_help)
    p.add_argument("--help-config", action="store_true", help="list every option with its default and help")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.clients=10 topology.kind=ring")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("launch", help="run `declora train runtime=distributed` in one local process per client")
    p.add_argument("--clients", type=int, required=True, help="number of processes = train.clients")
    p.add_argument("--config", help=config_help)
    p.add_argument("--dry-run", action="store_true", help="print the torchrun command and exit")
    p.add_argument("overrides", nargs="*", help="dotted train overrides, e.g. train.rounds=3")
    p.set_defaults(func=cmd_launch)

    p = sub.add_parser("peer", help="run one serverless swarm peer (runtime=swarm); prints its address first")
    p.add_argument("--config", help=config_help)
    p.add_argument(
        "--print-id", action="store_true", help="print this peer's allowlist line 'PEER_ID CLIENT_ID' and exit"
    )
    p.add_argument("overrides", nargs="*", help="e.g. swarm.client_id=1 swarm.initial_peers=[/ip4/.../p2p/...]")
    p.set_defaults(func=cmd_peer)

    p = sub.add_parser("swarm", help="try a swarm on this machine: N local peers, then the assembled result")
    p.add_argument("--clients", type=int, required=True, help="number of peers = train.clients")
    p.add_argument("--config", help=config_help)
    p.add_argument(
        "--out", default=None, help="folder for peer_<i>/ run dirs and the summary (runs/<time>-swarm); or out_dir="
    )
    p.add_argument(
        "--late",
        action="append",
        metavar="PEER@ROUND",
        help="start PEER only once the swarm is in ROUND (a newcomer; a ROUND past the last: a peer that never comes)",
    )
    p.add_argument("overrides", nargs="*", help="dotted overrides for every peer, e.g. train.rounds=3")
    p.set_defaults(func=cmd_swarm)
