"""train.lr_scheduler / warmup and train.grad_accumulation: HF's schedules stepping once per local
optimizer step and client, accumulation equal to one big batch, and resume equal to an uninterrupted
scheduled run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import declora
from declora.client.client import Client
from declora.client.lr_schedule import make_scheduler, warmup_steps
from declora.config import TrainConfig, load_config
from declora.data.loading import BatchStream
from declora.errors import ConfigError
from declora.rundir.layout import read_metrics


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("train.lr_scheduler=step", "train.lr_scheduler"),
        ("train.warmup_steps=-1", "train.warmup_steps"),
        ("train.warmup_ratio=1.0", "train.warmup_ratio"),
        ("train.warmup_ratio=nan", "train.warmup_ratio"),
        ("train.grad_accumulation=0", "train.grad_accumulation"),
    ],
)
def test_bad_schedule_options_name_the_option(override: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(overrides=[override])
    with pytest.raises(ConfigError, match="alternatives"):
        load_config(overrides=["train.warmup_steps=2", "train.warmup_ratio=0.1"])


def _lrs(train: TrainConfig, total: int) -> list[float]:
    """The learning rate of each of ``total`` optimizer steps."""
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=train.lr)
    sched = make_scheduler(opt, train, total)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        if sched is not None:
            sched.step()
    return out


def test_schedules_follow_hf_definitions() -> None:
    assert make_scheduler(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0), TrainConfig(), 10) is None
    lin = _lrs(TrainConfig(lr=1.0, lr_scheduler="linear", warmup_steps=2), 10)
    assert lin == pytest.approx([0.0, 0.5] + [(10 - k) / 8 for k in range(2, 10)])
    assert _lrs(TrainConfig(lr=1.0, warmup_steps=4), 8) == pytest.approx([0, 0.25, 0.5, 0.75, 1, 1, 1, 1])
    cos = _lrs(TrainConfig(lr=1.0, lr_scheduler="cosine"), 4)
    assert cos == pytest.approx([0.5 * (1 + torch.cos(torch.tensor(torch.pi * k / 4)).item()) for k in range(4)])
    assert warmup_steps(TrainConfig(warmup_ratio=0.1), 15) == 2  # ceil, as HF Trainer


def _client(s, train: TrainConfig) -> Client:  # noqa: ANN001
    trained = {n for n in s.init if s.algorithm.is_trained(n)}
    return Client.create(0, s.init, trained, BatchStream(s.parts[0], train.batch_size, train.seed, 0), train)


def test_accumulated_micro_batches_equal_one_big_batch_and_step_the_schedule_once(
    tiny_overrides: list[str],
) -> None:
    from dataclasses import replace

    from declora.training.setup import setup

    cfg = load_config(overrides=[*tiny_overrides, "train.optimizer=sgd", "train.lr=0.5"])
    s = setup(cfg)
    for m in s.model.modules():  # dropout draws differ between one batch of 8 and two of 4
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    big = _client(s, replace(cfg.train, batch_size=8))
    small = _client(s, replace(cfg.train, batch_size=4, grad_accumulation=2, lr_scheduler="linear"))
    small.scheduler = None  # compare the accumulation alone at the same constant rate
    loss_big = big.local_steps(s.model, s.data, 3, 1, s.device)
    loss_small = small.local_steps(s.model, s.data, 3, 1, s.device)
    assert len(big.step_losses) == len(small.step_losses) == 3
    assert small.step_losses == pytest.approx(big.step_losses, abs=1e-5)
    assert loss_small == pytest.approx(loss_big, abs=1e-5)
    moved = 0.0
    for name, p in big.params.items():
        torch.testing.assert_close(small.params[name], p, rtol=0, atol=2e-6)
        moved = max(moved, (p - s.init[name]).abs().max().item())
    assert moved > 1e-3  # the steps did move the adapter

    sched = _client(s, replace(cfg.train, batch_size=4, grad_accumulation=2, lr_scheduler="linear", rounds=3))
    sched.local_steps(s.model, s.data, 3, 1, s.device)
    assert sched.scheduler.last_epoch == 3  # once per optimizer step, not per micro-batch
    assert sched.optimizer.param_groups[0]["lr"] == pytest.approx(0.5 * (6 - 3) / 6)  # T x K = 3 x 2 steps


def test_resume_in_the_middle_of_a_scheduled_run_equals_the_uninterrupted_run(
    tiny_overrides: list[str], tmp_path: Path
) -> None:
    scheduled = [
        *tiny_overrides,
        "train.rounds=4",
        "train.lr_scheduler=linear",
        "train.warmup_steps=2",
        "train.grad_accumulation=2",
        "train.batch_size=4",
    ]
    full = declora.train(scheduled, out_dir=str(tmp_path / "full"))
    stopped = declora.train(scheduled, out_dir=str(tmp_path / "part"), callbacks=[lambda r, m, s: r == 2])
    assert stopped.stopped_early and len(stopped.history) == 2
    ckpt = torch.load(tmp_path / "part" / "checkpoints" / "round_000002" / "rank_0.pt", weights_only=True)
    client0 = ckpt["clients"][0]
    assert client0["scheduler"]["last_epoch"] == 4  # 2 rounds x 2 optimizer steps
    assert client0["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-3 * (8 - 4) / (8 - 2))

    resumed = declora.train([f"resume={tmp_path / 'part'}"])
    assert resumed.run_dir == tmp_path / "part" and not resumed.stopped_early

    def numbers(run: Path) -> list[dict]:
        return [{k: v for k, v in row.items() if k != "wall_s"} for row in read_metrics(run)]

    assert numbers(resumed.run_dir) == numbers(full.run_dir)
    for i in range(4):
        for name, t in full.client_state(i).items():
            assert torch.equal(resumed.client_state(i)[name], t), name
    assert full.summary["samples"] == 4 * 2 * 4 * 2 * 4  # rounds x K x batch x accumulation x clients
