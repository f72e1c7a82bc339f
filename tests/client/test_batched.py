"""train.batch_clients: every client in one forward pass gives the sequential loop's numbers.

Tolerance: 1e-5 relative on every per-round loss and on the consensus error after 3 rounds, accuracy
equal. Why: the batched pass replays each client's dropout masks exactly (same generator state, same
shapes, same order), so what differs is only float rounding of matmuls of other shapes (the base over
the concatenated batch, the LoRA factors by bmm): ~1e-7 relative per step on the tiny BERT, which
AdamW's normalised steps carry to ~4e-7 relative on the adapters after 3 rounds (measured), well under
1e-5. A wrong dropout mask, a gradient leaking between clients or a skipped optimizer step moves
losses by 1e-3 or more.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import SHARED_DATA, require_shared_data

from declora.client import batched
from declora.config import ConfigError, load_config
from declora.rundir.layout import read_metrics
from declora.training.setup import make_clients, setup
from declora.training.trainer import run

RTOL = 1e-5


def _rows(overrides: list[str], out: Path, mode: str) -> list[dict]:
    summary = run(load_config(overrides=[*overrides, f"train.batch_clients={mode}", f"out_dir={out / mode}"]))
    return read_metrics(Path(summary["run_dir"]))


def _assert_same(seq: list[dict], bat: list[dict], rtol: float) -> None:
    assert len(seq) == len(bat) > 0
    for a, b in zip(seq, bat, strict=True):
        for key in ("train_loss", "eval_loss", "consensus_error"):
            assert b[key] == pytest.approx(a[key], rel=rtol), (a["round"], key, a[key], b[key])
        assert b["accuracy"] == a["accuracy"], (a["round"], a["accuracy"], b["accuracy"])


@pytest.mark.parametrize(
    "extra",
    [
        ["train.clients_per_pass=3"],  # 4 clients: a pass of 3 and a pass of 1 per local step
        [  # length-grouped batches, accumulation, clipping, a schedule, stragglers (own passes), dec_ffa_lora
            "data.group_by_length=true",
            "train.grad_accumulation=2",
            "train.max_grad_norm=0.5",
            "train.lr_scheduler=cosine",
            "train.warmup_steps=1",
            "train.stragglers=0.5",
            "train.algorithm=dec_ffa_lora",
        ],
    ],
    ids=["per-pass-cap", "grouped-accum-clip-stragglers"],
)
def test_batched_run_equals_sequential(tiny_overrides: list[str], tmp_path: Path, extra: list[str]) -> None:
    overrides = [*tiny_overrides, "train.rounds=3", "train.local_steps=3", "checkpoint_every=0", *extra]
    _assert_same(_rows(overrides, tmp_path, "false"), _rows(overrides, tmp_path, "true"), RTOL)


def test_batched_steps_match_client_state_and_rng(tiny_overrides: list[str]) -> None:
    """Per client: step losses, every tensor, AdamW state; and the global generator left as the loop leaves it."""
    cfg = load_config(overrides=[*tiny_overrides, "peft.lora_dropout=0.1", "peft.method=lora"])
    s = setup(cfg)
    ids = list(range(cfg.train.clients))
    seq, bat = make_clients(s, ids), make_clients(s, ids)
    active = [0, 2, 3]  # client 1 offline: not in the pass
    steps = {0: 2, 2: 1, 3: 2}  # client 2 straggles
    for round_ in (1, 2):
        torch.manual_seed(7)
        want = {i: seq[i].local_steps(s.model, s.data, steps[i], round_, s.device) for i in active}
        after_seq = torch.get_rng_state()
        torch.manual_seed(7)
        got = batched.local_steps([bat[i] for i in active], steps, s.model, s.data, round_, s.device)
        assert torch.equal(torch.get_rng_state(), after_seq)
        assert list(got) == active
        for i in active:
            assert got[i] == pytest.approx(want[i], rel=RTOL)
            assert bat[i].step_losses == pytest.approx(seq[i].step_losses, rel=RTOL)
            for name, p in seq[i].params.items():
                torch.testing.assert_close(bat[i].params[name], p, rtol=RTOL, atol=1e-7)
            assert bat[i].stream.state() == seq[i].stream.state()
            assert bat[i].optimizer.state_dict()["state"].keys() == seq[i].optimizer.state_dict()["state"].keys()
    for name, p in seq[1].params.items():  # the offline client never moved
        assert torch.equal(bat[1].params[name], p)
        assert torch.equal(p, s.init[name])


@pytest.mark.parametrize(
    ("option", "needs"),
    [
        (["privacy.mechanism=dp_sgd", "privacy.noise_multiplier=1.0"], "privacy.mechanism=none"),
        (["peft.ranks=[2,4]", "peft.r=4", "train.algorithm=dec_decaf"], "peft.ranks unset"),
        (["peft.method=ia3"], "peft.method=lora or head_only"),
    ],
)
def test_unsupported_options_refused_in_one_line(tiny_overrides: list[str], option: list[str], needs: str) -> None:
    with pytest.raises(ConfigError, match=f"train.batch_clients=true needs {needs}") as err:
        load_config(overrides=[*tiny_overrides, *option, "train.batch_clients=true"])
    assert "\n" not in str(err.value)
    auto = load_config(overrides=[*tiny_overrides, *option, "train.batch_clients=auto"])
    assert not batched.enabled(auto, 4)  # auto falls back to the sequential loop


def test_options_validated() -> None:
    with pytest.raises(ConfigError, match="train.batch_clients='sometimes' is not one of"):
        load_config(overrides=["train.batch_clients=sometimes"])
    with pytest.raises(ConfigError, match="train.clients_per_pass=0 must be"):
        load_config(overrides=["train.clients_per_pass=0"])
    default = load_config()
    assert default.train.batch_clients is False and not batched.enabled(default, 10)
    assert batched.enabled(load_config(overrides=["train.batch_clients=auto"]), 10)


@pytest.mark.slow
def test_batched_equals_sequential_on_minilm(tmp_path: Path) -> None:
    """Real MiniLM (dropout 0.1 in every layer), real SST-2, a tiny budget: the same per-round numbers."""
    require_shared_data("sst2")
    overrides = [
        "model.name_or_path=minilm",
        f"data.path={SHARED_DATA / 'sst2'}",
        "data.max_train_examples=800",
        "data.max_eval_examples=100",
        "train.clients=4",
        "train.rounds=3",
        "train.local_steps=2",
        "train.batch_size=16",
        "eval.client_max_examples=50",
        "progress=false",
        "plots=false",
        "save_adapters=false",
        "checkpoint_every=0",
    ]
    _assert_same(_rows(overrides, tmp_path, "false"), _rows(overrides, tmp_path, "true"), RTOL)


def test_passes_cut_by_width_cap_and_budget() -> None:
    assert batched.passes([1, 1, 9], cap=10, cost=1.0) == [slice(0, 2), slice(2, 3)]  # 9 alone: no padding to 9
    assert batched.passes([5, 5, 5, 5], cap=10, cost=1.0) == [slice(0, 4)]  # equal widths: one pass
    assert batched.passes([5, 5, 5, 5], cap=3, cost=1.0) in ([slice(0, 1), slice(1, 4)], [slice(0, 3), slice(3, 4)])
    assert batched.passes([5, 5, 5, 5], cap=10, cost=1.0, max_width=10) == [slice(0, 2), slice(2, 4)]
    assert batched.passes([50], cap=10, cost=1.0, max_width=10) == [slice(0, 1)]  # one client always fits
