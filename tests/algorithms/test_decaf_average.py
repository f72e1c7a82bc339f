"""The averaged model of product-mixing algorithms (dec_decaf, peft.ranks) is the mean update, exactly;
evaluated, reported and saved as the same object (plain peft reproduces it)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from declora.algorithms import build_algorithm
from declora.algorithms.dec_decaf import DecDeCAF
from declora.comm import InProcessCommunicator
from declora.config import load_config
from declora.mixing.kernel import average_states
from declora.mixing.products import product_distance, products

A0, B0 = "m0.lora_A.default.weight", "m0.lora_B.default.weight"
A1, B1 = "m1.lora_A.default.weight", "m1.lora_B.default.weight"


def _product(state: dict[str, torch.Tensor], b: str = B0, a: str = A0) -> torch.Tensor:
    return state[b].double() @ state[a].double()


def _peers(perturb: float, seed: int = 0) -> dict[int, dict[str, torch.Tensor]]:
    """Two peers with (nearly) the same updates, their factors related by sign flips and a rotation."""
    g = torch.Generator().manual_seed(seed)
    B, A = torch.randn(6, 3, generator=g), torch.randn(3, 8, generator=g)
    C, D = torch.randn(5, 3, generator=g), torch.randn(3, 4, generator=g)
    flip = torch.diag(torch.tensor([-1.0, 1.0, -1.0]))  # singular-vector signs, as two SVDs may pick them
    angle = torch.tensor(0.7)
    rot = torch.eye(3)
    rot[:2, :2] = torch.stack([torch.stack([angle.cos(), -angle.sin()]), torch.stack([angle.sin(), angle.cos()])])
    head = torch.randn(2, 4, generator=g)
    one = {A0: A, B0: B, A1: D, B1: C, "head.weight": head}
    two = {
        A0: flip @ A + perturb * torch.randn(3, 8, generator=g),
        B0: B @ flip,
        A1: rot.T @ D,
        B1: C @ rot + perturb * torch.randn(5, 3, generator=g),
        "head.weight": head + 1.0,
    }
    return {0: one, 1: two}


@pytest.mark.parametrize("perturb", [0.0, 1e-2, 0.3])
def test_averaged_model_is_the_mean_product_not_the_factor_mean(perturb: float) -> None:
    states = _peers(perturb)
    mean = DecDeCAF().averaged(InProcessCommunicator(2), states)
    old = average_states([states[0], states[1]])  # the factor mean the code used to report
    for b, a in ((B0, A0), (B1, A1)):
        want = (_product(states[0], b, a) + _product(states[1], b, a)) / 2
        torch.testing.assert_close(_product(mean, b, a), want, rtol=0, atol=1e-5)
        assert mean[a].shape[0] == 6 and mean[b].shape[1] == 6  # rank k = r_0 + r_1 = 6 <= min(d_out, d_in)
        assert float((_product(old, b, a) - want).abs().max()) > 0.1  # the old average misses it
    torch.testing.assert_close(mean["head.weight"], states[0]["head.weight"] + 0.5)
    assert list(mean) == list(states[0])  # names and order of the model's state


def test_mean_rank_is_capped_by_the_module_and_padded_with_zero_directions() -> None:
    g = torch.Generator().manual_seed(3)
    states = {i: {A0: torch.randn(3, 4, generator=g), B0: torch.randn(5, 3, generator=g)} for i in range(3)}
    mean = DecDeCAF().averaged(InProcessCommunicator(3), states)
    assert mean[A0].shape == (4, 4) and mean[B0].shape == (5, 4)  # min(3 * 3, min(5, 4)) = 4
    want = sum(_product(s) for s in states.values()) / 3
    torch.testing.assert_close(_product(mean), want, rtol=0, atol=1e-5)


def test_consensus_terms_are_on_products_and_vanish_for_refactored_copies() -> None:
    states = _peers(0.0)
    alg = DecDeCAF()
    mean = alg.averaged(InProcessCommunicator(2), states)
    no_head = {i: {n: t for n, t in s.items() if n != "head.weight"} for i, s in states.items()}
    mean_no_head = alg.averaged(InProcessCommunicator(2), no_head)
    assert all(alg.distance(s, mean_no_head) < 1e-9 for s in no_head.values())  # same updates: no disagreement
    assert alg.distance(states[0], mean) == pytest.approx(4 * 2 * 0.5**2, rel=1e-6)  # only the heads differ
    for i, s in states.items():
        means = {b: _product(mean, b, b.replace("lora_B", "lora_A")) for b in (B0, B1)}
        expected = sum(float((p - means[b]).pow(2).sum()) for b, p in products(s).items())
        assert product_distance(s, mean) == pytest.approx(expected + 2.0, rel=1e-6), i


def test_members_leave_the_product_mean() -> None:
    g = torch.Generator().manual_seed(4)
    states = {
        i: {A0: torch.randn(2, 6, generator=g), B0: torch.randn(6, 2, generator=g), "h": torch.randn(3, generator=g)}
        for i in range(4)
    }
    mean = DecDeCAF().averaged(InProcessCommunicator(4), states, members=[0, 2, 3])
    want = sum(_product(states[i]) for i in (0, 2, 3)) / 3
    torch.testing.assert_close(_product(mean), want, rtol=0, atol=1e-5)
    torch.testing.assert_close(mean["h"], (states[0]["h"] + states[2]["h"] + states[3]["h"]) / 3)
    assert mean[A0].shape[0] == 6  # 3 members of rank 2


def test_heterogeneous_ranks_average_the_folded_products() -> None:
    cfg = load_config(overrides=["train.algorithm=dec_decaf", "train.clients=2", "peft.ranks=[2,4]", "peft.r=4"])
    alg = build_algorithm("dec_decaf", cfg)
    g = torch.Generator().manual_seed(5)
    states = {i: {A0: torch.randn(4, 8, generator=g), B0: torch.randn(6, 4, generator=g)} for i in range(2)}
    states[0][A0][2:] = 0  # a rank-2 peer's extra rows / columns are zero
    states[0][B0][:, 2:] = 0
    mean = alg.averaged(InProcessCommunicator(2), states)
    assert mean[A0].shape[0] == 6  # r_0 + r_1
    torch.testing.assert_close(_product(mean), (_product(states[0]) + _product(states[1])) / 2, rtol=0, atol=1e-5)


# -- end to end: the reported number is the saved model's ---------------------------------------------

PLAIN_PEFT = textwrap.dedent(
    """
    import csv, json, sys
    import torch
    from peft import AutoPeftModelForSequenceClassification
    from transformers import AutoTokenizer
    path, test, max_length = sys.argv[1], sys.argv[2], int(sys.argv[3])
    meta = json.load(open(f"{path}/declora.json"))
    id2label = {int(i): name for i, name in meta["id2label"].items()}
    model = AutoPeftModelForSequenceClassification.from_pretrained(
        path, num_labels=len(id2label), id2label=id2label, label2id=meta["label2id"]
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    rows = list(csv.DictReader(open(test, encoding="utf-8"), delimiter="\\t", quoting=csv.QUOTE_NONE))
    labels = torch.tensor([int(r["label"]) for r in rows])
    correct, loss = 0, 0.0
    with torch.no_grad():
        for k in range(0, len(rows), 16):
            batch = tokenizer([r["sentence"] for r in rows[k : k + 16]], truncation=True, max_length=max_length,
                              padding=True, return_tensors="pt")
            logits = model(**batch).logits
            correct += int((logits.argmax(-1) == labels[k : k + 16]).sum())
            loss += float(torch.nn.functional.cross_entropy(logits, labels[k : k + 16], reduction="sum"))
    print(json.dumps({"accuracy": correct / len(rows), "loss": loss / len(rows), "declora": "declora" in sys.modules}))
    """
)


def _fresh(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "TRANSFORMERS_VERBOSITY": "error"}
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _saved(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def _saved_products(folder: Path) -> dict[str, torch.Tensor]:
    """Each module's update ``(lora_alpha / r) B A`` of a saved peft adapter, as peft computes it."""
    config = json.loads((folder / "adapter_config.json").read_text())
    t = _saved(folder)
    scale = config["lora_alpha"] / config["r"]
    return {b: scale * t[b].double() @ t[b.replace("lora_B", "lora_A")].double() for b in t if ".lora_B." in b}


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("ranks", [None, "[2,4]"])
def test_saved_average_is_the_product_mean_and_plain_peft_gives_the_reported_accuracy(
    ranks: str | None, tiny_overrides: list[str], sst2_small: Path, tmp_path: Path
) -> None:
    from declora.training.trainer import run

    extra = ["train.algorithm=dec_decaf", "peft.lora_alpha=8"] + ([f"peft.ranks={ranks}"] if ranks else [])
    summary = run(load_config(overrides=[*tiny_overrides, *extra]))
    out = Path(summary["run_dir"])
    average = out / "adapters" / "average"
    config = json.loads((average / "adapter_config.json").read_text())
    n, rank_sum = 4, (2 + 4 + 2 + 4 if ranks else 4 * 4)
    assert config["r"] == rank_sum and config["lora_alpha"] == pytest.approx(8 * rank_sum / 4)
    # the saved update is the mean of the clients' saved updates (each at its own rank and alpha / r_i)
    clients = [_saved_products(out / "adapters" / f"client_{i}") for i in range(n)]
    mean = _saved_products(average)
    assert mean.keys() == clients[0].keys() and len(mean) > 0
    for b, update in mean.items():
        torch.testing.assert_close(update, sum(c[b] for c in clients) / n, rtol=0, atol=1e-5)
    heads = [_saved(out / "adapters" / f"client_{i}") for i in range(n)]
    for name, t in _saved(average).items():
        if ".lora_" not in name:  # the head: the entry-wise mean
            torch.testing.assert_close(t, sum(h[name] for h in heads) / n, rtol=1e-6, atol=1e-6)
    # plain transformers + peft, no declora import: the reported accuracy and loss
    cfg = load_config(overrides=tiny_overrides)
    plain = _fresh(
        [sys.executable, "-c", PLAIN_PEFT, str(average), str(sst2_small / "test.tsv"), str(cfg.model.max_length)],
        tmp_path,
    )
    got = json.loads(plain.stdout.strip().splitlines()[-1])
    final = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert got["declora"] is False
    assert got["accuracy"] == final["accuracy"] and got["loss"] == pytest.approx(final["eval_loss"], abs=1e-5)
    # declora eval rebuilds the model at the adapter's rank: the same numbers, and no bitsandbytes notice
    cli = _fresh([sys.executable, "-m", "declora", "eval", str(out), "--json"], tmp_path)
    res = json.loads(cli.stdout)
    assert res["accuracy"] == final["accuracy"] and res["loss"] == pytest.approx(final["eval_loss"], abs=1e-6)
    assert "gemm_4bit" not in cli.stderr and "bitsandbytes" not in cli.stderr.lower(), cli.stderr[-2000:]
