"""The ``declora`` command line: ``train`` and ``topology``.

Examples:
    declora train
    declora train --config recipes/default.yaml train.clients=10 topology.kind=ring train.rounds=20
    declora topology ring --clients 8 --mixing metropolis --plot ring.png
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from declora.config import ConfigError


def _format_summary(summary: dict[str, Any]) -> str:
    """A two-column table of the headline numbers."""
    keys = [
        ("algorithm", "algorithm"),
        ("clients", "clients"),
        ("topology", "topology"),
        ("spectral gap", "spectral_gap"),
        ("rounds x local steps", None),
        ("best accuracy", "best_accuracy"),
        ("best round", "best_round"),
        ("final accuracy", "final_accuracy"),
        ("final client accuracy (mean)", "final_client_accuracy_mean"),
        ("final consensus error", "final_consensus_error"),
        ("bytes sent (total)", "total_bytes_sent"),
        ("trainable params", "trainable_params"),
        ("wall (s)", "wall_s"),
        ("samples/s", "samples_per_s"),
        ("peak RSS (MB)", "peak_rss_mb"),
        ("run dir", "run_dir"),
    ]
    rows = []
    for label, key in keys:
        value: Any = f"{summary['rounds']} x {summary['local_steps']}" if key is None else summary.get(key)
        if isinstance(value, float):
            value = f"{value:.4f}" if value < 1e3 else f"{value:.1f}"
        elif isinstance(value, int) and value >= 10_000:
            value = f"{value:,}"
        rows.append((label, "-" if value is None else str(value)))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"  {label:<{width}}  {value}" for label, value in rows)


def quiet_libraries() -> None:
    """Silence per-file progress bars and load reports of datasets/transformers (ours stays)."""
    import warnings

    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")


def cmd_train(args: argparse.Namespace) -> int:
    from declora.config import config_help, load_config

    if args.help_config:
        print(config_help())
        return 0
    cfg = load_config(args.config, args.overrides)
    quiet_libraries()
    from declora.trainer import run

    summary = run(cfg)
    print("\nsummary")
    print(_format_summary(summary))
    return 0


def cmd_topology(args: argparse.Namespace) -> int:
    from declora.topology import Topology, draw_topology

    try:
        topo = Topology.build(
            args.kind,
            args.clients,
            mixing=args.mixing,
            p=args.p,
            seed=args.seed,
            rows=args.rows,
            edges_file=args.edges_file,
        )
    except ValueError as err:
        raise ConfigError(str(err)) from None
    print(topo.describe(precision=args.precision))
    if args.json:
        print(json.dumps({"degrees": topo.degrees, "W": topo.W.tolist(), "spectral_gap": topo.spectral_gap}))
    if args.plot:
        draw_topology(topo, args.plot)
        print(f"wrote {args.plot}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="declora", description="Decentralized LoRA fine-tuning (Dec-LoRA).")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train with a config file and/or dotted key=value overrides")
    p.add_argument("--config", help="YAML file (keys as in `declora train --help-config`)")
    p.add_argument("--help-config", action="store_true", help="list every option with its default and help")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.clients=10 topology.kind=ring")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("topology", help="print a graph's degrees, mixing matrix W and spectral gap")
    p.add_argument("kind", help="ring, erdos_renyi, complete, star, torus, grid, edge_list")
    p.add_argument("--clients", type=int, required=True, help="number of nodes N")
    p.add_argument("--mixing", default="laplacian", help="laplacian, metropolis or max_degree")
    p.add_argument("--p", type=float, default=0.5, help="edge probability (erdos_renyi)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rows", type=int, default=None, help="rows of a torus/grid")
    p.add_argument("--edges-file", default=None, help="edge list for kind edge_list")
    p.add_argument("--precision", type=int, default=3, help="decimals when printing W")
    p.add_argument("--json", action="store_true", help="also print degrees, W and gap as JSON")
    p.add_argument("--plot", default=None, help="write a PNG drawing of the graph")
    p.set_defaults(func=cmd_topology)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"declora: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("declora: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
