"""report_to trackers, read back with each tracker's own reader: the same per-round numbers as
metrics.jsonl, per-client accuracy, per-step training loss, config and the adapter artifact."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import declora
from declora.errors import ConfigError
from declora.rundir.layout import read_metrics
from declora.training.trackers import check_trackers, numbers

ROUND_KEYS = ("accuracy", "eval_loss", "consensus_error", "train_loss", "client_accuracy_mean", "bytes_sent")


def _check_round_series(series: dict[str, list[tuple[int, float]]], rows: list[dict[str, Any]], rel: float) -> None:
    """``series[name] = [(step, value)]`` holds metrics.jsonl's numbers, per-client accuracy and step losses."""
    for key in ROUND_KEYS:
        assert series[key] == [(r["round"], pytest.approx(float(r[key]), rel=rel)) for r in rows], key
    for r in rows:  # the per-client series average to the row's mean
        accs = [dict(series[f"client_accuracy/client_{i}"])[r["round"]] for i in range(4)]
        assert np.mean(accs) == pytest.approx(r["client_accuracy_mean"], rel=1e-6)
    steps = series["train/step_loss"]
    assert [s for s, _ in steps] == [1, 2, 3, 4]  # 2 rounds x 2 local steps
    for r in rows:  # every client takes K=2 steps: the round's train_loss is the mean of its 2 step losses
        assert np.mean([v for s, v in steps if (s - 1) // 2 + 1 == r["round"]]) == pytest.approx(
            r["train_loss"], rel=1e-5
        )


def test_tensorboard_and_mlflow_hold_the_metrics_jsonl_numbers(
    tiny_overrides: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    uri = f"file:{tmp_path / 'mlruns'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 refuses its file store otherwise
    result = declora.train(tiny_overrides, report_to=["tensorboard", "mlflow"])
    rows = read_metrics(result.run_dir)
    plain = declora.train(tiny_overrides, out_dir=str(tmp_path / "plain"))  # trackers change no number
    assert [{k: v for k, v in r.items() if k != "wall_s"} for r in rows] == [
        {k: v for k, v in r.items() if k != "wall_s"} for r in plain.history
    ]

    events = EventAccumulator(str(result.run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    tb = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    _check_round_series(tb, rows, rel=1e-6)  # float32 in event files
    assert tb["summary/final_accuracy"] == [(2, pytest.approx(result.final_accuracy))]
    assert "config/text_summary" in events.Tags()["tensors"]  # the resolved config as a text panel

    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs(experiment_ids=["0"])
    ml = {key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)] for key in run.data.metrics}
    _check_round_series(ml, rows, rel=1e-12)  # float64: exact
    assert run.data.params["train.clients"] == "4" and run.data.params["peft.r"] == "4"
    assert run.data.metrics["summary/final_accuracy"] == result.final_accuracy
    assert run.info.status == "FINISHED" and run.data.tags["declora.run_dir"] == str(result.run_dir)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"adapter", "summary.json", "config.yaml"} <= artifacts
    assert "adapter/adapter_model.safetensors" in {a.path for a in client.list_artifacts(run.info.run_id, "adapter")}


def test_wandb_offline_run_is_written(tiny_overrides: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    result = declora.train(tiny_overrides, report_to=["wandb"])
    (run_file,) = (result.run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    assert run_file.stat().st_size > 0
    history = _wandb_history(run_file)
    rows = read_metrics(result.run_dir)
    by_round = {h["round"]: h for h in history if "round" in h}
    for r in rows:
        for key in ROUND_KEYS:
            assert by_round[r["round"]][key] == pytest.approx(float(r[key]), rel=1e-12), key
    assert sorted(h["train/global_step"] for h in history if "train/step_loss" in h) == [1, 2, 3, 4]


def _wandb_history(path: Path) -> list[dict[str, Any]]:
    """The ``run.log`` rows of an offline ``.wandb`` file: wandb's LevelDB-log framing (32 KiB blocks of
    7-byte-headed chunks after a 7-byte ``:W&B`` file header) around its own protobuf ``Record``s."""
    import json
    import struct

    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, chunks, rows = 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7]) if left >= 7 else (0, 0, 0)
        if length == 0 and kind == 0:  # block padding
            pos += left
            continue
        chunks += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk: one whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            chunks = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return rows


def test_a_missing_tracker_package_stops_before_training(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"report_to=wandb needs the wandb package: pip install 'declora\[wandb\]'"):
        check_trackers(["tensorboard", "wandb"])
    check_trackers(["none"])
    with pytest.raises(ConfigError, match="report_to"):
        declora.load_config({"report_to": ["comet"]})


def test_numbers_keeps_finite_numbers_only() -> None:
    row = {"a": 1, "b": 0.5, "c": None, "d": True, "e": "x", "f": float("nan"), "g": [1]}
    assert numbers(row, "p/") == {"p/a": 1.0, "p/b": 0.5}
