"""A bitsandbytes-quantized frozen base (nf4/fp4/int8) on CPU with the tiny model; end-to-end comm.bits."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from declora.config import ConfigError, ModelConfig, PeftConfig, load_config
from declora.rundir.layout import read_metrics


def bnb_or_skip():
    """bitsandbytes, or a skip that says why it cannot run here."""
    try:
        import bitsandbytes as bnb

        from declora.model.quantized import check_quantization

        check_quantization(ModelConfig(quantization="nf4"), torch.device("cpu"))
    except (ImportError, ConfigError) as err:
        pytest.skip(f"bitsandbytes cannot run 4-bit layers on this machine: {err}")
    return bnb


def test_quantization_without_bitsandbytes_is_a_one_line_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from declora.model.quantized import check_quantization

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` fail
    with pytest.raises(ConfigError) as err:
        check_quantization(ModelConfig(quantization="nf4"), torch.device("cpu"))
    message = str(err.value)
    assert "\n" not in message and "model.quantization=nf4" in message and "declora[quant]" in message
    check_quantization(ModelConfig(quantization="none"), torch.device("cpu"))  # nothing to check


def test_quantization_option_is_validated() -> None:
    with pytest.raises(ConfigError, match="model.quantization"):
        load_config(overrides=["model.quantization=int4"])
    with pytest.raises(ConfigError, match="comm.bits"):
        load_config(overrides=["comm.bits=3"])
    with pytest.raises(ConfigError, match="comm.consensus_step"):
        load_config(overrides=["comm.error_feedback=true", "comm.consensus_step=1.5"])
    with pytest.raises(ConfigError, match="train.algorithm=local"):
        load_config(overrides=["comm.bits=4", "train.algorithm=local"])


@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8"])
def test_quantized_base_loads_and_trains_two_steps_on_cpu(kind: str, tiny_bert: Path) -> None:
    bnb = bnb_or_skip()
    from declora.model.loading import build_model, forward_with, trainable_state

    model_cfg = ModelConfig(name_or_path=str(tiny_bert), quantization=kind, device="cpu")
    model = build_model(model_cfg, PeftConfig(r=4), num_labels=2, seed=0)
    layer_type = bnb.nn.Linear8bitLt if kind == "int8" else bnb.nn.Linear4bit
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, layer_type)}
    assert len(quantized) == 2 * 6  # q, k, v, attention output, intermediate, output of both layers
    assert not any("pooler" in n or "classifier" in n for n in quantized)  # the trained head stays fp32
    frozen = {n: m.weight.detach().clone() for n, m in quantized.items()}
    assert all(w.dtype in (torch.uint8, torch.int8) for w in frozen.values())

    state = {n: t.requires_grad_(True) for n, t in trainable_state(model).items()}
    assert state and all(t.dtype == torch.float32 for t in state.values())  # adapters in full precision
    model.requires_grad_(False)
    start = {n: t.detach().clone() for n, t in state.items()}
    optimizer = torch.optim.AdamW(list(state.values()), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(1000, 2000, (8, 12), generator=g),
        "attention_mask": torch.ones(8, 12, dtype=torch.long),
        "labels": torch.randint(0, 2, (8,), generator=g),
    }
    losses = []
    for _ in range(2):
        loss = forward_with(model, state, batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    lora_b = [n for n in state if "lora_B" in n]
    assert lora_b and all(not torch.equal(state[n], start[n]) for n in lora_b)  # gradients flowed to LoRA
    for n, m in quantized.items():
        assert torch.equal(m.weight.detach(), frozen[n])  # the quantized base did not move


def test_base_model_bytes_count_packed_weights_and_their_constants(tiny_bert: Path) -> None:
    bnb = bnb_or_skip()
    from declora.model.loading import build_model, trainable_state
    from declora.model.quantized import base_model_bytes

    def built(kind: str):
        model = build_model(
            ModelConfig(name_or_path=str(tiny_bert), quantization=kind, device="cpu"), PeftConfig(r=4), 2, 0
        )
        return model, base_model_bytes(model, exclude=trainable_state(model))

    fp, fp_bytes = built("none")
    nf4, nf4_bytes = built("nf4")
    saved = 0
    for m in nf4.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            n, qs = m.in_features * m.out_features, m.weight.quant_state
            # fp32 weight -> n/2 bytes of 4-bit codes + one fp32 absmax per block + the 16-value code book
            saved += 4 * n - (n // 2 + 4 * -(-n // qs.blocksize) + qs.code.numel() * qs.code.element_size())
    assert saved > 0
    assert nf4_bytes == fp_bytes - saved
    assert fp_bytes == sum(
        p.numel() * p.element_size() for n, p in fp.named_parameters() if n not in trainable_state(fp)
    ) + sum(b.numel() * b.element_size() for b in fp.buffers())


def test_comm_bits_4_sends_an_eighth_of_the_fp32_bytes_plus_scales(tiny_overrides: list[str], tmp_path: Path) -> None:
    from declora.mixing.compress import Quantizer
    from declora.model.loading import build_model, trainable_state
    from declora.training.trainer import run

    def train(*extra: str) -> dict:
        return run(load_config(overrides=[*tiny_overrides, *extra]))

    fp32 = train(f"out_dir={tmp_path / 'fp32'}")
    four = train("comm.bits=4", f"out_dir={tmp_path / 'q4'}")
    choco = train("comm.bits=4", "comm.error_feedback=true", f"out_dir={tmp_path / 'ef'}")
    cfg = load_config(overrides=tiny_overrides)
    state = trainable_state(build_model(cfg.model, cfg.peft, 2, seed=0))  # what every client sends
    assert fp32["message_bytes"] == 4 * sum(t.numel() for t in state.values())
    payload = Quantizer(4).payload_bytes(state)
    scale_bytes = 4 * len(state)  # one fp32 scale per tensor
    assert payload == sum(-(-t.numel() // 2) for t in state.values()) + scale_bytes
    # ring of 4 clients: each sends its message to 2 neighbours per round
    for summary, message in ((fp32, fp32["message_bytes"]), (four, payload), (choco, payload)):
        rows = read_metrics(summary["run_dir"])
        assert [r["bytes_sent"] for r in rows] == [4 * 2 * message] * 2
        assert summary["total_bytes_sent"] == 2 * 4 * 2 * message
        assert summary["base_model_mb"] > 0 and 0.0 <= summary["best_accuracy"] <= 1.0
    ratio = four["total_bytes_sent"] / fp32["total_bytes_sent"]
    assert 1 / 8 <= ratio <= 1 / 8 + (scale_bytes + len(state)) / fp32["message_bytes"]
