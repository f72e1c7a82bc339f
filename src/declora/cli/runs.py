"""``declora eval / predict / export / generate``: use a finished run (wired in :mod:`declora.cli.app`).

Examples:
    declora eval runs/x                                  (the run's held-out split: its reported accuracy)
    declora eval runs/x --adapter best --split validation
    declora eval runs/x --data-path ../other_data --split test --max-examples 500
    declora predict runs/x --text "a gorgeous film" --text "a waste of time"
    declora predict runs/x --file reviews.txt --json
    declora export runs/x merged/ --merge                (AutoModelForSequenceClassification.from_pretrained)
    declora generate runs/x --prompt "The film was"
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from declora.errors import ConfigError, DecloraError
from declora.quiet import quiet_libraries

# what `declora eval`'s errors would name as dotted options, and the flag that sets each
_EVAL_FLAGS = {
    "data.max_eval_examples": "--max-examples",
    "eval.batch_size": "--batch-size",
    "data.path=": "--data-path ",
    "data.path": "--data-path",
    "data.train_split/data.eval_split": "--split",
}


def check_counts(**flags: int | None) -> None:
    """Stop on a count flag (``max_examples=...`` for ``--max-examples``) below 1, before anything loads."""
    for name, value in flags.items():
        if value is not None and value < 1:
            flag = "--" + name.replace("_", "-")
            raise ConfigError(f"{flag}={value}: give 1 or more, or leave {flag} out for its default")


def cmd_eval(args: argparse.Namespace) -> int:
    from declora.cli.tools import flag_hints

    check_counts(max_examples=args.max_examples, batch_size=args.batch_size)
    from declora.inference import evaluate_run

    quiet_libraries()
    try:
        res = evaluate_run(args.run_dir, args.adapter, args.split, args.data_path, args.max_examples, args.batch_size)
    except DecloraError as err:
        raise type(err)(flag_hints(str(err), _EVAL_FLAGS)) from None
    if args.json:
        print(json.dumps(res))
    else:
        print(
            f"adapters/{res['adapter']} on {res['examples']} examples of {res['split']} ({res['source']}): "
            f"accuracy {100 * res['accuracy']:.2f} % ({res['accuracy']!r}), loss {res['loss']:.4f}"
        )
    return 0


_TABLES = (".tsv", ".csv", ".jsonl", ".json", ".parquet")  # read in the run's text column (inference.read_texts)


def check_predict_inputs(texts: list[str] | None, file: str | None) -> None:
    """``declora predict``'s texts, checked before torch or the model loads.

    Raises:
        ConfigError: no text at all, an empty (or blank) ``--text``, or a ``--file`` that is not a
            readable file.
    """
    if not texts and not file:
        raise ConfigError("predict: give --text TEXT (repeatable) or --file FILE")
    for i, text in enumerate(texts or [], 1):
        if not text.strip():
            raise ConfigError(f"predict: --text number {i} is empty; give the text to label, e.g. --text 'a fine film'")
    if file is not None:
        path = Path(file)
        if not path.is_file():
            raise ConfigError(f"--file {file}: no such file; give a file of texts (one per line, or .tsv/.csv/.jsonl)")
        try:
            text = path.read_text(encoding="utf-8") if path.suffix not in _TABLES else None
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"--file {file}: cannot be read as UTF-8 text ({err}); give a text file") from None
        if text is not None and not text.strip():
            raise ConfigError(f"--file {file}: holds no text (one text per line); give a file with texts")


def cmd_predict(args: argparse.Namespace) -> int:
    check_predict_inputs(args.text, args.file)
    from declora.inference import load_run, predict, read_texts

    quiet_libraries()
    lr = load_run(args.run_dir, args.adapter)
    texts = list(args.text or []) + (read_texts(args.file, lr) if args.file else [])
    if not texts:
        raise ConfigError(f"--file {args.file}: holds no text to label")
    for p in predict(lr, texts):
        if args.json:
            print(json.dumps(p))
        else:
            score = f"\t{p['probabilities'][p['label']]:.3f}" if "probabilities" in p else ""
            print(f"{p['label']}{score}\t{p['text']}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from declora.inference import export

    quiet_libraries()
    out = export(args.run_dir, args.out, args.adapter, merge=args.merge)
    kind = "merged model (transformers AutoModelFor...from_pretrained)" if args.merge else "adapter (peft)"
    print(f"wrote {out}: {kind}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    check_counts(max_new_tokens=args.max_new_tokens)
    from declora.evaluation.causal import generate_from_run

    quiet_libraries()
    prompt, text = generate_from_run(args.run_dir, args.prompt, args.max_new_tokens, args.adapter, args.raw)
    print(prompt + text)
    return 0


def add_run_commands(sub: Any) -> None:
    """Register ``eval``, ``predict``, ``export`` and ``generate`` on the ``declora`` subparsers."""
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

    p = sub.add_parser("generate", help="continue a prompt with a causal_lm run's base model + saved adapter")
    p.add_argument("run_dir", help="a finished run directory of model.task_type=causal_lm")
    p.add_argument("--prompt", required=True, help="the text; put into the run's data.template unless --raw")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (greedy)")
    p.add_argument("--adapter", default="average", help="adapters/<name>: average or client_<i>")
    p.add_argument("--raw", action="store_true", help="use --prompt as is, without the run's template")
    p.set_defaults(func=cmd_generate)
