"""``peft.*``: what is trained on the frozen base (peft's vocabulary: ``r``, ``lora_alpha``, ``target_modules``)."""

from __future__ import annotations

from dataclasses import dataclass

from declora.config.fields import _choice, _f, _positive
from declora.errors import ConfigError


@dataclass
class PeftConfig:
    method: str = _f(
        "lora",
        "lora, prompt_tuning, prefix_tuning, p_tuning (peft PromptEncoder), ia3, or head_only (no adapter: "
        "only the task head is trained). Whatever is trainable is what clients gossip.",
    )
    r: int = _f(16, "LoRA rank (peft LoraConfig.r).")
    lora_alpha: float = _f(16.0, "LoRA scaling numerator: the update is (lora_alpha / r) * B A.")
    lora_dropout: float = _f(0.0, "Dropout on the LoRA input (peft LoraConfig.lora_dropout).")
    ranks: list[int] | None = _f(
        None,
        "Heterogeneous LoRA ranks, one per peer (a shorter list repeats over the peers, e.g. [2, 4, 8, 16]); "
        "peft.r must be max(ranks). Peers mix the products B A and re-factor to their own rank "
        "(train.algorithm=dec_decaf, or local). null = every peer has rank peft.r.",
    )
    target_modules: list[str] | None = _f(
        None, "Module names that get adapters; null = peft's default for the architecture."
    )
    modules_to_save: list[str] | None = _f(
        None, "Fully trained (and gossiped) modules; null = the task head: classifier (+ pooler for BERT)."
    )
    num_virtual_tokens: int = _f(20, "Virtual tokens of prompt_tuning, prefix_tuning and p_tuning.")
    prompt_tuning_init: str = _f(
        "RANDOM", "prompt_tuning: RANDOM, or TEXT (initialise the prompt from prompt_tuning_init_text)."
    )
    prompt_tuning_init_text: str | None = _f(None, "prompt_tuning with prompt_tuning_init=TEXT: the text.")
    encoder_hidden_size: int | None = _f(
        None, "Hidden size of p_tuning's prompt encoder (and of prefix_projection); null = the model's."
    )
    encoder_reparameterization_type: str = _f("MLP", "p_tuning's prompt encoder: MLP or LSTM.")
    prefix_projection: bool = _f(False, "prefix_tuning: reparameterise the prefix through an MLP.")
    feedforward_modules: list[str] | None = _f(
        None, "ia3: target modules scaled on their input (feed-forward); null = peft's default."
    )

    def __post_init__(self) -> None:
        _choice(
            "peft.method",
            self.method,
            ("lora", "prompt_tuning", "prefix_tuning", "p_tuning", "ia3", "head_only"),
        )
        if self.num_virtual_tokens < 1:
            raise ConfigError(f"peft.num_virtual_tokens={self.num_virtual_tokens} must be >= 1")
        _choice("peft.prompt_tuning_init", self.prompt_tuning_init, ("RANDOM", "TEXT"))
        if self.prompt_tuning_init == "TEXT" and not self.prompt_tuning_init_text:
            raise ConfigError("peft.prompt_tuning_init=TEXT needs peft.prompt_tuning_init_text")
        _choice("peft.encoder_reparameterization_type", self.encoder_reparameterization_type, ("MLP", "LSTM"))
        if self.encoder_hidden_size is not None and self.encoder_hidden_size < 1:
            raise ConfigError(f"peft.encoder_hidden_size={self.encoder_hidden_size} must be >= 1 or null")
        if self.r < 1:
            raise ConfigError(f"peft.r={self.r} must be >= 1 (the paper uses 2 to 16)")
        if self.ranks is not None:
            if not self.ranks or any(r < 1 for r in self.ranks):
                raise ConfigError(f"peft.ranks={self.ranks} must list ranks >= 1, e.g. [2, 4, 8, 16]")
            if self.method != "lora":
                raise ConfigError(f"peft.ranks applies to peft.method=lora; unset it for peft.method={self.method}")
            if max(self.ranks) != self.r:
                raise ConfigError(
                    f"peft.ranks={self.ranks}: the shared model is built at the largest rank: "
                    f"set peft.r={max(self.ranks)}"
                )
        _positive("peft.lora_alpha", self.lora_alpha)
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"peft.lora_dropout={self.lora_dropout} must be in [0, 1)")
