"""``declora topology / partition / compare / reproduce``: tools that train nothing themselves (or drive recipes).

Examples:
    declora topology ring --clients 8 --mixing metropolis --plot ring.png
    declora partition label_proportions --clients 3 --proportions '[[0.15,0.85],[0.85,0.15],[0.5,0.5]]'
    declora compare runs/a runs/b --csv compare.csv --plot compare.png
    declora reproduce --list ; declora reproduce label_skew --scale cpu
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from declora.errors import ConfigError, DecloraError


def check_outputs(**files: str | None) -> None:
    """Stop before any work when an output file flag (``plot=...`` for ``--plot``) cannot be written."""
    from declora.rundir.protect import check_writable

    for name, path in files.items():
        if path is not None:
            check_writable(path, "--" + name.replace("_", "-"), folder=False)


# `declora topology` takes flags, not dotted options: its errors name the flag.
def cmd_topology(args: argparse.Namespace) -> int:
    try:
        return _topology(args)
    except DecloraError as err:
        raise type(err)(flag_hints(str(err), _TOPOLOGY_FLAGS)) from None


def _topology(args: argparse.Namespace) -> int:
    from declora.config import TopologyConfig
    from declora.mixing.topology import Topology, draw_topology

    check_outputs(plot=args.plot)
    if args.precision < 0:
        raise ConfigError(f"--precision={args.precision}: give a number of decimals >= 0")
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


# `declora partition` takes flags, not dotted options: its errors name the flag (declora.cli.runs).
def cmd_partition(args: argparse.Namespace) -> int:
    try:
        return _partition(args)
    except DecloraError as err:
        raise type(err)(flag_hints(str(err), _PARTITION_FLAGS)) from None


def _partition_name(p: Any) -> str:
    """``dirichlet(α=0.1)``, ``shards(k=2)``, or the kind."""
    return {"dirichlet": f"dirichlet(α={p.alpha})", "shards": f"shards(k={p.shards_per_client})"}.get(p.kind, p.kind)


def _partition(args: argparse.Namespace) -> int:
    """Per-client label counts of a split, from the labels alone (no model, no tokenizer)."""
    import numpy as np

    from declora.config import load_config
    from declora.data.loading import load_train_labels
    from declora.partition import partition_counts, partitioner_from_config, plot_partition

    check_outputs(plot=args.plot)
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
    from declora.experiments.compare import differences, markdown_table, plot_compare, read_run, write_csv

    check_outputs(csv=args.csv, plot=args.plot)
    runs = [read_run(d) for d in args.run_dirs]
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

    from declora.experiments.reproduce import (
        check_only,
        check_run_options,
        find_experiment,
        list_experiments,
        run_experiment,
        select_runs,
        validate,
        write_report,
    )

    recipes = Path(args.recipes) if args.recipes else None
    if args.list or not args.experiments:
        for e in list_experiments(recipes):
            print(f"{e.name:<18} {len(e.runs):>2} runs  {e.title}")
        return 0
    names = [e.name for e in list_experiments(recipes)] if args.experiments == ["all"] else args.experiments
    check_run_options(args.scale, args.jobs)  # also for --dry-run, --report-only and --page
    out = Path(args.out)
    exps = [find_experiment(n, recipes) for n in names]
    check_only(exps, args.only)
    if not args.dry_run:
        from declora.rundir.protect import check_writable

        check_writable(args.page if args.page else out, "--page" if args.page else "--out", folder=not args.page)
    if args.page:  # one results page from what has finished so far (no training)
        from declora.experiments.page import collect

        intro = (
            f"Every table below is written by `declora reproduce EXPERIMENT "
            f"--scale {args.scale} --out {args.out}` from the runs' own summary.json / metrics.jsonl, and this page "
            f"by `declora reproduce EXPERIMENT ... --scale {args.scale} --out {args.out} --page {args.page}` (each "
            f"call rewrites only its experiments' sections). Accuracies are in percent."
        )
        page = collect(exps, args.scale, out, Path(args.page), intro, title=f"# Results ({args.scale} scale)")
        print(f"wrote {page}")
        return 0
    for exp in exps:
        if args.dry_run:
            validate(exp, args.scale, out)
            for run in select_runs(exp, args.only):
                print(shlex.join(exp.command(run, args.scale, out)))
            continue
        if args.report_only:
            path = write_report(exp, args.scale, out)
        else:
            path = run_experiment(exp, args.scale, out, jobs=args.jobs, only=args.only, force=args.force)
        print(path.read_text())
        print(f"wrote {path}")
    return 0


# `declora partition`'s flags for the dotted options its errors would name.
_PARTITION_FLAGS = {
    "data.path=": "--data-path ",
    "data.path": "--data-path",
    "data.label_column": "--label-column",
    "data.text_column": "--text-column",
    "data.max_train_examples": "--max-train-examples",
    "data.task": "--task",
    "train.clients": "--clients",
    "partition.alpha": "--alpha",
    "partition.min_partition_size": "--min-partition-size",
    "partition.proportions": "--proportions",
    "partition.shards_per_client": "--shards-per-client",
}


# `declora topology`'s, likewise (its KIND is the positional argument).
_TOPOLOGY_FLAGS = {
    "topology.kind=": "KIND ",
    "topology.kind": "KIND",
    "topology.mixing": "--mixing",
    "topology.p": "--p",
    "topology.rows": "--rows",
    "topology.edges_file": "--edges-file",
    "topology.seed": "--seed",
    "train.seed": "--seed",
    "train.clients": "--clients",
}


def flag_hints(message: str, flags: dict[str, str]) -> str:
    """``message`` with each dotted option replaced by the command-line flag that sets it."""
    for option, flag in flags.items():
        message = message.replace(option, flag)
    return message


def add_tool_commands(sub: Any) -> None:
    """Register ``topology``, ``partition``, ``compare`` and ``reproduce`` on the ``declora`` subparsers."""
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
