"""The end of a run: adapters (PEFT format), summary.json and plots, from the final client states."""

from __future__ import annotations

import resource
from typing import Any

import torch
from torch import nn

from declora.byzantine.report import byzantine_summary
from declora.client.client import Client
from declora.client.dp_sgd import summary as privacy_summary
from declora.client.guards import Guard
from declora.comm import Communicator
from declora.data.validation import select_best
from declora.mixing.churn import Churn
from declora.mixing.kernel import state_bytes
from declora.model.loading import load_state, num_parameters
from declora.model.peft_methods import save_trainable
from declora.model.quantized import base_model_bytes
from declora.partition import partition_counts
from declora.rundir import layout
from declora.rundir.adapters import describe_adapters, save_best
from declora.rundir.files import share_files
from declora.rundir.writer import RunDir
from declora.training.checkpoint import Progress
from declora.training.setup import Setup


def save_adapter(model: nn.Module, state: dict[str, torch.Tensor], path: Any) -> None:
    """peft ``save_pretrained`` into a temporary folder, then rename: a half-saved adapter never appears."""
    import shutil

    load_state(model, state)
    tmp = path.parent / f".{path.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_trainable(model, state, tmp)  # peft save_pretrained (head_only: head.safetensors)
    share_files(tmp)  # safetensors writes 0600: the umask decides, as for every run file
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def churn_summary(s: Setup, churn: Churn | None, rounds: int) -> dict[str, Any]:
    """summary.json's churn fields: rounds each peer missed (empty without churn) and peft.ranks per peer."""
    out: dict[str, Any] = {"missed_rounds": churn.missed_rounds(rounds)} if churn else {}
    return out | ({"peer_ranks": s.algorithm.ranks} if s.cfg.peft.ranks else {})


def finish(
    s: Setup,
    clients: dict[int, Client],
    comm: Communicator,
    rd: RunDir,
    progress: Progress,
    churn: Churn | None = None,
) -> dict[str, Any]:
    """Write adapters, summary.json and plots; returns the summary.

    Args:
        progress: rounds done (fewer than ``train.rounds`` when a callback stopped the run), the metrics
            rows, bytes and times.
        churn: the run's churn schedule (``missed_rounds`` in the summary), None without churn.
    """
    cfg = s.cfg
    members = churn.members(progress.round) if churn and progress.round else None  # left / not joined: out
    mean = s.algorithm.averaged(comm, {i: c.state() for i, c in clients.items()}, members)
    Guard(cfg.train.lr, rd.path).states(progress.round, {"average": mean}, "averaged model")  # never from NaN
    if cfg.save_adapters:
        save_adapters(s, clients, comm, rd, mean)
    summary = summarize(s, clients, comm, progress, churn) | {"run_dir": str(rd.path)}
    if cfg.runtime == "distributed":  # this rank's own wall time, memory and throughput
        rd.write_rank_summary(comm.rank, summary | {"rank": comm.rank})
    if comm.rank != 0:
        return summary
    rd.write_summary(summary)
    if cfg.save_adapters:  # portable base name, labels, model card (declora.rundir.adapters)
        describe_adapters(rd.path, cfg, summary, progress.history, s.tokenizer)
    if cfg.plots:
        plot(s, rd, summary, progress.history)
    rd.mark_done()
    return summary


def save_adapters(
    s: Setup, clients: dict[int, Client], comm: Communicator, rd: RunDir, mean: dict[str, torch.Tensor]
) -> None:
    """adapters/average (the reported model) and adapters/client_<i> (each local client's own)."""
    if comm.local_clients[0] == 0 and s.cfg.runtime != "swarm":  # a swarm peer has no global average
        save_best(s.model, mean, rd.adapter_dir(layout.AVERAGE), save_adapter)  # dec_decaf: at the mean's rank k
    for i, c in clients.items():
        save_adapter(s.model, c.state(), rd.adapter_dir(layout.client_adapter(i)))
        s.algorithm.finish_adapter(i, rd.adapter_dir(layout.client_adapter(i)))  # peft.ranks: cut to the peer's rank


def summarize(
    s: Setup, clients: dict[int, Client], comm: Communicator, progress: Progress, churn: Churn | None
) -> dict[str, Any]:
    """summary.json's fields (all but ``run_dir``)."""
    cfg, tc = s.cfg, s.cfg.train
    rounds, history, train_s = progress.round, progress.history, progress.train_s
    workers = s.algorithm.workers(tc)
    samples = rounds * s.algorithm.steps_per_round(tc) * tc.batch_size * tc.grad_accumulation * workers
    trained = {n: t for n, t in s.init.items() if s.algorithm.is_trained(n)}  # what clients train and send
    return {
        "algorithm": tc.algorithm,
        "model": cfg.model.name_or_path,
        "task": cfg.data.task,
        "clients": tc.clients,
        "rounds": rounds,
        "local_steps": tc.local_steps,
        "topology": cfg.topology.kind if s.topology else None,
        "mixing": cfg.topology.mixing if s.topology else None,
        "spectral_gap": s.topology.spectral_gap if s.topology else None,
        "mixing_rms": s.topology.rms_contraction if s.topology else None,
        "partition": cfg.partition.kind,
        **select_best(history),  # best_round on the validation split when there is one
        "final_accuracy": history[-1]["accuracy"],
        "final_client_accuracy_mean": history[-1]["client_accuracy_mean"],
        "final_consensus_error": history[-1]["consensus_error"],
        "total_bytes_sent": progress.total_bytes,
        "trainable_params": num_parameters(trained),
        "message_bytes": state_bytes(trained),
        "base_model_mb": round(base_model_bytes(s.model, exclude=s.init) / 2**20, 3),
        "peft_method": cfg.peft.method,
        "train_examples": len(s.data.train),
        "eval_examples": len(s.data.eval),
        "validation_examples": len(s.validation.eval) if s.validation is not None else 0,
        "samples": samples,
        "wall_s": round(progress.wall_s, 2),
        "train_s": round(train_s, 2),
        "samples_per_s": round(samples / max(train_s, 1e-9), 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "partition_counts": partition_counts(s.parts, s.data.train.labels, s.data.num_labels).tolist(),
        "label_names": s.data.label_names,
        "data_source": s.data.source,
        "device": str(s.device),
        "seed": tc.seed,
        **churn_summary(s, churn, rounds),
        **privacy_summary(clients, comm, cfg),  # dp_sgd: final (epsilon, delta) of every peer
        **byzantine_summary(s.algorithm, comm, cfg),  # byzantine.* / comm.robust: attackers and suspects
    }


def plot(s: Setup, rd: RunDir, summary: dict[str, Any], history: list[dict[str, Any]]) -> None:
    """plots/: the run's curves, churn (only with churn) and the partition."""
    import numpy as np

    from declora.partition import plot_partition
    from declora.rundir.plots import plot_churn, plot_run, run_title

    title = run_title(s.cfg, summary)
    plot_run(history, rd.plots_dir, title)
    plot_churn(history, rd.plots_dir, title)  # only with churn: online peers and live edges
    counts = np.asarray(summary["partition_counts"])
    plot_partition(counts, str(rd.plots_dir / layout.PARTITION_PLOT), s.data.label_names, title)
