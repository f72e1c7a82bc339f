"""The Python API: cheap import, train() = the CLI for every config form, in-memory data and model
objects = files and paths, RunResult's adapters, callbacks, and the README's example runs as printed."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import declora
from declora.cli.app import main
from declora.config import Config, TrainConfig, load_config
from declora.errors import ConfigError
from declora.rundir.layout import read_metrics

REPO = Path(__file__).resolve().parents[1]


def _numbers(run_dir: Path | str) -> list[dict[str, Any]]:
    """metrics.jsonl without the wall-clock column."""
    return [{k: v for k, v in row.items() if k != "wall_s"} for row in read_metrics(run_dir)]


def _base(tiny_bert: Path, sst2_small: Path) -> dict[str, Any]:
    """The run every test compares against, as a nested dict (out_dir added per run)."""
    return {
        "model": {"name_or_path": str(tiny_bert)},
        "data": {"path": str(sst2_small), "max_train_examples": 400},
        "train": {"clients": 4, "rounds": 2, "local_steps": 2, "batch_size": 8},
        "peft": {"r": 4},
        "progress": False,
        "plots": False,
    }


def _dotlist(tree: dict[str, Any], prefix: str = "") -> list[str]:
    out: list[str] = []
    for key, value in tree.items():
        out += _dotlist(value, f"{prefix}{key}.") if isinstance(value, dict) else [f"{prefix}{key}={value}"]
    return out


@pytest.fixture(scope="module")
def reference(tiny_bert: Path, sst2_small: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The base config run through the command line."""
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", *_dotlist(_base(tiny_bert, sst2_small)), f"out_dir={out}"]) == 0
    return out


def _read_tsv(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:  # as data.py reads SST-2: tab-separated, quotes are text
        return [
            {"sentence": r["sentence"], "label": int(r["label"])}
            for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        ]


def test_import_declora_is_cheap() -> None:
    code = (
        "import sys, declora\n"
        "declora.Config, declora.load_config, declora.ConfigError, declora.train, declora.Callback\n"
        "heavy = ('torch', 'transformers', 'peft', 'datasets', 'mlflow', 'wandb', 'tensorboard')\n"
        "print([m for m in heavy if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
    assert "train" in dir(declora) and "Topology" in declora.__all__
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        declora.nope  # noqa: B018


def test_load_config_accepts_nested_dotted_and_mixed_dicts() -> None:
    nested = load_config({"train": {"clients": 4, "rounds": 2}, "peft": {"r": 4}})
    dotted = load_config({"train.clients": 4, "train.rounds": 2, "peft.r": 4})
    mixed = load_config({"train": {"clients": 4}, "train.rounds": 2}, {"peft.r": 4})
    assert nested == dotted == mixed == load_config(overrides=["train.clients=4", "train.rounds=2", "peft.r=4"])
    assert load_config({"train": TrainConfig(clients=3)}).train.clients == 3
    assert load_config(Config(), ["train.clients=5"]).train.clients == 5
    with pytest.raises(ConfigError, match="unknown option 'train.nope'"):
        load_config({"train.nope": 1})
    with pytest.raises(ConfigError, match="train.lr_scheduler"):
        declora.resolve_config({"train": {"lr_scheduler": "nope"}})
    # train()'s forms: positional config, sections as keywords, dotted keywords; later wins
    cfg = declora.resolve_config(["train.clients=4"], train={"rounds": 2}, **{"train.clients": 6, "peft.r": 2})
    assert (cfg.train.clients, cfg.train.rounds, cfg.peft.r) == (6, 2, 2)
    # config= by keyword is the config (no option has that name), as a user of the documented name writes it
    assert declora.resolve_config(config={"train.clients": 3}, out_dir="x").train.clients == 3
    with pytest.raises(ConfigError, match="config is given twice"):
        declora.train({"train.clients": 2}, config={"train.clients": 3})


def test_train_with_a_list_a_dict_and_a_yaml_file_equals_the_cli(
    reference: Path, tiny_bert: Path, sst2_small: Path, tmp_path: Path
) -> None:
    base = _base(tiny_bert, sst2_small)
    from_list = declora.train(_dotlist(base), out_dir=str(tmp_path / "list"))
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump({k: v for k, v in base.items() if k != "train"}))
    from_yaml = declora.train(str(tmp_path / "cfg.yaml"), train=base["train"], out_dir=str(tmp_path / "yaml"))
    assert _numbers(from_list.run_dir) == _numbers(reference)
    assert _numbers(from_yaml.run_dir) == _numbers(reference)
    assert from_list.history == read_metrics(from_list.run_dir) and len(from_list.history) == 2
    assert from_list.summary == json.loads((from_list.run_dir / "summary.json").read_text())
    assert from_list.final_accuracy == from_list.history[-1]["accuracy"] and not from_list.stopped_early


def test_in_memory_datasets_equal_the_same_rows_in_tsv_files(
    reference: Path, tiny_bert: Path, sst2_small: Path, tmp_path: Path
) -> None:
    from datasets import Dataset, DatasetDict

    train, test = _read_tsv(sst2_small / "train.tsv"), _read_tsv(sst2_small / "test.tsv")
    base = _base(tiny_bert, sst2_small)
    base["data"].pop("path")
    splits = DatasetDict({"train": Dataset.from_list(train), "test": Dataset.from_list(test)})
    result = declora.train(base, data=splits, out_dir=str(tmp_path / "mem"))
    assert _numbers(result.run_dir) == _numbers(reference)
    assert result.summary["data_source"] == "in-memory datasets.Dataset"
    with pytest.raises(ConfigError, match="eval_data"):
        declora.train(base, data=splits["train"])
    with pytest.raises(ConfigError, match="data.path"):
        declora.train(_base(tiny_bert, sst2_small), data=splits)
    with pytest.raises(ConfigError, match="data.train_split"):
        declora.train(base, data={"training": splits["train"]})


def test_model_and_tokenizer_objects_equal_the_path(
    reference: Path, tiny_bert: Path, sst2_small: Path, tmp_path: Path
) -> None:
    import pandas as pd
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    base = _base(tiny_bert, sst2_small)
    base["data"].pop("path")
    base["model"].pop("name_or_path")
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    train = pd.DataFrame(_read_tsv(sst2_small / "train.tsv"))  # one split + eval_data; a DataFrame is converted
    result = declora.train(
        base,
        data=train,
        eval_data=_read_tsv(sst2_small / "test.tsv"),
        model=model,
        tokenizer=tokenizer,
        out_dir=str(tmp_path / "obj"),
    )
    assert _numbers(result.run_dir) == _numbers(reference)
    assert result.config.model.name_or_path == str(tiny_bert)  # recorded from model.name_or_path


def test_causal_lm_with_in_memory_data_and_model_equals_files(
    tiny_llama: Path, sst2_small: Path, tmp_path: Path
) -> None:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = {
        "model": {"task_type": "causal_lm"},
        "data": {"max_train_examples": 200, "max_eval_examples": 30},
        "train": {"clients": 2, "rounds": 2, "local_steps": 2, "batch_size": 4, "lr": 0.01},
        "peft": {"r": 4},
        "eval": {"client_max_examples": 10},
        "progress": False,
        "plots": False,
    }
    files = declora.train(
        base, **{"model.name_or_path": str(tiny_llama), "data.path": str(sst2_small)}, out_dir=str(tmp_path)
    )
    memory = declora.train(
        base,
        data=Dataset.from_list(_read_tsv(sst2_small / "train.tsv")),
        eval_data=Dataset.from_list(_read_tsv(sst2_small / "test.tsv")),
        model=AutoModelForCausalLM.from_pretrained(tiny_llama),
        tokenizer=AutoTokenizer.from_pretrained(tiny_llama),
        out_dir=str(tmp_path / "memory"),
    )
    assert _numbers(memory.run_dir) == _numbers(files.run_dir) and len(memory.history) == 2


def test_run_result_adapters_are_the_run_s_and_reload_to_its_accuracy(reference: Path) -> None:
    from declora.data.loading import load_task
    from declora.evaluation.evaluate import evaluate, length_sorted
    from declora.model.loading import load_tokenizer

    cfg = load_config(reference / "config.yaml")
    result = declora.RunResult(
        json.loads((reference / "summary.json").read_text()), read_metrics(reference), reference, cfg
    )
    average, clients = result.average_state(), [result.client_state(i) for i in range(4)]
    assert any("lora_A" in k for k in average) and any("classifier" in k for k in average)
    for name, tensor in average.items():  # dec_lora: the averaged adapter is the clients' mean
        torch.testing.assert_close(tensor, torch.stack([c[name] for c in clients]).mean(0), rtol=0, atol=1e-6)
    assert not torch.equal(
        clients[0][next(k for k in average if "lora_B" in k)], clients[1][next(k for k in average if "lora_B" in k)]
    )

    model = result.load_model()  # a PeftModel on the base loaded from model.name_or_path
    assert type(model).__name__.startswith("Peft")
    data = load_task(cfg.data, load_tokenizer(cfg.model), cfg.model.max_length, seed=cfg.train.seed)
    again = evaluate(model, {}, data, length_sorted(data), torch.device("cpu"), cfg.eval.batch_size)
    assert again.accuracy == result.summary["final_accuracy"]
    with pytest.raises(ConfigError, match="no such adapter"):
        result.client_state(9)


def test_callbacks_see_every_round_and_can_stop_the_run(tiny_overrides: list[str]) -> None:
    seen: list[tuple[Any, ...]] = []

    class Recorder(declora.Callback):
        def on_train_begin(self, cfg: Config, run_dir: Path) -> None:
            seen.append(("begin", cfg.train.rounds, run_dir.name))

        def on_round_end(self, round_, metrics, states, client_metrics):  # noqa: ANN001, ANN201
            seen.append(("round", round_, metrics["accuracy"], sorted(states), sorted(client_metrics)))
            assert len(client_metrics[0]["step_losses"]) == 2 and "client_accuracy" in client_metrics[0]
            return round_ == 2  # stop after round 2 of 3

        def on_train_end(self, result: declora.RunResult) -> None:
            seen.append(("end", result.summary["rounds"], result.stopped_early))

    plain: list[int] = []  # a function with the 3-argument signature is an on_round_end
    result = declora.train(
        [*tiny_overrides, "train.rounds=3"], callbacks=[Recorder(), lambda r, metrics, states: plain.append(r)]
    )
    assert seen[0] == ("begin", 3, "run") and seen[-1] == ("end", 2, True)
    assert [s[1] for s in seen[1:-1]] == [1, 2] and plain == [1, 2]
    assert [s[2] for s in seen[1:-1]] == [r["accuracy"] for r in result.history]
    assert seen[1][3] == seen[1][4] == [0, 1, 2, 3]
    assert result.stopped_early and result.summary["rounds"] == 2 and len(result.history) == 2


def _readme_example() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("## Python API", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, "README.md: no ```python block under '## Python API'"
    return blocks[0]


def _run_readme_example(tmp_path: Path, prelude: str = "") -> subprocess.CompletedProcess:
    shared = REPO.parent / "shared" / "data"
    if not (shared / "sst2" / "train.tsv").is_file():
        pytest.skip("shared SST-2 data not found")
    (tmp_path / "example.py").write_text(prelude + _readme_example())
    env = os.environ | {"DECLORA_DATA": str(shared), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "example.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (summary,) = (tmp_path / "runs").glob("*/summary.json")
    assert list((summary.parent / "tensorboard").glob("events.out.tfevents.*"))
    rounds = json.loads(summary.read_text())["rounds"]
    assert out.stdout.count("round ") == rounds and f"after {rounds} rounds" in out.stdout
    return out


def test_the_readme_example_runs(tiny_bert: Path, tmp_path: Path) -> None:
    """The README's block as printed, but on the tiny random model (seconds): the one change is an
    extra ``model.name_or_path`` override slipped into ``declora.train``."""
    prelude = (
        "import declora\n"
        "_train = declora.train\n"
        f"declora.train = lambda *a, **kw: _train(*a, **kw, **{{'model.name_or_path': {str(tiny_bert)!r}}})\n"
    )
    _run_readme_example(tmp_path, prelude)


@pytest.mark.slow
def test_the_readme_example_runs_as_printed(tmp_path: Path) -> None:
    """Exactly the README's block, on the real MiniLM."""
    _run_readme_example(tmp_path)
