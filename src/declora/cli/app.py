"""The ``declora`` command line: train, topology, partition, compare, reproduce, generate, launch.

Examples:
    declora train
    declora train --config recipes/default.yaml train.clients=10 topology.kind=ring train.rounds=20
    declora topology ring --clients 8 --mixing metropolis --plot ring.png
    declora partition label_proportions --clients 3 --proportions '[[0.15,0.85],[0.85,0.15],[0.5,0.5]]'
    declora compare runs/a runs/b --csv compare.csv --plot compare.png
    declora reproduce --list ; declora reproduce label_skew --scale cpu
    declora launch --clients 4 train.rounds=3        (one process per client, torchrun)
    declora train ... resume=runs/<run>              (continue from its last complete checkpoint)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from declora.config import ConfigError
from declora.errors import DecloraError, PeerError, debug_requested, one_line


def _format_summary(summary: dict[str, Any]) -> str:
    """A two-column table of the headline numbers (see :func:`declora.cli.runs.format_summary`)."""
    from declora.cli.runs import format_summary

    return format_summary(summary)


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
    from declora.cli.runs import AnnounceRunDir, format_summary
    from declora.training.trainer import run

    summary = run(cfg, callbacks=[AnnounceRunDir()])
    print("\nsummary")
    print(format_summary(summary))
    return 0


def cmd_topology(args: argparse.Namespace) -> int:
    from declora.config import TopologyConfig
    from declora.mixing.topology import Topology, draw_topology

    options = {"kind": args.kind, "mixing": args.mixing, "p": args.p, "rows": args.rows, "edges_file": args.edges_file}
    try:
        t = TopologyConfig(**options, seed=args.seed)
    except TypeError as err:
        raise ConfigError(str(err)) from None
    topo = Topology.from_config(t, args.clients, args.seed)
    print(topo.describe(precision=args.precision))
    if args.json:
        info = {"degrees": topo.degrees, "W": topo.W.tolist(), "spectral_gap": topo.spectral_gap}
        info["rms_contraction"] = topo.rms_contraction
        print(json.dumps(info))
    if args.plot:
        draw_topology(topo, args.plot)
        print(f"wrote {args.plot}")
    return 0


def cmd_launch(args: argparse.Namespace) -> int:
    from declora.launch.torchrun import launch

    return launch(args.clients, args.overrides, args.config, dry_run=args.dry_run)


def cmd_peer(args: argparse.Namespace) -> int:
    from declora.launch.swarm import run_peer

    summary = run_peer(args.config, args.overrides)
    print("\nsummary (this peer's own model)")
    print(_format_summary(summary))
    return 0


def cmd_swarm(args: argparse.Namespace) -> int:
    from declora.launch.swarm import launch_swarm, parse_late

    return launch_swarm(args.clients, args.overrides, args.config, args.out, parse_late(args.late, args.clients))


# `declora partition` takes flags, not dotted options: its errors name the flag (declora.cli.runs).
def cmd_partition(args: argparse.Namespace) -> int:
    from declora.cli.runs import partition_flag_hints

    try:
        return _partition(args)
    except DecloraError as err:
        raise type(err)(partition_flag_hints(str(err))) from None


def _partition_name(p: Any) -> str:
    """``dirichlet(α=0.1)``, ``shards(k=2)``, or the kind."""
    return {"dirichlet": f"dirichlet(α={p.alpha})", "shards": f"shards(k={p.shards_per_client})"}.get(p.kind, p.kind)


def _partition(args: argparse.Namespace) -> int:
    """Per-client label counts of a split, from the labels alone (no model, no tokenizer)."""
    import numpy as np

    from declora.config import load_config
    from declora.data.loading import load_train_labels
    from declora.partition import partition_counts, partitioner_from_config, plot_partition

    overrides = [f"partition.kind={args.kind}", f"train.clients={args.clients}", f"data.task={args.task}"]
    for key, value in (
        ("partition.alpha", args.alpha),
        ("partition.min_partition_size", args.min_partition_size),
        ("partition.proportions", args.proportions),
        ("partition.shards_per_client", args.shards_per_client),
        ("data.path", args.data_path),
        ("data.max_train_examples", args.max_train_examples),
        ("data.label_column", args.label_column),
        ("data.text_column", args.text_column),
    ):
        if value is not None:
            overrides.append(f"{key}={value}")
    cfg = load_config(overrides=overrides)  # the same validation as `declora train`
    import datasets

    datasets.disable_progress_bars()
    labels, names, source = load_train_labels(cfg.data, seed=args.seed)
    from declora.data.checks import check_proportions

    check_proportions(cfg.partition.kind, cfg.partition.proportions, names, source)  # a row per class at most
    p = cfg.partition
    try:
        parts = partitioner_from_config(p, args.clients, args.seed).split(labels)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    counts = partition_counts(parts, labels, len(names))
    print(f"{p.kind} split of {len(labels)} {cfg.data.task} training examples ({source}) over {args.clients} clients")
    width = max(8, *(len(n) for n in names))
    print("client  examples  " + "  ".join(f"{n:>{width}}" for n in names) + "  label shares")
    for i, row in enumerate(counts):
        shares = " ".join(f"{x:.2f}" for x in row / max(row.sum(), 1))
        print(f"{i:>6}  {row.sum():>8}  " + "  ".join(f"{c:>{width}}" for c in row) + f"  {shares}")
    total = counts.sum(0)
    print(f"{'all':>6}  {total.sum():>8}  " + "  ".join(f"{c:>{width}}" for c in total))
    if args.json:
        print(json.dumps({"label_names": names, "partition_counts": np.asarray(counts).tolist()}))
    if args.plot:
        plot_partition(counts, args.plot, names, f"{_partition_name(p)}, N={args.clients}, {source}")
        print(f"wrote {args.plot}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from declora.experiments.compare import differences, load_run, markdown_table, plot_compare, write_csv

    runs = [load_run(d) for d in args.run_dirs]
    for warning in differences(runs):  # settings that make the numbers incomparable
        print(f"declora: warning: {warning}", file=sys.stderr)
    print(markdown_table(runs))
    if args.csv:
        write_csv(runs, args.csv)
        print(f"wrote {args.csv}")
    if args.plot:
        plot_compare(runs, args.plot)
        print(f"wrote {args.plot}")
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    import shlex
    from pathlib import Path

    from declora.experiments.reproduce import find_experiment, list_experiments, run_experiment, validate, write_report

    recipes = Path(args.recipes) if args.recipes else None
    if args.list or not args.experiments:
        for e in list_experiments(recipes):
            print(f"{e.name:<18} {len(e.runs):>2} runs  {e.title}")
        return 0
    names = [e.name for e in list_experiments(recipes)] if args.experiments == ["all"] else args.experiments
    out = Path(args.out)
    if args.page:  # one results page from what has finished so far (no training)
        from declora.experiments.reproduce import collect

        intro = (
            f"Every table below is written by `declora reproduce EXPERIMENT "
            f"--scale {args.scale} --out {args.out}` from the runs' own summary.json / metrics.jsonl, and this page "
            f"by `declora reproduce {' '.join(args.experiments)} --scale {args.scale} --out {args.out} --page "
            f"{args.page}`. Accuracies are in percent."
        )
        exps = [find_experiment(n, recipes) for n in names]
        page = collect(exps, args.scale, out, Path(args.page), intro, title=f"# Results ({args.scale} scale)")
        print(f"wrote {page}")
        return 0
    for name in names:
        exp = find_experiment(name, recipes)
        if args.dry_run:
            validate(exp, args.scale, out)
            for run in exp.runs:
                print(shlex.join(exp.command(run, args.scale, out)))
            continue
        if args.report_only:
            path = write_report(exp, args.scale, out)
        else:
            path = run_experiment(exp, args.scale, out, jobs=args.jobs, only=args.only, force=args.force)
        print(path.read_text())
        print(f"wrote {path}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from declora.evaluation.causal import generate_from_run

    quiet_libraries()
    prompt, text = generate_from_run(args.run_dir, args.prompt, args.max_new_tokens, args.adapter, args.raw)
    print(prompt + text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="declora", description="Decentralized LoRA fine-tuning (Dec-LoRA).")
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of an error (also DECLORA_DEBUG=1; any position)"
    )
    from declora import __version__
    from declora.cli.runs import add_run_commands

    parser.add_argument("--version", action="version", version=f"declora {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    add_run_commands(sub)  # eval, predict, export (declora.cli.runs)

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

    p = sub.add_parser("partition", help="print (and draw) the per-client label counts of a split, no training")
    p.add_argument("kind", help="iid, dirichlet, label_proportions or shards")
    p.add_argument("--clients", type=int, required=True, help="number of clients N")
    p.add_argument("--alpha", type=float, default=None, help="Dirichlet concentration (kind dirichlet)")
    p.add_argument("--min-partition-size", type=int, default=None, help="fewest examples per client (dirichlet)")
    p.add_argument(
        "--proportions", default=None, help="per-client class proportions as JSON, e.g. '[[0.15,0.85],[0.85,0.15]]'"
    )
    p.add_argument("--shards-per-client", type=int, default=None, help="label-sorted shards per client (shards)")
    p.add_argument("--task", default="sst2", help="sst2, agnews or generic (as data.task)")
    p.add_argument("--data-path", default=None, help="as data.path (default: ./data/<task>, ../shared/data/<task>)")
    p.add_argument("--max-train-examples", type=int, default=None, help="as data.max_train_examples")
    p.add_argument("--label-column", default=None, help="label column of generic data (as data.label_column)")
    p.add_argument("--text-column", default=None, help="text column of generic data (as data.text_column)")
    p.add_argument("--seed", type=int, default=0, help="partition seed (train.seed of a run)")
    p.add_argument("--json", action="store_true", help="also print the counts as JSON")
    p.add_argument("--plot", default=None, help="write a stacked bar chart (PNG) of the counts")
    p.set_defaults(func=cmd_partition)

    p = sub.add_parser("compare", help="one table (Markdown, CSV) and overlaid curves over finished runs")
    p.add_argument("run_dirs", nargs="+", help="run directories (each with summary.json and metrics.jsonl)")
    p.add_argument("--csv", default=None, help="also write the table as CSV (raw numbers)")
    p.add_argument("--plot", default=None, help="write accuracy vs round and vs bytes sent (PNG)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("generate", help="continue a prompt with a causal_lm run's base model + saved adapter")
    p.add_argument("run_dir", help="a finished run directory of model.task_type=causal_lm")
    p.add_argument("--prompt", required=True, help="the text; put into the run's data.template unless --raw")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (greedy)")
    p.add_argument("--adapter", default="average", help="adapters/<name>: average or client_<i>")
    p.add_argument("--raw", action="store_true", help="use --prompt as is, without the run's template")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("reproduce", help="run one of the paper's experiments from its recipe and write its table")
    p.add_argument("experiments", nargs="*", help="experiment names (`--list` shows them), or `all`")
    p.add_argument("--list", action="store_true", help="list the experiments and exit")
    p.add_argument("--scale", default="cpu", help="cpu (offline default models, 2 cores) or paper (hub, GPU)")
    p.add_argument("--out", default="reproduce", help="folder for the runs and reports (OUT/<experiment>/)")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (each gets cpu_count/jobs threads)")
    p.add_argument("--only", nargs="+", default=None, help="run only these run names (from the recipe)")
    p.add_argument("--force", action="store_true", help="re-run runs that already finished")
    p.add_argument("--dry-run", action="store_true", help="print the `declora train` commands and exit")
    p.add_argument("--report-only", action="store_true", help="write results.md from the finished runs only")
    p.add_argument("--recipes", default=None, help="recipe folder (default: recipes/reproduce)")
    p.add_argument(
        "--page", default=None, help="only write one Markdown page of the finished runs' tables, e.g. docs/results.md"
    )
    p.set_defaults(func=cmd_reproduce)

    p = sub.add_parser("launch", help="run `declora train runtime=distributed` in one local process per client")
    p.add_argument("--clients", type=int, required=True, help="number of processes = train.clients")
    p.add_argument("--config", help="YAML file (keys as in `declora train --help-config`)")
    p.add_argument("--dry-run", action="store_true", help="print the torchrun command and exit")
    p.add_argument("overrides", nargs="*", help="dotted train overrides, e.g. train.rounds=3")
    p.set_defaults(func=cmd_launch)

    p = sub.add_parser("peer", help="run one serverless swarm peer (runtime=swarm); prints its address first")
    p.add_argument("--config", help="YAML file (keys as in `declora train --help-config`)")
    p.add_argument("overrides", nargs="*", help="e.g. swarm.client_id=1 swarm.initial_peers=[/ip4/.../p2p/...]")
    p.set_defaults(func=cmd_peer)

    p = sub.add_parser("swarm", help="try a swarm on this machine: N local peers, then the assembled result")
    p.add_argument("--clients", type=int, required=True, help="number of peers = train.clients")
    p.add_argument("--config", help="YAML file (keys as in `declora train --help-config`)")
    p.add_argument("--out", default=None, help="folder for peer_<i>/ run dirs and the summary (runs/<time>-swarm)")
    p.add_argument(
        "--late", action="append", metavar="PEER@ROUND", help="start PEER only once the swarm is in ROUND (a newcomer)"
    )
    p.add_argument("overrides", nargs="*", help="dotted overrides for every peer, e.g. train.rounds=3")
    p.set_defaults(func=cmd_swarm)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; every :class:`DecloraError` is one line and its exit code (see declora.errors).

    ``--debug`` (anywhere on the line) or ``DECLORA_DEBUG=1`` shows the traceback instead.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    args = build_parser().parse_args([a for a in argv if a != "--debug"])
    try:
        return args.func(args)
    except DecloraError as err:
        if debug:
            raise
        print(one_line(err), file=sys.stderr, flush=True)  # one line: what, where, the fix
        dist = sys.modules.get("torch.distributed")
        if isinstance(err, PeerError) or (dist is not None and dist.is_available() and dist.is_initialized()):
            sys.stdout.flush()
            os._exit(err.exit_code)  # not sys.exit: gloo threads still waiting on a peer would abort the exit
        return err.exit_code
    except KeyboardInterrupt:
        print("declora: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
