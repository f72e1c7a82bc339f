"""End-to-end mechanics on the tiny model: run-dir contract, determinism, algorithm identities."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from declora.config import load_config
from declora.rundir.layout import read_metrics
from declora.training.trainer import run

METRIC_KEYS = {
    "round",
    "train_loss",
    "accuracy",
    "client_accuracy_mean",
    "client_accuracy_min",
    "client_accuracy_max",
    "consensus_error",
    "bytes_sent",
    "wall_s",
}
SUMMARY_KEYS = {
    "algorithm",
    "clients",
    "rounds",
    "local_steps",
    "best_accuracy",
    "final_accuracy",
    "total_bytes_sent",
    "wall_s",
    "samples_per_s",
    "peak_rss_mb",
    "spectral_gap",
}


def _run(overrides: list[str], *extra: str) -> dict:
    return run(load_config(overrides=[*overrides, *extra]))


def _adapter(run_dir: str, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(Path(run_dir) / "adapters" / name / "adapter_model.safetensors"))


def test_run_directory_contract(tiny_overrides: list[str]) -> None:
    summary = _run(tiny_overrides, "plots=true")
    out = Path(summary["run_dir"])
    for name in (
        "config.yaml",
        "environment.json",
        "metrics.jsonl",
        "summary.json",
        "plots/accuracy.png",
        "plots/consensus.png",
        "plots/partition.png",
    ):
        assert (out / name).is_file(), name
    rows = read_metrics(out)
    assert [r["round"] for r in rows] == [1, 2]
    assert all(METRIC_KEYS <= r.keys() for r in rows)
    assert SUMMARY_KEYS <= json.loads((out / "summary.json").read_text()).keys()
    # ring of 4: every client sends its whole message to 2 neighbours each round
    assert rows[0]["bytes_sent"] == 4 * 2 * summary["message_bytes"]
    assert summary["total_bytes_sent"] == 2 * rows[0]["bytes_sent"]
    assert sorted(p.name for p in (out / "adapters").iterdir()) == ["average"] + [f"client_{i}" for i in range(4)]
    assert np.asarray(summary["partition_counts"]).sum() == 600
    assert load_config(out / "config.yaml").train.clients == 4  # config.yaml reloads as a config


def test_same_config_and_seed_give_the_same_metrics(tiny_overrides: list[str], tmp_path: Path) -> None:
    a = read_metrics(_run(tiny_overrides, f"out_dir={tmp_path / 'a'}")["run_dir"])
    b = read_metrics(_run(tiny_overrides, f"out_dir={tmp_path / 'b'}")["run_dir"])
    c = read_metrics(_run(tiny_overrides, f"out_dir={tmp_path / 'c'}", "train.seed=1")["run_dir"])
    drop = lambda rows: [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]  # noqa: E731
    assert drop(a) == drop(b)
    assert drop(a) != drop(c)


def test_complete_graph_with_uniform_weights_averages_the_local_models(
    tiny_overrides: list[str], tmp_path: Path
) -> None:
    one_round = [*tiny_overrides, "train.rounds=1"]
    local = _run(one_round, "train.algorithm=local", f"out_dir={tmp_path / 'local'}")
    dec = _run(one_round, "topology.kind=complete", "topology.mixing=max_degree", f"out_dir={tmp_path / 'dec'}")
    mean_of_local = _adapter(local["run_dir"], "average")
    for i in range(4):
        client = _adapter(dec["run_dir"], f"client_{i}")
        for name, tensor in mean_of_local.items():
            torch.testing.assert_close(client[name], tensor, rtol=0, atol=1e-6)
    assert dec["final_consensus_error"] < 1e-10
    assert dec["final_accuracy"] == local["final_accuracy"]


def test_one_client_dec_lora_equals_centralized(tiny_overrides: list[str], tmp_path: Path) -> None:
    dec = _run(tiny_overrides, "train.clients=1", f"out_dir={tmp_path / 'dec'}")
    cen = _run(tiny_overrides, "train.clients=1", "train.algorithm=centralized", f"out_dir={tmp_path / 'cen'}")
    drop = lambda rows: [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]  # noqa: E731
    assert drop(read_metrics(dec["run_dir"])) == drop(read_metrics(cen["run_dir"]))


def test_centralized_processes_the_same_samples(tiny_overrides: list[str], tmp_path: Path) -> None:
    dec = _run(tiny_overrides, f"out_dir={tmp_path / 'dec'}")
    cen = _run(tiny_overrides, "train.algorithm=centralized", f"out_dir={tmp_path / 'cen'}")
    assert dec["samples"] == cen["samples"] == 2 * 2 * 8 * 4
    assert cen["total_bytes_sent"] == 0 and cen["spectral_gap"] is None


def _reload_predictions(tiny_bert: Path, adapter: Path, data) -> np.ndarray:  # noqa: ANN001
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from declora.data.loading import collate
    from declora.evaluation.evaluate import length_sorted

    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    batch = collate(data.eval, length_sorted(data), data.pad_token_id, torch.device("cpu"))
    batch.pop("labels")
    with torch.no_grad():
        return model(**batch).logits.argmax(-1).numpy()


def test_saved_client_adapter_reloads_to_the_same_predictions(
    tiny_overrides: list[str], tiny_bert: Path, tmp_path: Path
) -> None:
    from declora.evaluation.evaluate import evaluate, length_sorted
    from declora.training.finish import save_adapter
    from declora.training.setup import make_clients, setup

    s = setup(load_config(overrides=tiny_overrides))
    client = make_clients(s, [2])[2]
    client.local_steps(s.model, s.data, 3, 1, s.device)  # move it away from the shared init
    ours = evaluate(s.model, client.state(), s.data, length_sorted(s.data), s.device, 64)
    save_adapter(s.model, client.state(), tmp_path / "client_2")
    np.testing.assert_array_equal(_reload_predictions(tiny_bert, tmp_path / "client_2", s.data), ours.predictions)


def test_saved_average_adapter_reproduces_the_reported_accuracy(tiny_overrides: list[str], tiny_bert: Path) -> None:
    from declora.evaluation.evaluate import length_sorted
    from declora.training.setup import setup

    summary = _run(tiny_overrides)
    s = setup(load_config(Path(summary["run_dir"]) / "config.yaml"))
    pred = _reload_predictions(tiny_bert, Path(summary["run_dir"]) / "adapters" / "average", s.data)
    accuracy = float((pred == s.data.eval.labels[length_sorted(s.data)]).mean())
    assert accuracy == pytest.approx(summary["final_accuracy"], abs=1e-12)


def test_nan_loss_names_round_and_client(tiny_overrides: list[str]) -> None:
    from declora.client.client import TrainingError

    with pytest.raises(TrainingError, match=r"round 1, client \d"):
        _run(tiny_overrides, "train.optimizer=sgd", "train.lr=1e30")
