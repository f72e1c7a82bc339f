"""``declora eval / predict / export`` and the readable end-of-run summary (wired in :mod:`declora.cli.app`).

Examples:
    declora eval runs/x                                  (the run's held-out split: its reported accuracy)
    declora eval runs/x --adapter best --split validation
    declora eval runs/x --data-path ../other_data --split test --max-examples 500
    declora predict runs/x --text "a gorgeous film" --text "a waste of time"
    declora predict runs/x --file reviews.txt --json
    declora export runs/x merged/ --merge                (AutoModelForSequenceClassification.from_pretrained)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any


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


def cmd_eval(args: argparse.Namespace) -> int:
    from declora.cli.app import quiet_libraries
    from declora.inference import evaluate_run

    quiet_libraries()
    res = evaluate_run(args.run_dir, args.adapter, args.split, args.data_path, args.max_examples, args.batch_size)
    if args.json:
        print(json.dumps(res))
    else:
        print(
            f"adapters/{res['adapter']} on {res['examples']} examples of {res['split']} ({res['source']}): "
            f"accuracy {100 * res['accuracy']:.2f} % ({res['accuracy']!r}), loss {res['loss']:.4f}"
        )
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from declora.cli.app import quiet_libraries
    from declora.config import ConfigError
    from declora.inference import load_run, predict, read_texts

    if not args.text and not args.file:
        raise ConfigError("predict: give --text TEXT (repeatable) or --file FILE")
    quiet_libraries()
    lr = load_run(args.run_dir, args.adapter)
    texts = list(args.text or []) + (read_texts(args.file, lr) if args.file else [])
    for p in predict(lr, texts):
        if args.json:
            print(json.dumps(p))
        else:
            score = f"\t{p['probabilities'][p['label']]:.3f}" if "probabilities" in p else ""
            print(f"{p['label']}{score}\t{p['text']}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from declora.cli.app import quiet_libraries
    from declora.inference import export

    quiet_libraries()
    out = export(args.run_dir, args.out, args.adapter, merge=args.merge)
    kind = "merged model (transformers AutoModelFor...from_pretrained)" if args.merge else "adapter (peft)"
    print(f"wrote {out}: {kind}")
    return 0


def add_run_commands(sub: Any) -> None:
    """Register ``eval``, ``predict`` and ``export`` on the ``declora`` subparsers."""
    adapter_help = "adapters/<name>: average (default), best (validation-selected) or client_<i>"
    p = sub.add_parser("eval", help="accuracy and loss of a run's saved adapter on any split or data folder")
    p.add_argument("run_dir", help="a run directory (config.yaml + adapters/)")
    p.add_argument("--adapter", default="average", help=adapter_help)
    p.add_argument("--split", default=None, help="split name; 'validation' = the run's; default: its held-out split")
    p.add_argument("--data-path", default=None, help="another data folder with the run's columns (as data.path)")
    p.add_argument("--max-examples", type=int, default=None, help="seeded subset; default: the run's cap or all")
    p.add_argument("--batch-size", type=int, default=None, help="evaluation batch (default: the run's eval.batch_size)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="label texts with a run's saved adapter")
    p.add_argument("run_dir", help="a run directory (config.yaml + adapters/)")
    p.add_argument("--text", action="append", help="a text to label (repeatable)")
    p.add_argument("--file", default=None, help="one text per line, or a .tsv/.csv/.jsonl in the run's text column")
    p.add_argument("--adapter", default="average", help=adapter_help)
    p.add_argument("--json", action="store_true", help="one JSON object per text (with label probabilities)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export", help="copy a run's adapter, or write it merged into a full transformers model")
    p.add_argument("run_dir", help="a run directory (config.yaml + adapters/)")
    p.add_argument("out", help="a new folder")
    p.add_argument("--adapter", default="average", help=adapter_help)
    p.add_argument("--merge", action="store_true", help="merge LoRA into the base: loads with AutoModelFor...")
    p.set_defaults(func=cmd_export)


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


def partition_flag_hints(message: str) -> str:
    """``message`` with each dotted option replaced by the ``declora partition`` flag that sets it."""
    for option, flag in _PARTITION_FLAGS.items():
        message = message.replace(option, flag)
    return message
