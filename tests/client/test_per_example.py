"""Per-example gradients (declora.client.per_example): the hook path equals vmap and single-example passes."""

from __future__ import annotations

import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from declora.client import per_example
from declora.client.per_example import (
    HooksMissedGradient,
    hook_per_example_grads,
    hooks_apply,
    per_example_grads,
    per_example_losses,
    vmap_per_example_grads,
)
from declora.config import load_config
from declora.data.batches import collate
from declora.model.loading import forward_with
from declora.training.setup import make_clients, setup

pytestmark = pytest.mark.usefixtures("one_thread")


def _setup_batch(overrides: list[str], size: int = 6):
    """The model, client 0 and a batch of its ``size // 2`` shortest and ``size // 2`` longest examples."""
    s = setup(load_config(overrides=overrides))
    s.model.eval()  # no dropout: every computation sees the same function
    client = make_clients(s, [0])[0]
    part = np.asarray(s.parts[0])
    order = np.argsort([len(s.data.train.input_ids[i]) for i in part], kind="stable")
    pick = part[np.concatenate([order[: size // 2], order[-(size - size // 2) :]])]
    return s, client, collate(s.data.train, pick, s.data.pad_token_id, s.device)


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for n in a:
        assert a[n].dtype == torch.float32
        torch.testing.assert_close(a[n], b[n], rtol=1e-5, atol=1e-7)


def _single_example_passes(model: nn.Module, params, batch, grads, losses) -> None:
    """Each example alone, unpadded: transformers' own loss and autograd's gradient equal ours."""
    for k in range(len(batch["labels"])):
        width = int(batch["attention_mask"][k].sum())
        one = {key: (v[k : k + 1, :width] if v.dim() == 2 else v[k : k + 1]) for key, v in batch.items()}
        own = {n: p.detach().clone().requires_grad_(p.requires_grad) for n, p in params.items()}
        loss = forward_with(model, own, one).loss
        loss.backward()
        assert losses[k].item() == pytest.approx(loss.item(), rel=1e-5)
        for n, p in own.items():
            if p.requires_grad:
                torch.testing.assert_close(grads[n][k], p.grad, rtol=1e-4, atol=1e-6)


def test_lora_on_bert_by_hooks_equals_vmap_and_single_example_passes(tiny_overrides: list[str]) -> None:
    s, client, batch = _setup_batch([*tiny_overrides, "peft.target_modules=[query,value]"])
    widths = batch["attention_mask"].sum(1)
    assert widths.max() >= 3 * widths.min()  # very different lengths: most of the short rows are padding
    trained = [n for n, p in client.params.items() if p.requires_grad]
    assert any("lora_A" in n for n in trained) and any("classifier" in n for n in trained)
    assert hooks_apply(s.model, client.params)
    hooks, losses = hook_per_example_grads(s.model, client.params, batch)
    vmapped, vlosses = vmap_per_example_grads(s.model, client.params, batch)
    _assert_same(hooks, vmapped)
    torch.testing.assert_close(losses, vlosses, rtol=1e-5, atol=1e-7)
    assert all(hooks[n].abs().sum() > 0 for n in trained if "lora_A" not in n)  # B = 0 at init: A's are 0
    _single_example_passes(s.model, client.params, batch, hooks, losses)


def test_dec_ffa_lora_trains_b_and_the_head_and_hooks_equal_vmap(tiny_overrides: list[str]) -> None:
    recipe = ["train.algorithm=dec_ffa_lora", "peft.target_modules=[query,value,pooler.dense]"]
    s, client, batch = _setup_batch([*tiny_overrides, *recipe, "peft.modules_to_save=[classifier]"])
    with torch.no_grad():  # B away from 0, so that the frozen A passes a gradient to the layers below
        for n, p in client.params.items():
            if "lora_B" in n:
                p.normal_(std=0.1, generator=torch.Generator().manual_seed(len(n)))
    trained = [n for n, p in client.params.items() if p.requires_grad]
    assert trained and not any("lora_A" in n for n in trained) and any("pooler" in n for n in trained)
    assert hooks_apply(s.model, client.params)
    hooks, losses = hook_per_example_grads(s.model, client.params, batch)
    vmapped, vlosses = vmap_per_example_grads(s.model, client.params, batch)
    _assert_same(hooks, vmapped)
    torch.testing.assert_close(losses, vlosses, rtol=1e-5, atol=1e-7)


def test_causal_lm_by_hooks_equals_vmap_and_transformers_loss(tiny_llama: Path, sst2_small: Path) -> None:
    overrides = [f"model.name_or_path={tiny_llama}", "model.task_type=causal_lm", f"data.path={sst2_small}"]
    s, client, batch = _setup_batch([*overrides, "peft.r=4", "train.clients=4"], size=5)
    assert batch["labels"].dim() == 2 and (batch["labels"] == -100).any()
    assert hooks_apply(s.model, client.params, causal=True)
    hooks, losses = hook_per_example_grads(s.model, client.params, batch, causal=True)
    vmapped, vlosses = vmap_per_example_grads(s.model, client.params, batch, causal=True)
    _assert_same(hooks, vmapped)
    torch.testing.assert_close(losses, vlosses, rtol=1e-5, atol=1e-7)
    _single_example_passes(s.model, client.params, batch, hooks, losses)


def test_a_causal_example_without_targets_has_loss_and_gradient_zero(tiny_llama: Path, sst2_small: Path) -> None:
    overrides = [f"model.name_or_path={tiny_llama}", "model.task_type=causal_lm", f"data.path={sst2_small}"]
    s, client, batch = _setup_batch([*overrides, "peft.r=4", "train.clients=4"], size=3)
    batch["labels"][1] = -100  # vmap gives NaN here (transformers' mean over no tokens)
    hooks, losses = hook_per_example_grads(s.model, client.params, batch, causal=True)
    assert losses[1] == 0 and losses[0] > 0 and losses[2] > 0
    assert all(g[1].abs().max() == 0 for g in hooks.values())
    assert any(g[0].abs().max() > 0 for g in hooks.values())


def test_per_example_losses_are_the_mean_over_each_example_s_targets() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 5, generator=gen)
    labels = torch.tensor([[-100, 1, 2, -100], [-100, -100, -100, 4]])
    ce = nn.functional.cross_entropy
    first = (ce(logits[0, 0:1], labels[0, 1:2]) + ce(logits[0, 1:2], labels[0, 2:3])) / 2  # targets 1, 2
    expected = [first, ce(logits[1, 2:3], labels[1, 3:])]  # one target: the last token
    torch.testing.assert_close(per_example_losses(logits, labels, causal=True), torch.stack(expected))


def test_ia3_falls_back_to_vmap_and_equals_single_example_passes(
    tiny_overrides: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    s, client, batch = _setup_batch([*tiny_overrides, "peft.method=ia3"], size=4)
    assert not hooks_apply(s.model, client.params)
    with pytest.raises(ValueError, match="not the weight or bias of an nn.Linear"):
        hook_per_example_grads(s.model, client.params, batch)
    calls = []
    vmap = per_example.vmap_per_example_grads
    monkeypatch.setattr(per_example, "vmap_per_example_grads", lambda *a, **k: calls.append(1) or vmap(*a, **k))
    grads, losses = per_example_grads(s.model, client.params, batch)
    assert calls == [1]
    _single_example_passes(s.model, client.params, batch, grads, losses)


def test_a_trained_layer_norm_or_a_regression_head_takes_vmap(tiny_overrides: list[str]) -> None:
    s, client, batch = _setup_batch(tiny_overrides, size=4)
    assert hooks_apply(s.model, client.params)
    norm, weight = next((n, p) for n, p in s.model.named_parameters() if "LayerNorm.weight" in n)
    with_norm = dict(client.params) | {norm: weight.detach().clone().requires_grad_()}
    assert not hooks_apply(s.model, with_norm)
    s.model.config.problem_type = "regression"
    assert not hooks_apply(s.model, client.params)
    s.model.config.problem_type = None


def test_hooks_are_removed_and_the_client_s_grads_untouched(tiny_overrides: list[str]) -> None:
    s, client, batch = _setup_batch(tiny_overrides, size=4)
    per_example_grads(s.model, client.params, batch)
    for module in s.model.modules():
        assert not module._forward_hooks and not module._forward_hooks_with_kwargs
    assert all(p.grad is None for p in client.params.values())


class _Shared(nn.Module):
    """transformers-like (a ``config``, ``.logits``): one Linear called twice, and optionally its weight
    used a second time outside its forward (what the hooks cannot see)."""

    def __init__(self, leak: bool = False) -> None:
        super().__init__()
        self.config = SimpleNamespace(num_labels=3, problem_type=None)
        self.embed = nn.Embedding(11, 6)
        self.mix = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)
        self.leak = leak

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> SimpleNamespace:
        h = torch.tanh(self.mix(torch.tanh(self.mix(self.embed(input_ids))))).mean(1)
        if self.leak:
            h = h + h @ self.mix.weight
        logits = self.head(h)
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return SimpleNamespace(logits=logits, loss=loss)


def _shared_case(leak: bool):
    torch.manual_seed(0)
    net = _Shared(leak)
    net.embed.requires_grad_(False)
    params = {n: p.detach().clone().requires_grad_(p.requires_grad) for n, p in net.named_parameters()}
    batch = {"input_ids": torch.randint(0, 11, (5, 4)), "labels": torch.tensor([0, 1, 2, 1, 0])}
    return net, params, batch


def test_a_linear_called_twice_sums_its_calls() -> None:
    net, params, batch = _shared_case(leak=False)
    assert hooks_apply(net, params)
    _assert_same(hook_per_example_grads(net, params, batch)[0], vmap_per_example_grads(net, params, batch)[0])


def test_a_weight_used_outside_its_linear_is_caught_and_recomputed_by_vmap() -> None:
    net, params, batch = _shared_case(leak=True)
    assert hooks_apply(net, params)  # invisible to the static check: the guard on the sums sees it
    with pytest.raises(HooksMissedGradient, match="mix.weight"):
        hook_per_example_grads(net, params, batch)
    with pytest.warns(RuntimeWarning, match="using vmap"):
        grads, _ = per_example_grads(net, params, batch)
    _assert_same(grads, vmap_per_example_grads(net, params, batch)[0])


def test_tied_linear_weights_take_vmap() -> None:
    net, params, _ = _shared_case(leak=False)
    assert hooks_apply(net, params)
    net.twin = nn.Linear(6, 6)
    net.twin.weight = net.mix.weight  # one tensor, two modules: the hooks on mix would miss twin's use
    assert not hooks_apply(net, params)


def test_under_bf16_autocast_hooks_return_float32_close_to_float32(tiny_overrides: list[str]) -> None:
    s, client, batch = _setup_batch(tiny_overrides, size=4)
    exact, _ = hook_per_example_grads(s.model, client.params, batch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the guard must not fire under autocast
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low, _ = per_example_grads(s.model, client.params, batch)
    for n, g in low.items():
        assert g.dtype == torch.float32
        assert (g - exact[n]).norm() <= 0.05 * exact[n].norm() + 1e-6
