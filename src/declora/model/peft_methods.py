"""``peft.method`` -> a peft config, the wrapped model, and how its trainable tensors are saved.

Every method goes through peft's own config class; only ``head_only`` has no adapter (the frozen base
with its task head trainable). Whatever ends up with ``requires_grad`` is what a client trains and
gossips, so adding a method here is all an algorithm needs.

=============  ===========================  ============================================
peft.method    peft config                  trainable tensors (besides the head)
=============  ===========================  ============================================
lora           ``LoraConfig``               ``lora_A`` (r, d_in), ``lora_B`` (d_out, r)
prompt_tuning  ``PromptTuningConfig``       ``prompt_encoder.<a>.embedding`` (v, d)
prefix_tuning  ``PrefixTuningConfig``       ``prompt_encoder.<a>.embedding`` (v, 2 L d)
p_tuning       ``PromptEncoderConfig``      the prompt embedding and its MLP/LSTM encoder
ia3            ``IA3Config``                ``ia3_l`` scaling vectors
head_only      none                         none
=============  ===========================  ============================================
"""

from __future__ import annotations

import inspect
import types
from pathlib import Path
from typing import Any

import torch
from torch import nn

from declora.config import ConfigError, PeftConfig

METHODS = ("lora", "prompt_tuning", "prefix_tuning", "p_tuning", "ia3", "head_only")


def make_peft_config(
    cfg: PeftConfig, modules_to_save: list[str], tokenizer_path: str, task_type: str = "SEQ_CLS"
) -> Any:
    """The peft config of ``cfg.method`` (None for ``head_only``), keyword names as in peft.

    Args:
        cfg: the ``peft`` section of the run config.
        modules_to_save: the fully trained task head (peft ``modules_to_save``).
        tokenizer_path: where prompt_tuning with ``prompt_tuning_init=TEXT`` finds the tokenizer.
        task_type: a ``peft.TaskType`` name.
    """
    import peft

    # peft extends these lists in place (SEQ_CLS adds "classifier", "score"): hand it copies, so the user's
    # config (and the config.yaml recorded from it) keeps what was written.
    common: dict[str, Any] = {"task_type": peft.TaskType[task_type], "modules_to_save": list(modules_to_save)}
    prompt = {"num_virtual_tokens": cfg.num_virtual_tokens}
    if cfg.method == "lora":
        return peft.LoraConfig(
            r=cfg.r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=list(cfg.target_modules) if cfg.target_modules is not None else None,
            **common,
        )
    if cfg.method == "prompt_tuning":
        text = cfg.prompt_tuning_init == "TEXT"
        return peft.PromptTuningConfig(
            prompt_tuning_init=peft.PromptTuningInit[cfg.prompt_tuning_init],
            prompt_tuning_init_text=cfg.prompt_tuning_init_text if text else None,
            tokenizer_name_or_path=tokenizer_path if text else None,
            **prompt,
            **common,
        )
    if cfg.method == "prefix_tuning":
        hidden = {"encoder_hidden_size": cfg.encoder_hidden_size} if cfg.encoder_hidden_size else {}
        return peft.PrefixTuningConfig(prefix_projection=cfg.prefix_projection, **hidden, **prompt, **common)
    if cfg.method == "p_tuning":
        hidden = {"encoder_hidden_size": cfg.encoder_hidden_size} if cfg.encoder_hidden_size else {}
        return peft.PromptEncoderConfig(
            encoder_reparameterization_type=cfg.encoder_reparameterization_type, **hidden, **prompt, **common
        )
    if cfg.method == "ia3":
        return peft.IA3Config(target_modules=cfg.target_modules, feedforward_modules=cfg.feedforward_modules, **common)
    if cfg.method == "head_only":
        return None
    raise ConfigError(f"peft.method={cfg.method!r} is not one of {', '.join(METHODS)}")


def wrap_model(
    base: nn.Module, cfg: PeftConfig, modules_to_save: list[str], tokenizer_path: str, task_type: str = "SEQ_CLS"
) -> nn.Module:
    """``get_peft_model`` with the config of ``cfg.method``; ``head_only`` freezes all but the head.

    Raises:
        ConfigError: peft rejects the options (e.g. ``peft.target_modules`` matches nothing).
    """
    from peft import get_peft_model

    peft_cfg = make_peft_config(cfg, modules_to_save, tokenizer_path, task_type)
    if peft_cfg is None:
        return _head_only(base, modules_to_save)
    try:
        model = get_peft_model(base, peft_cfg)
    except ValueError as err:  # peft's NoMatchingPeftModuleError is a ValueError
        option = "peft.feedforward_modules" if "feedforward" in str(err) else "peft.target_modules"
        raise ConfigError(f"{option}: {str(err).splitlines()[0]} (peft.method={cfg.method})") from None
    if cfg.method == "prefix_tuning":
        _use_cache_argument_for_prefixes(model)
    return model


def _head_only(base: nn.Module, modules_to_save: list[str]) -> nn.Module:
    base.requires_grad_(False)
    found = False
    for name, module in base.named_modules():
        if any(name == m or name.endswith(f".{m}") for m in modules_to_save):
            module.requires_grad_(True)
            found = True
    if not found:
        raise ConfigError(f"peft.modules_to_save={modules_to_save} matches no module of the model")
    return base


def _use_cache_argument_for_prefixes(model: nn.Module) -> None:
    """Let prefix tuning run on encoders whose forward calls the key/value cache ``cache``.

    peft (0.21) feeds the prefixes to the backbone as ``past_key_values=`` and refuses models whose
    ``forward`` has no argument of that name; transformers 5 renamed it ``cache`` in BERT-style encoders.
    This replaces, on this one instance, peft's fallback ``_prefix_tuning_forward`` by the same steps with
    the new argument name: prefixes from ``get_prompt`` -> backbone -> pooled output -> dropout -> head.
    peft has already prepended the prefix's ones to ``attention_mask``. Models that accept
    ``past_key_values`` are left to peft.
    """
    base = model.base_model
    top = inspect.signature(base.forward).parameters
    backbone = base.get_submodule(model.transformer_backbone_name)
    inner = inspect.signature(backbone.forward).parameters
    if "past_key_values" in top or "past_key_values" in inner or "cache" not in inner:
        return

    def _prefix_tuning_forward(
        self: Any,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> Any:
        from transformers.modeling_outputs import SequenceClassifierOutput

        batch_size = (input_ids if input_ids is not None else inputs_embeds).shape[0]
        outputs = self.base_model.get_submodule(self.transformer_backbone_name)(
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            cache=self.get_prompt(batch_size),
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            **kwargs,
        )
        pooled = outputs.pooler_output if outputs.pooler_output is not None else outputs.last_hidden_state[:, 0]
        if hasattr(self.base_model, "dropout"):
            pooled = self.base_model.dropout(pooled)
        logits = self.base_model.get_submodule(self.cls_layer_name)(pooled)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1))
        return SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states)

    model._prefix_tuning_forward = types.MethodType(_prefix_tuning_forward, model)


def save_trainable(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Save a client's trained tensors ``state`` (already loaded into ``model``) into the folder ``path``.

    peft models: ``save_pretrained`` (adapter_config.json + adapter_model.safetensors). ``head_only``
    (no peft wrapper): the head tensors as ``head.safetensors``, named as in the model.
    """
    if hasattr(model, "peft_config"):
        model.save_pretrained(str(path))
        return
    from safetensors.torch import save_file

    from declora.rundir.layout import HEAD_WEIGHTS  # names only: imports nothing of declora

    path.mkdir(parents=True, exist_ok=True)
    save_file({n: t.detach().contiguous().cpu() for n, t in state.items()}, str(path / HEAD_WEIGHTS))
