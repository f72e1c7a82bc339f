"""Config loading and the one-line errors that stop a run before training."""

from __future__ import annotations

from pathlib import Path

import pytest

from declora.cli.app import main
from declora.config import ConfigError, load_config


def test_defaults_are_the_papers_setup() -> None:
    cfg = load_config()
    assert (cfg.train.algorithm, cfg.train.clients, cfg.topology.kind, cfg.topology.mixing) == (
        "dec_lora",
        10,
        "ring",
        "laplacian",
    )
    assert (cfg.peft.r, cfg.train.local_steps, cfg.train.lr, cfg.train.batch_size) == (16, 5, 1e-3, 32)


def test_yaml_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  clients: 7\n  rounds: 3\ntopology:\n  kind: star\n")
    cfg = load_config(path, ["train.rounds=9"])
    assert (cfg.train.clients, cfg.train.rounds, cfg.topology.kind) == (7, 9, "star")


@pytest.mark.parametrize(
    "override,needle",
    [
        ("train.nope=1", "train.nope"),
        ("peft.r=0", "peft.r"),
        ("topology.kind=hypercube", "topology.kind"),
        ("topology.mixing=magic", "topology.mixing"),
        ("train.clients=0", "train.clients"),
        ("train.lr=-1", "train.lr"),
        ("train.clients=ten", "train.clients"),
        ("topology.p=0", "topology.p"),
        ("partition.kind=label_proportions", "partition.proportions"),
        ("model.device=tpu", "model.device"),
        ("train.algorithm=magic", "train.algorithm"),
    ],
)
def test_bad_values_name_the_option(override: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(overrides=[override])


def _cli_error(capsys: pytest.CaptureFixture[str], args: list[str]) -> str:
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, "errors are one line"
    return err


def test_unreadable_model_path(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    err = _cli_error(capsys, [f"model.name_or_path={tmp_path / 'missing'}"])
    assert "model.name_or_path" in err


def test_disconnected_graph(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    edges = tmp_path / "edges.txt"
    edges.write_text("0 1\n2 3\n")
    err = _cli_error(capsys, ["train.clients=4", "topology.kind=edge_list", f"topology.edges_file={edges}"])
    assert "topology.edges_file" in err


def test_erdos_renyi_that_cannot_connect(capsys: pytest.CaptureFixture[str]) -> None:
    err = _cli_error(capsys, ["topology.kind=erdos_renyi", "topology.p=0.01", "train.clients=20"])
    assert "topology.p" in err


def test_more_clients_than_examples(capsys: pytest.CaptureFixture[str], tiny_bert: Path, sst2_small: Path) -> None:
    err = _cli_error(
        capsys,
        [
            f"model.name_or_path={tiny_bert}",
            f"data.path={sst2_small}",
            "data.max_train_examples=5",
            "train.clients=10",
        ],
    )
    assert "train.clients" in err


def test_missing_label_column(capsys: pytest.CaptureFixture[str], tiny_bert: Path, sst2_small: Path) -> None:
    err = _cli_error(
        capsys, [f"model.name_or_path={tiny_bert}", f"data.path={sst2_small}", "data.label_column=sentiment"]
    )
    assert "data.label_column" in err


def test_missing_data_dir(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    err = _cli_error(capsys, [f"data.path={tmp_path / 'nowhere'}"])
    assert "data.path" in err


def test_missing_config_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    err = _cli_error(capsys, ["--config", str(tmp_path / "nope.yaml")])
    assert "--config" in err
