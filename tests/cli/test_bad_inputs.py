"""The last bad inputs (issue 24): each is one ``declora: error:`` line naming the option or file, the
right exit code, no traceback and no model loaded, in bounded time, run through ``declora.cli.main``.

The walk of every numeric option lives with the config tests; this matrix holds the cases a new user
hit beyond it: unwritable outputs, edge lists, empty clients, validation splits, type errors, multiaddrs,
availability files, ``declora predict`` texts and ``declora swarm`` flags. The last test is the run that
explodes but stays finite: the default divergence guard stops it.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from declora.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest

SECONDS = 6.0  # the bound for an error found before the model (here: warm imports, tiny data)


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading a model fails the test, wherever ``build_model``/``load_base`` were imported by name."""
    import declora.inference  # noqa: F401 - imports build_model inside functions, from model.loading
    import declora.model.loading as loading
    import declora.training.setup  # noqa: F401 - imports build_model by name

    originals = {loading.build_model, loading.load_base}

    def boom(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the model was loaded before the error")

    for module in [m for name, m in sys.modules.items() if name.startswith("declora")]:
        for attr in ("build_model", "load_base"):
            if getattr(module, attr, None) in originals:
                monkeypatch.setattr(module, attr, boom)


def _one_line(capsys: pytest.CaptureFixture[str], argv: list[str], code: int) -> tuple[str, float]:
    """Run ``declora ARGV``; it must exit ``code`` with exactly one error line and no traceback."""
    t0 = time.perf_counter()
    got = main(argv)
    elapsed = time.perf_counter() - t0
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("declora: error:")]
    assert got == code and len(lines) == 1, (argv, got, err)
    return lines[0], elapsed


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _edge_files(tmp: Path) -> dict[str, tuple[Path, str]]:
    """Bad edge lists for 3 clients: (file, what the line must say); each is bad on its line 2."""
    return {
        "self-loop": (_write(tmp / "self.txt", "0 1\n1 1\n1 2\n2 0\n"), "self-loop"),
        "junk": (_write(tmp / "junk.txt", "0 1\nhello\n1 2\n"), "'hello'"),
        "duplicate": (_write(tmp / "dup.txt", "0 1\n1 0\n1 2\n"), "repeats line 1"),
        "out of range": (_write(tmp / "range.txt", "0 1\n1 7\n1 2\n"), "node 7 is out of range"),
    }


# (name, argv after `declora`, exit code, what the line must contain); {tmp}, {data}, {model} are filled in.
PATHS = [
    ("out_dir in /proc", ["train", "out_dir=/proc/declora_run"], 2, ["out_dir=/proc/declora_run"]),
    ("out_dir under /proc", ["train", "out_dir=/proc/declora_x/run"], 2, ["out_dir=/proc/declora_x/run"]),
    ("out_dir under a file", ["train", "out_dir={tmp}/a_file/run"], 2, ["out_dir=", "is a file, not a folder"]),
    ("export target", ["export", "{tmp}/no_run", "/proc/x", "--merge"], 2, ["export OUT /proc/x", "not writable"]),
    ("swarm --out", ["swarm", "--clients", "2", "--out", "/proc/x"], 2, ["--out /proc/x"]),
    ("swarm out_dir", ["swarm", "--clients", "2", "out_dir=/proc/x"], 2, ["out_dir=/proc/x"]),
    ("swarm out disagree", ["swarm", "--clients", "2", "--out", "{tmp}/a", "out_dir={tmp}/b"], 2, ["disagree"]),
    ("swarm --clients 0", ["swarm", "--clients", "0"], 2, ["--clients=0"]),
    ("predict empty text", ["predict", "{tmp}/no_run", "--text", ""], 2, ["--text", "empty"]),
    ("predict blank text", ["predict", "{tmp}/no_run", "--text", "ok", "--text", "  "], 2, ["--text number 2"]),
    ("predict no file", ["predict", "{tmp}/no_run", "--file", "/nonexistent"], 2, ["--file /nonexistent"]),
    ("predict empty file", ["predict", "{tmp}/no_run", "--file", "{tmp}/blank.txt"], 2, ["blank.txt", "no text"]),
    # flags of the tools name themselves, never the dotted option behind them; counts below 1 stop first
    ("eval --batch-size 0", ["eval", "{tmp}/no_run", "--batch-size", "0"], 2, ["--batch-size=0"]),
    ("eval --max-examples", ["eval", "{tmp}/no_run", "--max-examples", "-5"], 2, ["--max-examples=-5"]),
    ("generate no tokens", ["generate", "{tmp}/no_run", "--prompt", "hi", "--max-new-tokens", "0"], 2, ["--max-new"]),
    ("topology --clients", ["topology", "ring", "--clients", "0"], 2, ["--clients=0"]),
    ("topology KIND", ["topology", "rong", "--clients", "4"], 2, ["KIND 'rong' is not one of ring"]),
    ("topology --p", ["topology", "erdos_renyi", "--clients", "4", "--p", "1.5"], 2, ["--p=1.5"]),
    ("topology --precision", ["topology", "ring", "--clients", "4", "--precision", "-1"], 2, ["--precision=-1"]),
    ("identity in /proc", ["peer", "--print-id", "swarm.identity_path=/proc/x/key"], 2, ["swarm.identity_path=/proc"]),
    ("identity folder", ["peer", "--print-id", "swarm.identity_path={tmp}"], 2, ["is a folder", "identity.key"]),
    ("identity no key", ["peer", "--print-id", "swarm.identity_path={tmp}/blank.txt"], 2, ["not a libp2p identity"]),
    ("peer identity", ["peer", "swarm.identity_path={tmp}/blank.txt", "out_dir={tmp}/p"], 2, ["blank.txt is not a"]),
    ("config a list", ["train", "--config", "{tmp}/list.yaml"], 2, ["--config", "list.yaml: holds a list"]),
    ("config not yaml", ["train", "--config", "{tmp}/bad.yaml"], 2, ["--config", "not valid YAML at line 2"]),
    ("topology --plot", ["topology", "ring", "--clients", "4", "--plot", "/proc/x.png"], 2, ["--plot /proc/x.png"]),
    ("partition --plot", ["partition", "iid", "--clients", "2", "--plot", "/proc/x.png"], 2, ["--plot /proc/x.png"]),
    ("compare --csv", ["compare", "{tmp}/no_run", "--csv", "/proc/x.csv"], 2, ["--csv /proc/x.csv"]),
    ("compare --plot", ["compare", "{tmp}/no_run", "--plot", "{tmp}"], 2, ["--plot", "is a folder, not a file"]),
    ("swarm --late twice", ["swarm", "--clients", "3", "--late", "1@2", "--late", "1@3"], 2, ["already late"]),
    ("reproduce --jobs 0", ["reproduce", "privacy", "--jobs", "0", "--out", "{tmp}/r"], 2, ["--jobs 0"]),
    ("reproduce --scale", ["reproduce", "privacy", "--scale", "gpu", "--dry-run"], 2, ["--scale gpu", "cpu, paper"]),
]

CONFIG = [
    ("list for a string", ["peft.target_modules=query"], ["peft.target_modules must be a list", "[query, value]"]),
    ("word for a number", ["train.clients=abc"], ["train.clients must be a whole number"]),
    ("word for a float", ["train.lr=fast"], ["train.lr must be a number"]),
    ("word for a bool", ["progress=maybe"], ["progress must be true or false"]),
    ("availability yaml", ["train.availability_file={tmp}/bad.yaml"], ["bad.yaml", "line 2", "not valid YAML"]),
    ("availability csv", ["train.availability_file={tmp}/bad.csv"], ["bad.csv", "line 3"]),
    ("availability peer", ["train.availability_file={tmp}/peer.csv"], ["peer.csv", "line 2", "peer 99"]),
]

DATA = [  # need the data split (tokenizer + tiny SST-2), never the model
    (
        "empty client",
        ["partition.kind=dirichlet", "partition.alpha=0.01", "partition.min_partition_size=0", "train.clients=10"],
        ["client", "no training examples", "partition.min_partition_size"],
    ),
    ("validation split", ["data.validation_split=bogus"], ["data.validation_split=bogus", "none or auto"]),
]


def _fill(argv: list[str], **values: Any) -> list[str]:
    return [a.format(**values) for a in argv]


@pytest.fixture
def bad_files(tmp_path: Path) -> Path:
    _write(tmp_path / "a_file", "")
    _write(tmp_path / "blank.txt", "\n  \n")
    _write(tmp_path / "bad.yaml", "- {rounds: 1, offline: [0\n")
    _write(tmp_path / "bad.csv", "rounds,offline\n1,0\n2\n")
    _write(tmp_path / "peer.csv", "rounds,offline\n1,99\n")
    _write(tmp_path / "list.yaml", "- train.rounds=3\n")
    return tmp_path


@pytest.mark.parametrize(("name", "argv", "code", "says"), PATHS, ids=[c[0] for c in PATHS])
def test_paths_and_flags(
    name: str, argv: list[str], code: int, says: list[str], bad_files: Path, no_model: None, capsys: Any
) -> None:
    line, elapsed = _one_line(capsys, _fill(argv, tmp=bad_files), code)
    for word in says:
        assert word.format(tmp=bad_files) in line, (name, line)
    assert elapsed < SECONDS, (name, elapsed)
    assert not Path("/proc/declora_run").exists()


@pytest.mark.parametrize(("name", "overrides", "says"), CONFIG, ids=[c[0] for c in CONFIG])
def test_config_values_in_our_words(
    name: str, overrides: list[str], says: list[str], bad_files: Path, no_model: None, capsys: Any
) -> None:
    line, elapsed = _one_line(capsys, ["train", *_fill(overrides, tmp=bad_files)], 2)
    for word in says:
        assert word in line, (name, line)
    assert "AnyNode" not in line and "ListConfig" not in line
    assert elapsed < SECONDS, (name, elapsed)


@pytest.mark.parametrize("case", ["self-loop", "junk", "duplicate", "out of range"])
def test_edge_lists_are_strict(case: str, tmp_path: Path, no_model: None, capsys: Any) -> None:
    path, says = _edge_files(tmp_path)[case]
    argv = ["train", "train.clients=3", "topology.kind=edge_list", f"topology.edges_file={path}"]
    argv.append(f"out_dir={tmp_path}/r")
    line, elapsed = _one_line(capsys, argv, 2)
    assert str(path) in line and "line 2" in line and says in line, line
    assert elapsed < SECONDS
    line, _ = _one_line(capsys, ["topology", "edge_list", "--clients", "3", "--edges-file", str(path)], 2)
    assert "line 2" in line and says in line, line  # the same check behind `declora topology`


@pytest.mark.parametrize(("name", "overrides", "says"), DATA, ids=[c[0] for c in DATA])
def test_data_checks_before_the_model(
    name: str, overrides: list[str], says: list[str], tiny_overrides: list[str], no_model: None, capsys: Any
) -> None:
    line, elapsed = _one_line(capsys, ["train", *tiny_overrides, *overrides], 2)
    for word in says:
        assert word in line, (name, line)
    assert elapsed < SECONDS, (name, elapsed)


@pytest.mark.skipif(importlib.util.find_spec("hivemind") is None, reason="needs the swarm extra (hivemind)")
@pytest.mark.parametrize(
    ("option", "address"),
    [("swarm.initial_peers", "not-a-multiaddr"), ("swarm.announce_maddrs", "/ip4/1.2.3/tcp/1")],
)
def test_multiaddrs_are_parsed_up_front(
    option: str, address: str, tmp_path: Path, no_model: None, capsys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import declora.comm

    def no_daemon(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a communicator was built before the error")

    monkeypatch.setattr(declora.comm, "build_communicator", no_daemon)
    argv = ["train", "runtime=swarm", f"{option}=[{address}]", f"out_dir={tmp_path}/r"]
    line, elapsed = _one_line(capsys, argv, 2)
    assert option in line and repr(address) in line and "e.g. /ip4/" in line, line
    assert elapsed < SECONDS


def test_the_fast_answers_need_no_heavy_import(tmp_path: Path) -> None:
    """``declora swarm --clients 0``, an empty ``--text`` and a type error answer before torch is imported."""
    code = (
        "import json, sys, time\n"
        "from declora.cli import main\n"
        "t = time.perf_counter()\n"
        "codes = [main(['swarm', '--clients', '0']), main(['predict', 'RUN', '--text', '']),\n"
        "         main(['train', 'peft.target_modules=query'])]\n"
        "heavy = [m for m in ('torch', 'transformers', 'datasets', 'hivemind', 'peft') if m in sys.modules]\n"
        "print(json.dumps({'codes': codes, 'heavy': heavy, 'seconds': time.perf_counter() - t}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    result = json.loads(done.stdout)
    assert result["codes"] == [2, 2, 2] and result["heavy"] == [], result
    assert result["seconds"] < 2.0, result
    errors = done.stderr.strip().splitlines()
    assert len(errors) == 3 and all(e.startswith("declora: error:") for e in errors), done.stderr


def test_swarm_takes_out_dir_as_its_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import declora.launch.swarm

    seen: dict[str, Any] = {}

    def launch(clients: int, overrides: list[str], config: Any, out: Any, late: Any) -> int:
        seen.update(clients=clients, overrides=overrides, out=out)
        return 0

    monkeypatch.setattr(declora.launch.swarm, "launch_swarm", launch)
    assert main(["swarm", "--clients", "2", f"out_dir={tmp_path / 's'}", "train.rounds=1"]) == 0
    assert seen == {"clients": 2, "overrides": ["train.rounds=1"], "out": str(tmp_path / "s")}
    assert main(["swarm", "--clients", "2", "--out", str(tmp_path / "s"), f"out_dir={tmp_path / 's'}"]) == 0
    assert seen["out"] == str(tmp_path / "s")  # the same folder twice is no contradiction
    assert not any(tmp_path.iterdir())  # the check writes nothing


def test_writability_is_tested_not_assumed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``os.access`` may say yes where nothing can be written (root on /proc): the probe writes a file."""
    import os

    from declora.errors import ConfigError
    from declora.rundir.protect import check_writable

    check_writable(tmp_path / "new" / "deeper")
    assert list(tmp_path.iterdir()) == []  # nothing created, nothing left behind
    monkeypatch.setattr(os, "access", lambda *a, **k: True)
    real_mkstemp: Callable[..., Any] = __import__("tempfile").mkstemp

    def refuse(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("dir") == tmp_path:
            raise PermissionError(13, "Permission denied")
        return real_mkstemp(*args, **kwargs)

    monkeypatch.setattr("tempfile.mkstemp", refuse)
    with pytest.raises(ConfigError, match=r"out_dir=.*run: .* is not writable \(.*Permission denied\)"):
        check_writable(tmp_path / "run")
    with pytest.raises(ConfigError, match=r"--page .*page.md"):
        check_writable(tmp_path / "page.md", "--page", folder=False)


def test_a_run_that_explodes_but_stays_finite_stops_by_default(
    tiny_overrides: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``train.lr=1e4`` used to run to the end with exit 0; the default guard stops it (AdamW and SGD)."""
    for optimizer in ("adamw", "sgd"):
        out = tmp_path / optimizer
        argv = ["train", *tiny_overrides, "train.lr=1e4", f"train.optimizer={optimizer}", "train.rounds=3"]
        line, _ = _one_line(capsys, [*argv, "train.local_steps=5", f"out_dir={out}"], 1)
        assert "training diverged at round" in line and ", client " in line, line
        assert "stage 'divergence guard'" in line or "not finite" in line or "loss is" in line, line
        for name in ("DONE", "adapters", "summary.json"):
            assert not (out / name).exists(), (optimizer, name)
