"""Every peft.method trains through the shared model and gossips exactly its trainable tensors."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from declora.comm import InProcessCommunicator
from declora.config import ConfigError, load_config
from declora.model.loading import build_model, forward_with, load_tokenizer, trainable_state
from declora.training.trainer import run

# What each method may train besides the head (pooler + classifier of the tiny BERT).
ADAPTER_NAMES = {
    "lora": r"\.lora_[AB]\.default\.weight$",
    "prompt_tuning": r"^prompt_encoder\.default\.embedding\.weight$",
    "prefix_tuning": r"^prompt_encoder\.default\.embedding\.weight$",
    "p_tuning": r"^prompt_encoder\.default\.(embedding|mlp_head\.\d)\.(weight|bias)$",
    "ia3": r"\.ia3_l\.default$",
    "head_only": r"$^",
}
HEAD = r"(classifier|pooler)(\.modules_to_save\.default)?\.(dense\.)?(weight|bias)$"
SMALL = ["peft.num_virtual_tokens=4", "peft.encoder_hidden_size=8"]


class RecordingCommunicator(InProcessCommunicator):
    """The simulation, remembering the tensor names of every message it carried."""

    def __init__(self, num_clients: int) -> None:
        super().__init__(num_clients)
        self.sent_names: set[str] = set()

    def exchange(self, messages, W):  # noqa: ANN001, ANN201
        for message in messages.values():
            self.sent_names |= set(message)
        return super().exchange(messages, W)


def _initial_state(overrides: list[str]) -> dict[str, torch.Tensor]:
    cfg = load_config(overrides=overrides)
    return trainable_state(build_model(cfg.model, cfg.peft, 2, cfg.train.seed))


@pytest.mark.parametrize("method", list(ADAPTER_NAMES))
def test_each_method_trains_two_rounds_and_gossips_only_its_trainable_tensors(
    method: str, tiny_overrides: list[str]
) -> None:
    overrides = [*tiny_overrides, f"peft.method={method}", *SMALL]
    init = _initial_state(overrides)
    adapter = [n for n in init if re.search(ADAPTER_NAMES[method], n)]
    assert all(re.search(HEAD, n) for n in init if n not in adapter), sorted(init)
    assert bool(adapter) == (method != "head_only")

    comm = RecordingCommunicator(4)
    summary = run(load_config(overrides=overrides), comm=comm)
    assert comm.sent_names == set(init)  # exactly the trainable tensors, nothing of the frozen base
    assert summary["peft_method"] == method and summary["rounds"] == 2
    assert summary["trainable_params"] == sum(t.numel() for t in init.values())
    assert summary["message_bytes"] == 4 * summary["trainable_params"]
    assert summary["total_bytes_sent"] == 2 * 4 * 2 * summary["message_bytes"]  # 2 rounds, ring of 4
    assert np.isfinite(summary["final_consensus_error"]) and summary["final_consensus_error"] > 0


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning", "p_tuning", "ia3", "head_only"])
def test_gradients_reach_the_clients_tensors_through_the_shared_model(method: str, tiny_overrides: list[str]) -> None:
    overrides = [*tiny_overrides, f"peft.method={method}", *SMALL]
    cfg = load_config(overrides=overrides)
    model = build_model(cfg.model, cfg.peft, 2, 0)
    state = {n: t.clone().requires_grad_(True) for n, t in trainable_state(model).items()}
    model.requires_grad_(False)  # as in the trainer: the shared module holds no trainable tensor
    tok = load_tokenizer(cfg.model)
    batch = dict(tok(["a fine, warm film", "dull"], padding=True, return_tensors="pt"))
    batch.pop("token_type_ids")
    batch["labels"] = torch.tensor([1, 0])
    model.train()
    forward_with(model, state, batch).loss.backward()
    for name, tensor in state.items():
        assert tensor.grad is not None and tensor.grad.abs().sum() > 0, name
    # and the client's tensors, not the module's, are what the forward pass uses
    model.eval()
    with torch.no_grad():
        base = forward_with(model, state, batch).logits
        moved = forward_with(model, {n: t + 0.5 for n, t in state.items()}, batch).logits
    assert not torch.allclose(base, moved)


def test_prefix_tuning_masks_padding_like_an_unpadded_batch(tiny_overrides: list[str]) -> None:
    cfg = load_config(overrides=[*tiny_overrides, "peft.method=prefix_tuning", *SMALL])
    model = build_model(cfg.model, cfg.peft, 2, 0).eval()
    state = {n: t + 0.1 * torch.randn_like(t) for n, t in trainable_state(model).items()}
    tok = load_tokenizer(cfg.model)
    padded = dict(tok(["short", "a much longer sentence than the first"], padding=True, return_tensors="pt"))
    alone = dict(tok(["short"], return_tensors="pt"))
    with torch.no_grad():
        a = forward_with(model, state, {k: v[:1] for k, v in padded.items()}).logits
        b = forward_with(model, state, alone).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_head_only_saves_the_head_tensors(tiny_overrides: list[str]) -> None:
    from safetensors.torch import load_file

    summary = run(load_config(overrides=[*tiny_overrides, "peft.method=head_only", "train.rounds=1"]))
    head = load_file(str(Path(summary["run_dir"]) / "adapters" / "client_0" / "head.safetensors"))
    assert sorted(head) == [
        "bert.pooler.dense.bias",
        "bert.pooler.dense.weight",
        "classifier.bias",
        "classifier.weight",
    ]


def test_bad_peft_options_stop_before_training(tiny_overrides: list[str]) -> None:
    with pytest.raises(ConfigError, match="peft.method"):
        load_config(overrides=[*tiny_overrides, "peft.method=adalora"])
    with pytest.raises(ConfigError, match="peft.num_virtual_tokens"):
        load_config(overrides=[*tiny_overrides, "peft.method=prompt_tuning", "peft.num_virtual_tokens=0"])
    with pytest.raises(ConfigError, match="peft.prompt_tuning_init_text"):
        load_config(overrides=[*tiny_overrides, "peft.prompt_tuning_init=TEXT"])
    cfg = load_config(overrides=[*tiny_overrides, "peft.method=ia3", "peft.target_modules=[nothing]"])
    with pytest.raises(ConfigError, match="peft.target_modules"):
        build_model(cfg.model, cfg.peft, 2, 0)


def test_building_the_model_leaves_the_users_peft_lists_as_written(tiny_overrides: list[str]) -> None:
    """peft extends modules_to_save in place for SEQ_CLS; the config (and config.yaml) must keep the user's lists."""
    cfg = load_config(overrides=[*tiny_overrides, "peft.modules_to_save=[classifier]", "peft.target_modules=[query]"])
    model = build_model(cfg.model, cfg.peft, 2, cfg.train.seed)
    assert cfg.peft.modules_to_save == ["classifier"]
    assert cfg.peft.target_modules == ["query"]
    assert any(".lora_A." in name for name in trainable_state(model))
