"""DP-SGD per peer (declora.client.dp_sgd): per-example gradients, clipping, noise, accounting, resume."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from declora.client.dp_batches import PoissonStream, ShuffleStream
from declora.client.dp_sgd import PeerPrivacy, calibrate, clip_and_sum, per_example_grads
from declora.config import ConfigError, PrivacyConfig, load_config
from declora.rundir.layout import read_metrics
from declora.training.setup import make_clients, setup
from declora.training.trainer import run

DP = ["privacy.mechanism=dp_sgd"]


@pytest.fixture(scope="module")
def tiny_bert_no_dropout(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny_bert without dropout: the batched and the per-example forward passes then see the same model."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    out = tmp_path_factory.mktemp("tiny-bert-nodrop")
    config = BertConfig.from_pretrained(tiny_bert, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(out)
    return out


def _setup_batch(overrides: list[str], size: int = 6):
    s = setup(load_config(overrides=overrides))
    client = make_clients(s, [0])[0]
    from declora.data.loading import collate

    return s, client, collate(s.data.train, s.parts[0][:size], s.data.pad_token_id, s.device)


@pytest.mark.parametrize("method", ["lora", "ia3", "head_only"])
def test_per_example_grads_equal_single_example_backward_passes(tiny_overrides: list[str], method: str) -> None:
    s, client, batch = _setup_batch([*tiny_overrides, f"peft.method={method}"])
    s.model.eval()  # no dropout: the two computations see the same function
    grads, losses = per_example_grads(s.model, client.params, batch)
    from declora.model.loading import forward_with

    for k in range(len(batch["labels"])):
        params = {n: p.detach().clone().requires_grad_(p.requires_grad) for n, p in client.params.items()}
        one = {key: v[k : k + 1] for key, v in batch.items()}
        width = int(one["attention_mask"].sum())  # the example alone, without the batch's padding
        one = {key: (v[:, :width] if v.dim() == 2 else v) for key, v in one.items()}
        loss = forward_with(s.model, params, one).loss
        loss.backward()
        assert losses[k].item() == pytest.approx(loss.item(), rel=1e-5)
        for n, p in params.items():
            if p.requires_grad:
                torch.testing.assert_close(grads[n][k], p.grad, rtol=1e-4, atol=1e-6)


class _TinyNet(nn.Module):
    """Opacus-wrappable: a LoRA-style low-rank path beside a frozen layer, then a trained head."""

    def __init__(self) -> None:
        super().__init__()
        self.base = nn.Linear(8, 8)
        self.lora_A = nn.Linear(8, 2, bias=False)
        self.lora_B = nn.Linear(2, 8, bias=False)
        self.head = nn.Linear(8, 3)
        nn.init.normal_(self.lora_B.weight)  # peft starts B at 0; nonzero so A gets a gradient too

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> SimpleNamespace:
        h = torch.tanh(self.base(x) + self.lora_B(self.lora_A(x)))
        return SimpleNamespace(loss=nn.functional.cross_entropy(self.head(h), labels))


def test_per_example_grads_equal_opacus_grad_sample_module() -> None:
    from opacus import GradSampleModule

    torch.manual_seed(0)
    net = _TinyNet()
    net.base.requires_grad_(False)
    x, y = torch.randn(5, 8), torch.tensor([0, 1, 2, 1, 0])
    params = {n: p.detach().clone().requires_grad_(p.requires_grad) for n, p in net.named_parameters()}
    ours, _ = per_example_grads(net, params, {"x": x, "labels": y})

    gsm = GradSampleModule(net, loss_reduction="mean")
    gsm(x, labels=y).loss.backward()
    trained = [n for n, p in net.named_parameters() if p.requires_grad]
    assert trained == list(ours)
    for n, p in net.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(ours[n], p.grad_sample, rtol=1e-5, atol=1e-7)


def test_clipping_bounds_every_example_and_leaves_small_ones_alone() -> None:
    gen = torch.Generator().manual_seed(0)
    grads = {"a": torch.randn(7, 3, 4, generator=gen), "b": torch.randn(7, 5, generator=gen)}
    grads["a"][0] *= 1e-3
    grads["b"][0] *= 1e-3  # example 0's norm is far below the bound
    summed, norms = clip_and_sum(grads, clip=1.0)
    factor = (1.0 / (norms + 1e-6)).clamp(max=1.0)
    clipped = [torch.cat([g[k].flatten() * factor[k] for g in grads.values()]).norm() for k in range(7)]
    assert norms[0] < 1.0 and all(n > 1.0 for n in norms[1:])
    assert all(c <= 1.0 for c in clipped) and clipped[0] == pytest.approx(norms[0].item())
    for n, g in grads.items():  # the sum is of the clipped examples
        torch.testing.assert_close(summed[n], torch.einsum("b,b...->...", factor, g))


def test_a_private_step_has_a_clipped_gradient_plus_noise_of_std_sigma_c(tiny_overrides: list[str]) -> None:
    """Same batch, same step number: sigma=0 gives the clipped mean; sigma>0 adds N(0, (sigma C / B)^2)."""
    s, client, batch = _setup_batch([*tiny_overrides, *DP, "privacy.noise_multiplier=1.0"], size=6)
    s.model.eval()
    C, B, sigma = 0.01, 8, 2.5
    grads: dict[float, list[torch.Tensor]] = {0.0: [], sigma: []}
    for noise in (0.0, sigma):
        cfg = PrivacyConfig(mechanism="dp_sgd", max_grad_norm=C, noise_multiplier=noise)
        dp = PeerPrivacy(0, cfg, noise, q=0.05, batch_size=B, examples=150, planned_steps=4, seed=0)
        for _ in range(4):  # 4 steps: 4 independent noise draws (the step number seeds the generator)
            for p in client.params.values():
                p.grad = None
            dp.loss(s.model, client.params, batch).backward()
            grads[noise].append(torch.cat([p.grad.flatten() for p in client.params.values() if p.requires_grad]))
    assert grads[0.0][0].norm() <= 6 * C / B * (1 + 1e-5)  # 6 examples, each clipped to C, over B
    z = ((torch.cat(grads[sigma]) - torch.cat(grads[0.0])) * B / (sigma * C)).double().numpy()
    assert z.size > 5000
    assert abs(z.mean()) < 4 / np.sqrt(z.size) and abs(z.std() - 1) < 0.03
    from scipy.stats import kstest

    assert kstest(z, "norm").pvalue > 0.01
    # an empty Poisson draw: loss 0, the gradient is the noise alone
    from declora.data.loading import collate

    empty = collate(s.data.train, np.array([], dtype=np.int64), s.data.pad_token_id, s.device)
    for p in client.params.values():
        p.grad = None
    loss = dp.loss(s.model, client.params, empty)
    loss.backward()
    noise = torch.cat([p.grad.flatten() for p in client.params.values() if p.requires_grad]) * B / (sigma * C)
    assert loss.item() == 0.0 and abs(noise.std().item() - 1) < 0.1


def test_a_chunked_step_equals_the_unchunked_one_and_is_one_noise_draw(tiny_overrides: list[str]) -> None:
    """Physical batches of 2 (sorted by length, padding trimmed) vs the 7-example batch in one pass: with
    sigma=0 and a bound never reached, the same gradient up to float rounding; one accountant step each."""
    s, client, batch = _setup_batch([*tiny_overrides, *DP, "privacy.noise_multiplier=1.0"], size=7)
    s.model.eval()
    assert len(set(batch["attention_mask"].sum(1).tolist())) > 1  # chunks really get trimmed
    out: dict[int | None, tuple[torch.Tensor, float]] = {}
    for physical in (None, 2, 3):
        cfg = PrivacyConfig(mechanism="dp_sgd", max_grad_norm=1e9, noise_multiplier=0.0, physical_batch_size=physical)
        dp = PeerPrivacy(0, cfg, 0.0, q=0.05, batch_size=8, examples=140, planned_steps=1, seed=0)
        for p in client.params.values():
            p.grad = None
        loss = dp.loss(s.model, client.params, batch)
        loss.backward()
        assert dp.steps == 1 and len(dp.accountant.history) == 1 and len(dp.norms[0]) == 7
        out[physical] = (torch.cat([p.grad.flatten() for p in client.params.values() if p.requires_grad]), loss.item())
    for physical in (2, 3):
        torch.testing.assert_close(out[physical][0], out[None][0], rtol=1e-5, atol=1e-7)
        assert out[physical][1] == pytest.approx(out[None][1], rel=1e-6)
    assert out[None][0].abs().sum() > 0


def test_physical_chunks_cover_the_batch_once_longest_first() -> None:
    from declora.client.dp_batches import physical_chunks

    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 0, 0]])
    batch = {"input_ids": torch.arange(20).reshape(5, 4) * mask, "attention_mask": mask, "labels": torch.arange(5)}
    assert physical_chunks(batch, None) == [batch]
    chunks = physical_chunks(batch, 2)
    assert [c["labels"].tolist() for c in chunks] == [[1, 3], [0, 4], [2]]  # by length, ties in batch order
    assert [c["input_ids"].shape[1] for c in chunks] == [4, 2, 1]  # each chunk only as wide as its longest
    for c in chunks:
        for row, label in zip(c["input_ids"], c["labels"], strict=True):
            assert row.tolist() == batch["input_ids"][label, : len(row)].tolist()


def test_physical_batches_keep_one_accountant_step_per_logical_batch_and_log_clipping(
    tiny_overrides: list[str], tmp_path: Path
) -> None:
    """privacy.physical_batch_size=3 with batch 8: steps = logical batches, the reported epsilon is Opacus'
    accountant recomputed from the reported sigma, sample rate and steps; clipping stats in every row."""
    from opacus.accountants import RDPAccountant

    extra = ["privacy.target_epsilon=6", "privacy.physical_batch_size=3", "privacy.max_grad_norm=0.05"]
    summary = run(load_config(overrides=[*tiny_overrides, *DP, *extra, f"out_dir={tmp_path}"]))
    rows = read_metrics(summary["run_dir"])
    peers = summary["privacy"]["peers"]
    assert [p["steps"] for p in peers] == [4] * 4  # 2 rounds x 2 local steps: logical batches, not chunks
    for p in peers:
        ref = RDPAccountant()
        ref.history = [(p["noise_multiplier"], p["sample_rate"], p["steps"])]
        assert p["epsilon"] == pytest.approx(ref.get_epsilon(delta=p["delta"]), rel=1e-9)
        assert 6 - 0.011 <= p["epsilon"] <= 6
    for row in rows:
        for key in ("grad_norm_median", "grad_norm_p90", "clipped_fraction"):
            per_peer = row[f"{key}_per_peer"]
            assert len(per_peer) == 4 and row[key] == pytest.approx(np.mean(per_peer))
        assert all(m <= p for m, p in zip(row["grad_norm_median_per_peer"], row["grad_norm_p90_per_peer"], strict=True))
        assert all(0.0 <= f <= 1.0 for f in row["clipped_fraction_per_peer"])
    assert rows[0]["clipped_fraction"] > 0.5  # C=0.05 is below most per-example norms of a fresh head


def test_clip_stats_are_the_norms_quantiles_and_reset() -> None:
    cfg = PrivacyConfig(mechanism="dp_sgd", max_grad_norm=1.0, noise_multiplier=1.0)
    dp = PeerPrivacy(0, cfg, 1.0, q=0.1, batch_size=4, examples=40, planned_steps=1, seed=0)
    dp.norms = [torch.tensor([0.5, 2.0, 0.1]), torch.tensor([3.0, 0.2])]
    median, p90, clipped = dp.clip_stats()
    ref = np.array([0.5, 2.0, 0.1, 3.0, 0.2])
    assert median == pytest.approx(np.median(ref)) and p90 == pytest.approx(np.quantile(ref, 0.9))
    assert clipped == pytest.approx(2 / 5) and dp.norms == []
    assert all(np.isnan(dp.clip_stats()))  # nothing seen since: no statistics


def test_poisson_stream_samples_at_rate_q_and_resumes_exactly() -> None:
    s = PoissonStream(np.arange(1000), q=0.02, seed=0, stream_id=3)
    sizes = [len(s.next()) for _ in range(300)]
    assert abs(np.mean(sizes) - 20) < 1.0 and len(set(sizes)) > 5  # variable sizes around q n
    state, nxt = s.state(), s.next()
    t = PoissonStream(np.arange(1000), q=0.02, seed=0, stream_id=3)
    t.load_state(state)
    np.testing.assert_array_equal(t.next(), nxt)
    shuffle = ShuffleStream(np.arange(10), 4, seed=0, stream_id=0, secure=False)
    assert all(len(set(shuffle.next().tolist())) == 4 for _ in range(20))  # never an example twice in a batch


def test_epsilon_equals_opacus_accountant_per_round_and_per_peer(tiny_overrides: list[str], tmp_path: Path) -> None:
    from opacus.accountants import PRVAccountant, RDPAccountant

    for accountant, cls in (("rdp", RDPAccountant), ("prv", PRVAccountant)):
        extra = ["privacy.noise_multiplier=0.8", f"privacy.accountant={accountant}", f"out_dir={tmp_path / accountant}"]
        summary = run(load_config(overrides=[*tiny_overrides, *DP, *extra]))
        rows = read_metrics(summary["run_dir"])
        for t, row in enumerate(rows, start=1):
            for i, eps in enumerate(row["epsilon_per_peer"]):
                n = np.asarray(summary["partition_counts"][i]).sum()
                ref = cls()
                ref.history = [(0.8, 8 / n, 2 * t)]  # batch 8 of n examples, 2 local steps per round
                assert eps == pytest.approx(ref.get_epsilon(delta=1e-5), rel=1e-9), (accountant, t, i)
            assert row["epsilon"] == max(row["epsilon_per_peer"])
        peers = summary["privacy"]["peers"]
        assert [p["steps"] for p in peers] == [4] * 4 and summary["delta"] == 1e-5
        assert summary["epsilon"] == rows[-1]["epsilon"]


def test_target_epsilon_is_met_and_not_exceeded(tiny_overrides: list[str]) -> None:
    cfg = PrivacyConfig(mechanism="dp_sgd", target_epsilon=2.0)
    sigma = calibrate(cfg, q=0.05, steps=40)
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = [(sigma, 0.05, 40)]
    assert 2.0 - 0.011 <= acc.get_epsilon(delta=1e-5) <= 2.0
    # end to end, with uneven peers (dirichlet): each meets the target with its own sigma
    extra = ["privacy.target_epsilon=3.0", "partition.kind=dirichlet", "partition.alpha=1.0", "train.algorithm=local"]
    summary = run(load_config(overrides=[*tiny_overrides, *DP, *extra]))
    peers = summary["privacy"]["peers"]
    assert len({p["examples"] for p in peers}) > 1 and len({p["noise_multiplier"] for p in peers}) > 1
    for p in peers:
        assert 3.0 - 0.011 <= p["epsilon"] <= 3.0, p


def test_no_noise_and_a_bound_never_reached_equal_the_non_private_run(
    tiny_overrides: list[str], tiny_bert_no_dropout: Path, tmp_path: Path
) -> None:
    """Tolerance: rel 1e-6 on losses and the consensus error, 1e-6 absolute on adapter entries (the
    per-example sum is reduced in another order than the batch gradient; measured: ~3e-8)."""
    base = [*tiny_overrides, f"model.name_or_path={tiny_bert_no_dropout}", "train.batch_size=6", "train.rounds=3"]
    plain = run(load_config(overrides=[*base, f"out_dir={tmp_path / 'plain'}"]))
    dp_extra = ["privacy.noise_multiplier=0", "privacy.max_grad_norm=1e9", "privacy.poisson=false"]
    private = run(load_config(overrides=[*base, *DP, *dp_extra, f"out_dir={tmp_path / 'dp'}"]))
    a, b = read_metrics(plain["run_dir"]), read_metrics(private["run_dir"])
    assert private["epsilon"] == float("inf") and b[-1]["epsilon"] is None  # no noise: no guarantee (strict JSON)
    for ra, rb in zip(a, b, strict=True):
        assert ra["accuracy"] == rb["accuracy"] and ra["client_accuracy_mean"] == rb["client_accuracy_mean"]
        for k in ("train_loss", "eval_loss", "consensus_error"):
            assert rb[k] == pytest.approx(ra[k], rel=1e-6), k
    for name in ["average"] + [f"client_{i}" for i in range(4)]:
        pa = load_file(str(Path(plain["run_dir"]) / "adapters" / name / "adapter_model.safetensors"))
        pb = load_file(str(Path(private["run_dir"]) / "adapters" / name / "adapter_model.safetensors"))
        for key in pa:
            torch.testing.assert_close(pb[key], pa[key], rtol=0, atol=1e-6)


def test_resume_keeps_the_accountant_and_the_noise_stream(tiny_overrides: list[str], tmp_path: Path) -> None:
    args = [*tiny_overrides, *DP, "privacy.noise_multiplier=1.0", "checkpoint_cleanup=false", "eval.clients=false"]
    straight = run(load_config(overrides=[*args, f"out_dir={tmp_path / 'straight'}"]))
    run(load_config(overrides=[*args, "train.rounds=1", f"out_dir={tmp_path / 'split'}"]))
    resumed = run(load_config(overrides=[f"resume={tmp_path / 'split'}", "train.rounds=2"]))
    a, b = read_metrics(straight["run_dir"]), read_metrics(resumed["run_dir"])
    drop = lambda rows: [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]  # noqa: E731
    assert drop(a) == drop(b)  # epsilon after round 2 counts all 4 steps; same noise, same batches
    assert resumed["privacy"]["peers"] == straight["privacy"]["peers"]
    # a target_epsilon run calibrated for fewer rounds cannot silently spend more by being extended
    cfg = PrivacyConfig(mechanism="dp_sgd", target_epsilon=4.0)
    short = PeerPrivacy(0, cfg, calibrate(cfg, 0.05, 4), q=0.05, batch_size=8, examples=160, planned_steps=4, seed=0)
    longer = PeerPrivacy(0, cfg, calibrate(cfg, 0.05, 6), q=0.05, batch_size=8, examples=160, planned_steps=6, seed=0)
    with pytest.raises(ConfigError, match="keep the run's train.rounds"):
        longer.load_state_dict(short.state_dict())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["privacy.mechanism=dp_sgd"], "exactly one of"),
        (["privacy.mechanism=dp_sgd", "privacy.noise_multiplier=1", "privacy.target_epsilon=1"], "exactly one"),
        (["privacy.noise_multiplier=1"], "need privacy.mechanism=dp_sgd"),
        ([*DP, "privacy.noise_multiplier=-1"], "privacy.noise_multiplier=-1"),
        ([*DP, "privacy.noise_multiplier=nan"], "finite"),
        ([*DP, "privacy.target_epsilon=0"], "privacy.target_epsilon=0"),
        ([*DP, "privacy.noise_multiplier=1", "privacy.max_grad_norm=0"], "privacy.max_grad_norm=0"),
        ([*DP, "privacy.noise_multiplier=1", "privacy.max_grad_norm=inf"], "finite"),
        ([*DP, "privacy.noise_multiplier=1", "privacy.delta=1"], "privacy.delta=1"),
        ([*DP, "privacy.noise_multiplier=1", "privacy.accountant=gdp"], "privacy.accountant"),
        ([*DP, "privacy.noise_multiplier=1", "peft.method=prefix_tuning"], "lora, ia3 or head_only"),
        ([*DP, "privacy.noise_multiplier=1", "train.max_grad_norm=1"], "unset train.max_grad_norm"),
        ([*DP, "privacy.noise_multiplier=1", "model.quantization=nf4"], "model.quantization=none"),
        ([*DP, "privacy.noise_multiplier=1", "privacy.physical_batch_size=0"], "privacy.physical_batch_size=0"),
        (["privacy.physical_batch_size=8"], "need privacy.mechanism=dp_sgd"),
        (
            [*DP, "privacy.noise_multiplier=1", "train.batch_size=32", "train.grad_accumulation=8"],
            "train.batch_size=256 privacy.physical_batch_size=32",
        ),
    ],
)
def test_bad_privacy_options_stop_with_one_line(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        load_config(overrides=overrides)
    assert "\n" not in str(err.value)


def test_defaults_change_nothing_and_write_no_privacy_keys(tiny_overrides: list[str]) -> None:
    summary = run(load_config(overrides=tiny_overrides))
    assert "epsilon" not in summary and "privacy" not in summary
    assert all("epsilon" not in r for r in read_metrics(summary["run_dir"]))
    assert "epsilon" not in json.loads((Path(summary["run_dir"]) / "summary.json").read_text())


@pytest.mark.parametrize("algorithm", ["centralized", "fedavg", "dec_ffa_lora"])
def test_every_locally_training_algorithm_accounts_each_peer_s_own_steps(
    tiny_overrides: list[str], algorithm: str
) -> None:
    from declora.algorithms import build_algorithm
    from declora.client.dp_sgd import planned_steps

    extra = [f"train.algorithm={algorithm}", "privacy.noise_multiplier=1.0", "eval.clients=false"]
    extra += ["train.local_steps=1", "train.rounds=3"]
    extra += ["train.clients_per_round=2"] if algorithm == "fedavg" else []
    cfg = load_config(overrides=[*tiny_overrides, *DP, *extra, "save_adapters=false"])
    summary = run(cfg)
    peers = summary["privacy"]["peers"]
    expected = [planned_steps(cfg, build_algorithm(algorithm, cfg), p["peer"]) for p in peers]
    assert [p["steps"] for p in peers] == expected
    if algorithm == "centralized":  # one pooled model: 4 clients x 1 step per round, q over all 600 examples
        assert expected == [12] and peers[0]["examples"] == 600 and peers[0]["sample_rate"] == 8 / 600
    if algorithm == "fedavg":  # 2 of 4 clients per round: some peers take fewer steps and spend less
        assert sum(expected) == 3 * 2 and len({p["epsilon"] for p in peers}) > 1


def test_per_example_grads_of_a_causal_lm_equal_single_example_backward_passes(
    tiny_llama: Path, sst2_small: Path
) -> None:
    from declora.model.loading import forward_with

    out = tiny_llama
    overrides = [f"model.name_or_path={out}", "model.task_type=causal_lm", f"data.path={sst2_small}", "peft.r=4"]
    s, client, batch = _setup_batch([*overrides, "train.clients=4", *DP, "privacy.noise_multiplier=1"], size=5)
    s.model.eval()
    grads, losses = per_example_grads(s.model, client.params, batch, causal=True)
    for k in range(5):  # right-padded prompts + answers of different lengths; each alone, unpadded
        width = int(batch["attention_mask"][k].sum())
        one = {key: v[k : k + 1, :width] for key, v in batch.items()}
        params = {n: p.detach().clone().requires_grad_(p.requires_grad) for n, p in client.params.items()}
        loss = forward_with(s.model, params, one).loss
        loss.backward()
        assert losses[k].item() == pytest.approx(loss.item(), rel=1e-5)
        for n, p in params.items():
            if p.requires_grad:
                torch.testing.assert_close(grads[n][k], p.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.distributed
def test_four_process_dp_run_equals_the_simulation(tiny_overrides: list[str], tmp_path: Path) -> None:
    """One process per peer: the same noise (seeded per peer and step), batches, epsilons and rows."""
    from ranks import assert_rows_close, launch_ranks, simulate

    args = [a for a in tiny_overrides if not a.startswith("out_dir=")]
    args += [*DP, "privacy.noise_multiplier=1.0", "save_adapters=false"]
    sim = simulate(args, f"out_dir={tmp_path / 'sim'}")
    ranks = launch_ranks(4, [*args, f"out_dir={tmp_path / 'dist'}"], tmp_path)
    assert [r.rc for r in ranks] == [0, 0, 0, 0], "\n".join(r.log[-2000:] for r in ranks)
    rows = read_metrics(tmp_path / "dist")
    assert_rows_close(rows, read_metrics(sim["run_dir"]))
    own = [read_metrics(tmp_path / "dist" / "ranks" / f"rank_{r}")[-1]["epsilon"] for r in range(4)]
    assert own == rows[-1]["epsilon_per_peer"]
    summary = json.loads((tmp_path / "dist" / "summary.json").read_text())
    assert summary["privacy"]["peers"] == sim["privacy"]["peers"]


@pytest.mark.distributed
def test_three_swarm_peers_spend_the_epsilon_of_the_simulation(tiny_overrides: list[str], tmp_path: Path) -> None:
    """runtime=swarm (3 peers on loopback): each peer reports its own (epsilon, sigma, q, steps), the same
    as that peer in the simulation of the same config, with physical batches and a target epsilon."""
    pytest.importorskip("hivemind")
    from comm.test_swarm import _swarm  # tests/comm/test_swarm.py: runs `declora swarm`, kills every peer after

    args = [o for o in tiny_overrides if not o.startswith(("out_dir=", "train.clients="))]
    args += [*DP, "privacy.target_epsilon=4", "privacy.physical_batch_size=3", "save_adapters=false"]
    sim = run(load_config(overrides=[*args, "train.clients=3", f"out_dir={tmp_path / 'sim'}"]))
    rc, log = _swarm(tmp_path / "swarm", 3, [*args, "swarm.round_timeout_s=60"])
    assert rc == 0, log[-3000:]
    expected = {p["peer"]: p for p in sim["privacy"]["peers"]}
    last = read_metrics(sim["run_dir"])[-1]
    for i in range(3):
        own = json.loads((tmp_path / "swarm" / f"peer_{i}" / "summary.json").read_text())
        assert own["privacy"]["peers"] == [expected[i]], i
        assert read_metrics(tmp_path / "swarm" / f"peer_{i}")[-1]["epsilon_per_peer"] == [last["epsilon_per_peer"][i]]
    assert 4 - 0.011 <= max(p["epsilon"] for p in expected.values()) <= 4
