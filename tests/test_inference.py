"""``declora eval / predict / export``: eval reproduces the run's numbers, a merged export predicts as the
adapter does with plain transformers, predictions carry the run's label names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import SHARED_DATA, TEXTS, _head

from declora.cli.app import main
from declora.config import ConfigError
from declora.inference import evaluate_run, export, load_run, predict
from declora.rundir.layout import read_metrics

NAMES = ["World", "Sports", "Business", "Sci/Tech"]

pytestmark = pytest.mark.usefixtures("one_thread")


def test_eval_reproduces_the_reported_accuracy_and_loss(ag_run: dict, capsys: pytest.CaptureFixture[str]) -> None:
    rows = {r["round"]: r for r in read_metrics(ag_run["run_dir"])}
    final = rows[ag_run["rounds"]]
    res = evaluate_run(ag_run["run_dir"])  # the run's held-out split, as the run evaluated it
    assert (res["accuracy"], res["loss"], res["examples"]) == (final["accuracy"], final["eval_loss"], 80)
    best = evaluate_run(ag_run["run_dir"], "best", split="validation")
    assert best["split"] == "dev" and best["examples"] == 40
    assert (best["accuracy"], best["loss"]) == (
        rows[ag_run["best_round"]]["val_accuracy"],
        rows[ag_run["best_round"]]["val_loss"],
    )
    assert evaluate_run(ag_run["run_dir"], "best")["accuracy"] == ag_run["best_accuracy"]
    assert main(["eval", ag_run["run_dir"], "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == final["accuracy"]


def test_eval_on_another_data_folder_and_a_missing_adapter(ag_run: dict, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    _head(SHARED_DATA / "agnews" / "test.tsv", other / "holdout.tsv", 30)
    res = evaluate_run(ag_run["run_dir"], "client_1", split="holdout", data_path=str(other), max_examples=20)
    assert res["examples"] == 20 and 0.0 <= res["accuracy"] <= 1.0 and res["source"] == str(other)
    with pytest.raises(ConfigError, match=r"no adapters/client_9 .*have: average, best, client_0, client_1"):
        evaluate_run(ag_run["run_dir"], "client_9")


def test_merged_export_loads_with_plain_transformers_and_predicts_as_the_adapter(ag_run: dict, tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    ours = predict(load_run(ag_run["run_dir"], "best"), TEXTS)
    out = export(ag_run["run_dir"], tmp_path / "merged", "best", merge=True)
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert model.config.id2label == dict(enumerate(NAMES)) and model.config.label2id["Sci/Tech"] == 3
    assert not any("lora" in n for n, _ in model.named_parameters())
    tokenizer = AutoTokenizer.from_pretrained(out)
    with torch.no_grad():
        probs = torch.softmax(model(**tokenizer(TEXTS, return_tensors="pt", padding=True)).logits, -1)
    expected = torch.tensor([[p["probabilities"][n] for n in NAMES] for p in ours])
    torch.testing.assert_close(probs, expected, atol=1e-5, rtol=1e-4)
    assert [model.config.id2label[int(i)] for i in probs.argmax(-1)] == [p["label"] for p in ours]
    with pytest.raises(ConfigError, match="not empty"):
        export(ag_run["run_dir"], out)


def test_adapter_export_and_predict_cli(ag_run: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", ag_run["run_dir"], str(tmp_path / "a")]) == 0
    for name in ("adapter_config.json", "adapter_model.safetensors", "declora.json", "README.md", "tokenizer.json"):
        assert (tmp_path / "a" / name).is_file(), name
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS[:2]) + "\n\n")
    capsys.readouterr()
    assert main(["predict", ag_run["run_dir"], "--text", TEXTS[2], "--file", str(texts)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[2] for line in lines] == [TEXTS[2], *TEXTS[:2]]
    assert all(line.split("\t")[0] in NAMES and 0 < float(line.split("\t")[1]) <= 1 for line in lines)
    assert main(["predict", ag_run["run_dir"]]) == 2  # neither --text nor --file
