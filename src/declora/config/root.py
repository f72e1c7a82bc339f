"""The whole run configuration, :class:`Config`, and the checks that span its sections."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from declora.config.byzantine import ByzantineConfig, check_byzantine
from declora.config.comm import CommConfig
from declora.config.data import DataConfig
from declora.config.eval import EvalConfig
from declora.config.fields import _check_finite, _choice, _f
from declora.config.model import ModelConfig
from declora.config.partition import PartitionConfig
from declora.config.peft import PeftConfig
from declora.config.privacy import PrivacyConfig
from declora.config.swarm import SwarmConfig
from declora.config.topology import TopologyConfig
from declora.config.train import TrainConfig, check_batch_clients
from declora.errors import ConfigError
from declora.rundir.layout import CONFIG  # names only: imports nothing of declora


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
    byzantine: ByzantineConfig = field(default_factory=ByzantineConfig)
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
        check_batch_clients(self)  # train.batch_clients=true where it cannot run
        check_byzantine(self)  # attackers and robust rules against clients, algorithm, task
        if (self.comm.bits != 32 or self.comm.error_feedback) and self.train.algorithm != "dec_lora":
            raise ConfigError(
                f"comm.bits/comm.error_feedback compress dec_lora's gossip; train.algorithm={self.train.algorithm} "
                "sends exact messages: set comm.bits=32 comm.error_feedback=false"
            )
        if self.checkpoint_every < 0:
            raise ConfigError(f"checkpoint_every={self.checkpoint_every} must be >= 0 (0 = never)")
        if self.checkpoint_keep < 1:
            raise ConfigError(f"checkpoint_keep={self.checkpoint_keep} must be >= 1 (the newest checkpoint)")
        if self.resume is not None and not (Path(self.resume) / CONFIG).is_file():
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


def _check_privacy(cfg: Config) -> None:
    """DP-SGD against the options it cannot run with (prompt methods and quantized bases need the vmap path)."""
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
    if cfg.train.grad_accumulation > 1:  # each micro-batch would be its own noised, accounted step
        b, k = cfg.train.batch_size, cfg.train.grad_accumulation
        raise ConfigError(
            f"privacy.mechanism=dp_sgd noises every micro-batch of train.grad_accumulation={k}: use "
            f"train.batch_size={b * k} privacy.physical_batch_size={b} (one noise draw per optimizer step)"
        )
