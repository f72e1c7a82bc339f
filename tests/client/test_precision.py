"""Mixed precision for the trainable path: refusals up front, pass-through when off, bf16 runs
(declora.client.precision; from test_throughput.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from declora.client.precision import autocast, check_mixed_precision, cpu_has_native_bf16, grad_scaler
from declora.config import ConfigError, load_config
from declora.rundir.layout import read_metrics
from declora.training.trainer import run


def test_mixed_precision_refusals(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match=r"^train\.mixed_precision=fp16 needs a CUDA GPU"):
        check_mixed_precision("fp16", torch.device("cpu"))
    with pytest.raises(ConfigError, match="train.mixed_precision='fp8' is not one of no, bf16, fp16"):
        load_config(overrides=["train.mixed_precision=fp8"])
    monkeypatch.setattr("declora.client.precision.cpu_has_native_bf16", lambda: False)
    with pytest.raises(ConfigError, match="AVX512-BF16/AMX") as err:
        check_mixed_precision("bf16", torch.device("cpu"))
    assert "\n" not in str(err.value)
    check_mixed_precision("no", torch.device("cpu"))


def test_refusal_comes_before_the_model_loads(tiny_overrides: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    def no_model(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the mixed-precision check")

    monkeypatch.setattr("declora.training.setup.build_model", no_model)
    monkeypatch.setattr("declora.training.setup.load_tokenizer", no_model)
    with pytest.raises(ConfigError, match="fp16"):
        run(load_config(overrides=[*tiny_overrides, "train.mixed_precision=fp16", "model.device=cpu"]))


def test_autocast_and_scaler_pass_through_when_off() -> None:
    lin = torch.nn.Linear(4, 4)
    with autocast("no", torch.device("cpu")):
        assert lin(torch.ones(1, 4)).dtype == torch.float32
    with autocast("bf16", torch.device("cpu")):
        assert lin(torch.ones(1, 4)).dtype == torch.bfloat16
    scaler = grad_scaler("no")
    loss = torch.tensor(2.0)
    assert scaler.scale(loss) is loss and scaler.state_dict() == {}


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no native bfloat16")
def test_bf16_and_grouped_runs_on_the_tiny_model(tiny_overrides: list[str], tmp_path: Path) -> None:
    base = [o for o in tiny_overrides if not o.startswith("out_dir")] + ["eval.clients=false", "save_adapters=false"]
    rows = {}
    for name, extra in {
        "fp32": [],
        "bf16": ["train.mixed_precision=bf16"],
        "grouped": ["data.group_by_length=true"],
    }.items():
        summary = run(load_config(overrides=[*base, *extra, f"out_dir={tmp_path / name}"]))
        rows[name] = read_metrics(Path(summary["run_dir"]))
    loss = {k: [r["train_loss"] for r in v] for k, v in rows.items()}
    assert all(np.isfinite(v).all() for v in loss.values())
    assert loss["bf16"] != loss["fp32"]  # autocast is on: bf16 matmuls round differently ...
    assert np.allclose(loss["bf16"], loss["fp32"], atol=0.05)  # ... but train the same model
    assert loss["grouped"] != loss["fp32"]  # other batches
