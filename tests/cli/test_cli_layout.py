"""The command line's layout (issue 22): every subcommand and flag kept, ``--help`` fast and light, the
CLI at the top of the import graph, and one ``quiet_libraries``."""

from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import declora
from declora.cli import main
from declora.cli.app import build_parser

SRC = Path(declora.__file__).resolve().parent

# Every subcommand with its flags and positionals as before the split (a removed flag fails here; new ones,
# e.g. `declora peer --print-id`, may be added).
COMMANDS = {
    "compare": ["--csv", "--plot", "run_dirs"],
    "eval": ["--adapter", "--batch-size", "--data-path", "--json", "--max-examples", "--split", "run_dir"],
    "export": ["--adapter", "--merge", "out", "run_dir"],
    "generate": ["--adapter", "--max-new-tokens", "--prompt", "--raw", "run_dir"],
    "launch": ["--clients", "--config", "--dry-run", "overrides"],
    "partition": [
        "--alpha",
        "--clients",
        "--data-path",
        "--json",
        "--label-column",
        "--max-train-examples",
        "--min-partition-size",
        "--plot",
        "--proportions",
        "--seed",
        "--shards-per-client",
        "--task",
        "--text-column",
        "kind",
    ],  # fmt: skip
    "peer": ["--config", "overrides"],
    "predict": ["--adapter", "--file", "--json", "--text", "run_dir"],
    "reproduce": [
        "--dry-run",
        "--force",
        "--jobs",
        "--list",
        "--only",
        "--out",
        "--page",
        "--recipes",
        "--report-only",
        "--scale",
        "experiments",
    ],  # fmt: skip
    "swarm": ["--clients", "--config", "--late", "--out", "overrides"],
    "topology": [
        "--clients",
        "--edges-file",
        "--json",
        "--mixing",
        "--p",
        "--plot",
        "--precision",
        "--rows",
        "--seed",
        "kind",
    ],  # fmt: skip
    "train": ["--config", "--help-config", "overrides"],
}


def test_every_subcommand_keeps_its_flags() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    found = {
        name: sorted(s for a in p._actions for s in (a.option_strings or [a.dest]) if s not in ("-h", "--help"))
        for name, p in sub.choices.items()
    }
    missing = {name: sorted(set(flags) - set(found.get(name, []))) for name, flags in COMMANDS.items()}
    assert {name: m for name, m in missing.items() if m} == {}  # new flags may come; none may go
    assert {"--debug", "--version"} <= {s for a in parser._actions for s in a.option_strings}


def test_help_imports_nothing_heavy(tmp_path: Path) -> None:
    code = (
        "import json, sys\n"
        "from declora.cli.app import build_parser\n"
        "build_parser().format_help()\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'torch', 'transformers', 'datasets', 'peft', 'omegaconf', 'numpy', 'hivemind'})))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert json.loads(done.stdout) == [], done.stdout + done.stderr
    help_ = subprocess.run(
        [sys.executable, "-m", "declora", "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert help_.returncode == 0 and all(name in help_.stdout for name in COMMANDS)


def _cli_imports(path: Path) -> set[str]:
    """The ``declora.cli`` modules a file imports (top level or inside functions)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return {n for n in names if n == "declora.cli" or n.startswith("declora.cli.")}


def test_nothing_below_the_cli_imports_it() -> None:
    """cli/ is the top layer: launch/, api, training/ ... never import from it (the old cycle
    cli <-> cli_run <-> swarm_launch went through quiet_libraries)."""
    offenders = {
        str(f.relative_to(SRC)): sorted(_cli_imports(f))
        for f in SRC.rglob("*.py")
        if f.relative_to(SRC).parts[0] not in ("cli", "__main__.py") and _cli_imports(f)
    }
    assert offenders == {}


def test_one_quiet_libraries_for_the_api_and_the_cli() -> None:
    import declora.api
    import declora.cli.runs
    import declora.cli.train
    from declora.quiet import quiet_libraries

    for module in (declora.api, declora.cli.runs, declora.cli.train):
        assert module.quiet_libraries is quiet_libraries, module.__name__
    for file in SRC.rglob("*.py"):
        assert "def quiet_libraries" not in file.read_text(encoding="utf-8") or file.name == "quiet.py", file


def test_quiet_libraries_restores_as_a_context_and_persists_as_a_call() -> None:
    import datasets
    import transformers

    from declora.quiet import quiet_libraries

    before = transformers.logging.get_verbosity(), datasets.is_progress_bar_enabled(), list(warnings.filters)
    with quiet_libraries():
        assert transformers.logging.get_verbosity() == transformers.logging.ERROR
        assert not datasets.is_progress_bar_enabled() and not transformers.logging.is_progress_bar_enabled()
        assert any(f[0] == "ignore" and f[2] is FutureWarning for f in warnings.filters)
    assert (transformers.logging.get_verbosity(), datasets.is_progress_bar_enabled(), warnings.filters) == before
    try:
        quiet_libraries()  # the CLI's use: silent for the rest of the process
        assert transformers.logging.get_verbosity() == transformers.logging.ERROR
    finally:
        transformers.logging.set_verbosity(before[0])
        if before[1]:
            datasets.enable_progress_bars()
            transformers.logging.enable_progress_bar()
        warnings.filters[:] = before[2]


def test_the_entry_point_is_declora_cli_main() -> None:
    text = (SRC.parents[1] / "pyproject.toml").read_text(encoding="utf-8")
    assert 'declora = "declora.cli:main"' in text
    from declora.cli.app import main as app_main

    assert main is app_main


@pytest.mark.parametrize("argv", [["--version"], ["train", "--help"], ["swarm", "--help"], ["topology", "--help"]])
def test_help_and_version_exit_0(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 0
    assert capsys.readouterr().out
